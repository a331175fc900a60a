"""Check that ready versions still have the adapter files they were registered with.

A version's files are immutable once it is ready, and `AdapterVersion.sha256` is the hash of
its safetensors file. When serving or `manage.py verify_adapters` finds the files missing,
unreadable or changed, the version becomes `broken`: it is never served nor activated, and a
task whose active version is broken rejects its requests instead of serving them with the bare
base. It hashes files with serving.checksum, which never imports torch.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from django.utils.translation import gettext as _

from .audit import audit_record
from .models import AdapterVersion, Task
from .serving.checksum import file_sha256
from .roles import Actor

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def adapter_root_available() -> bool:
    """Check that the adapter root exists. A missing root is a mount problem, not damage."""
    return Path(settings.LORAWEB_ADAPTER_ROOT).is_dir()


def version_files_problem(version: AdapterVersion) -> str | None:
    """Return why the version's adapter files are unusable, or None when they match its record."""
    if not version.storage_path:
        return "The version has no storage path."
    folder = version.adapter_dir()
    if not folder.is_dir():
        return f"Adapter folder not found: {folder}"

    config_path = folder / CONFIG_NAME
    try:
        json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"Adapter config not found: {config_path}"
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return f"Adapter config {config_path} cannot be read: {error}"

    weights_path = folder / WEIGHTS_NAME
    try:
        size = weights_path.stat().st_size
        sha256 = file_sha256(weights_path) if version.sha256 else ""
    except FileNotFoundError:
        return f"Adapter weights file not found: {weights_path}"
    except OSError as error:
        return f"Adapter weights {weights_path} cannot be read: {error}"
    if version.size_bytes is not None and size != version.size_bytes:
        return f"Adapter weights {weights_path} have {size} bytes, expected {version.size_bytes}."
    if version.sha256 and sha256 != version.sha256:
        return f"Adapter weights {weights_path} have sha256 {sha256}, expected {version.sha256}."
    return None


def version_mark_broken(version: AdapterVersion, reason: str, *, user: Actor = None) -> bool:
    """Mark a ready version broken with the reason, and return whether this call changed it.

    The update is conditional on the status, so two serving processes that find the same damage
    write one audit record. The active pointer is left alone: requests to the task then fail
    clearly until a maintainer rolls back or a new version replaces it.
    """
    with transaction.atomic():
        changed = AdapterVersion.objects.filter(pk=version.pk, status=AdapterVersion.Status.READY).update(
            status=AdapterVersion.Status.BROKEN, broken_reason=reason, broken_at=timezone.now()
        )
        if changed:
            task = Task.objects.get(pk=version.task_id)
            audit_record(
                "version.broken",
                f"{task.slug}@v{version.number}",
                user=user,
                reason=reason,
                details={"task": task.slug, "version": version.number, "active": task.active_version_id == version.pk},
            )
    if changed:
        logger.error("Marked version %s (v%d of task %s) broken: %s", version.pk, version.number, version.task_id, reason)
        _evict(version)
    version.refresh_from_db()
    return bool(changed)


def version_mark_restored(version: AdapterVersion, *, user: Actor = None) -> bool:
    """Make a broken version ready again once its files match its record (restored from a backup)."""
    with transaction.atomic():
        changed = AdapterVersion.objects.filter(pk=version.pk, status=AdapterVersion.Status.BROKEN).update(
            status=AdapterVersion.Status.READY, broken_reason="", broken_at=None
        )
        if changed:
            audit_record(
                "version.restored",
                f"{version.task.slug}@v{version.number}",
                user=user,
                reason="The adapter files match the version's sha256 again.",
                details={"task": version.task.slug, "version": version.number},
            )
    if changed:
        logger.info("%s is ready again: its files match its sha256", version)
    version.refresh_from_db()
    return bool(changed)


def _evict(version: AdapterVersion) -> None:
    """Drop the version from this process's adapter cache, if this process serves at all."""
    from . import inference

    engine, _scheduler = inference.loaded_engine()
    if engine is not None:
        engine.unload(inference.version_key(version))


@dataclass
class VerifyReport:
    checked: int = 0
    newly_broken: list[tuple[AdapterVersion, str]] = field(default_factory=list)
    still_broken: list[AdapterVersion] = field(default_factory=list)
    restored: list[AdapterVersion] = field(default_factory=list)


def versions_verify(*, task: Task | None = None, user: Actor = None) -> VerifyReport:
    """Recheck the files of every ready and broken version; mark damaged ones broken, repaired ones ready.

    When the adapter root itself is missing it raises ServiceError and marks nothing: a storage
    mount that is down would otherwise mark every version broken.
    """
    from .services import ServiceError

    if not adapter_root_available():
        raise ServiceError(
            _("The adapter folder %(path)s does not exist; mount the adapter storage or fix "
              "LORAWEB_ADAPTER_ROOT, then verify again.") % {"path": settings.LORAWEB_ADAPTER_ROOT},
            code="adapter_root_missing",
        )
    report = VerifyReport()
    versions = AdapterVersion.objects.select_related("task").filter(
        status__in=[AdapterVersion.Status.READY, AdapterVersion.Status.BROKEN]
    )
    if task is not None:
        versions = versions.filter(task=task)
    for version in versions.order_by("task__slug", "number"):
        report.checked += 1
        problem = version_files_problem(version)
        if version.is_broken:
            if problem is None and version_mark_restored(version, user=user):
                report.restored.append(version)
            else:
                report.still_broken.append(version)
        elif problem is not None and version_mark_broken(version, problem, user=user):
            report.newly_broken.append((version, problem))
    return report
