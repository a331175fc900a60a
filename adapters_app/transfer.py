"""Export a version as a plain PEFT folder in a zip, and import external PEFT adapters."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Iterable

from django.conf import settings
from django.db import transaction
from django.http import FileResponse
from django.utils import timezone
from django.utils.translation import gettext as _

from .base_model import current_base_choice
from .messages import PROMOTION_MESSAGES, render_message
from .models import AdapterVersion, Task
from .roles import Actor, Role, require_role
from .services import ServiceError, version_allocate

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
RECORD_NAME = "training_record.json"
VERSION_NAME = "loraweb_version.json"
# Files copied from an import; anything else in the archive is ignored.
IMPORTED_FILES = (CONFIG_NAME, WEIGHTS_NAME, RECORD_NAME, VERSION_NAME)


def export_filename(version: AdapterVersion) -> str:
    return f"{version.task.slug}-v{version.number}.zip"


def export_response(version: AdapterVersion, *, user: Actor) -> FileResponse:
    """Build a download response with the version's zip, spooled to disk when it is large; needs the viewer role."""
    require_role(user, Role.VIEWER)
    buffer = tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024)
    version_export(version, buffer)
    buffer.seek(0)
    return FileResponse(buffer, as_attachment=True, filename=export_filename(version), content_type="application/zip")


def version_export(version: AdapterVersion, destination: IO[bytes]) -> None:
    """Write `version` as a zip whose top level is a plain PEFT folder.

    `adapter_config.json` names the base in `base_model_name_or_path`, and
    `loraweb_version.json` records where the version came from.
    """
    if not version.is_ready:
        raise ServiceError(
            _("%(version)s of %(task)s is %(status)s; only ready versions can be exported.")
            % {"version": version.label, "task": version.task.slug, "status": version.get_status_display()},
            code="version_not_ready",
            status_code=409,
        )

    folder = version.adapter_dir()
    config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = version.base_model_id
    description = {
        "task": version.task.slug,
        "version": version.number,
        "parent": version.parent.number if version.parent_id else None,
        "base_model": version.base_model_id,
        "base_weight_hash": version.base_weight_hash,
        "adapter_sha256": version.sha256,
        "hyperparameters": version.hyperparameters,
        "metrics": version.metrics,
        "exported_at": timezone.now().isoformat(timespec="seconds"),
    }

    with zipfile.ZipFile(destination, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True))
        archive.write(folder / WEIGHTS_NAME, WEIGHTS_NAME)
        if (folder / RECORD_NAME).is_file():
            archive.write(folder / RECORD_NAME, RECORD_NAME)
        archive.writestr(VERSION_NAME, json.dumps(description, indent=2, sort_keys=True))
    logger.info("Exported %s", version)


@dataclass(frozen=True)
class UploadedPart:
    """One uploaded file: its client-side name (only the last path part is used) and content."""

    name: str
    content: IO[bytes]


def _import_limit() -> int:
    return settings.LORAWEB_MAX_ADAPTER_UPLOAD_BYTES


def _too_large() -> ServiceError:
    return ServiceError(
        _("The adapter upload is larger than the limit of %(limit)s bytes.") % {"limit": _import_limit()},
        code="adapter_too_large",
        status_code=413,
    )


def _copy_limited(source: IO[bytes], destination: Path, budget: int) -> int:
    written = 0
    with destination.open("wb") as out:
        while chunk := source.read(1 << 20):
            written += len(chunk)
            if written > budget:
                raise _too_large()
            out.write(chunk)
    return written


def _unpack_zip(archive_file: IO[bytes], folder: Path) -> None:
    """Extract the adapter files of a zip, wherever they sit, without trusting its paths."""
    try:
        archive = zipfile.ZipFile(archive_file)
    except zipfile.BadZipFile as error:
        raise ServiceError(_("The upload is not a valid zip archive: %(error)s") % {"error": error}, code="bad_zip") from error

    with archive:
        members: dict[str, zipfile.ZipInfo] = {}
        for info in archive.infolist():
            name = PurePosixPath(info.filename).name
            if info.is_dir() or name not in IMPORTED_FILES:
                continue
            if name in members:
                raise ServiceError(
                    _("The archive contains more than one %(name)s; upload one adapter per archive.") % {"name": name},
                    code="ambiguous_archive",
                )
            members[name] = info

        # Sizes declared in the archive are checked before anything is extracted.
        if sum(info.file_size for info in members.values()) > _import_limit():
            raise _too_large()
        budget = _import_limit()
        for name, info in members.items():
            with archive.open(info) as source:
                budget -= _copy_limited(source, folder / name, budget)


def _collect_parts(parts: Iterable[UploadedPart], folder: Path) -> None:
    parts = list(parts)
    if len(parts) == 1 and PurePosixPath(parts[0].name.replace("\\", "/")).suffix.lower() == ".zip":
        _unpack_zip(parts[0].content, folder)
        return

    budget = _import_limit()
    for part in parts:
        name = PurePosixPath(part.name.replace("\\", "/")).name
        if name in IMPORTED_FILES:
            budget -= _copy_limited(part.content, folder / name, budget)


def _storage_error(error: OSError) -> ServiceError:
    """Explain a failed write of an imported adapter; the caller has removed what was written."""
    logger.error("Storing an imported adapter failed: %s", error)
    full = error.errno in (errno.ENOSPC, errno.EDQUOT)
    return ServiceError(
        _("The adapter could not be stored (%(error)s); nothing was kept. Free disk space in the adapter "
          "folder or ask the operator to, then import again.") % {"error": error.strerror or error},
        code="storage_full" if full else "storage_failed",
        status_code=507 if full else 500,
    )


def _check_base(folder: Path, base_weight_hash: str) -> None:
    """Reject an adapter whose own records name a different base than the one served here."""
    choice = current_base_choice()
    accepted_names = {choice.requested, choice.model_id, choice.path}
    config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    declared = config.get("base_model_name_or_path")
    if declared and declared not in accepted_names:
        raise ServiceError(
            _("The adapter was made for the base model “%(declared)s”, but this server serves “%(served)s”.")
            % {"declared": declared, "served": choice.model_id},
            code="base_mismatch",
        )

    for record_name in (VERSION_NAME, RECORD_NAME):
        path = folder / record_name
        if not path.is_file():
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as error:
            logger.warning("Not checking the base weight hash in %s of an imported adapter: %s", record_name, error)
            continue
        recorded_hash = record.get("base_weight_hash")
        if recorded_hash and recorded_hash != base_weight_hash:
            raise ServiceError(
                _("The adapter was trained on base weights %(recorded)s…, but the served base has %(served)s….")
                % {"recorded": recorded_hash[:12], "served": base_weight_hash[:12]},
                code="base_mismatch",
            )


def version_import(
    task: Task,
    parts: Iterable[UploadedPart],
    *,
    user: Actor,
) -> AdapterVersion:
    """Validate an external PEFT LoRA adapter and store it as the task's next version.

    Needs the trainer role. The adapter must load onto the served base (every target module
    exists with the right shapes), and its update B·A must be non-zero and change the base's
    output. The new version is a candidate; activating it is a separate, audited step.
    """
    require_role(user, Role.TRAINER)
    from .inference import get_engine
    from .serving.adapters import AdapterError, file_sha256, read_adapter
    from .serving.inspect import logit_change, update_norms

    engine = get_engine()
    root = Path(settings.LORAWEB_ADAPTER_ROOT) / task.slug
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".import-", dir=root))
    except OSError as error:
        raise _storage_error(error) from error
    try:
        try:
            _collect_parts(parts, staging)
        except OSError as error:
            raise _storage_error(error) from error
        for required in (CONFIG_NAME, WEIGHTS_NAME):
            if not (staging / required).is_file():
                raise ServiceError(
                    _("The upload has no %(name)s; upload a zip of a PEFT adapter folder, or its files.")
                    % {"name": required},
                    code="missing_adapter_file",
                )

        try:
            _check_base(staging, engine.base.weight_hash)
            adapter = read_adapter(staging, engine.base, key=f"import-{uuid.uuid4().hex}")
        except (AdapterError, ValueError) as error:
            raise ServiceError(
                _("The adapter is not valid for this base model: %(error)s") % {"error": error},
                code="invalid_adapter",
            ) from error

        norms = update_norms(adapter)
        if not any(norm > 0.0 for norm in norms.values()):
            raise ServiceError(
                _("Every B·A update of the adapter is zero, so it would not change any answer."),
                code="zero_update",
            )
        change = logit_change(engine.base, engine.hooks, adapter)
        if change <= 1e-6:
            raise ServiceError(
                _("The adapter does not change the base model's output (largest logit change %(change)s).")
                % {"change": f"{change:.2e}"},
                code="no_effect",
            )

        sha256 = file_sha256(staging / WEIGHTS_NAME)
        with transaction.atomic():
            version = version_allocate(
                task,
                parent=None,
                hyperparameters={
                    "rank": adapter.rank,
                    "alpha": adapter.alpha,
                    "target_modules": list(adapter.target_modules),
                },
            )
            final = root / f"v{version.number}-{uuid.uuid4().hex[:8]}"
            try:
                os.replace(staging, final)
            except OSError as error:
                raise _storage_error(error) from error
            try:
                _record_import(version, final, sha256, engine.base.weight_hash, norms, change)
            except Exception:
                # The row rolls back with the transaction; the files must go with it.
                shutil.rmtree(final, ignore_errors=True)
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    version.refresh_from_db()
    logger.info("Imported %s (rank %d, %s)", version, adapter.rank, ", ".join(adapter.target_modules))
    return version


def _record_import(
    version: AdapterVersion, folder: Path, sha256: str, base_weight_hash: str, norms: dict, change: float
) -> None:
    promotion = {"code": "imported", "params": {}}
    AdapterVersion.objects.filter(pk=version.pk).update(
        status=AdapterVersion.Status.READY,
        storage_path=str(folder.relative_to(settings.LORAWEB_ADAPTER_ROOT)),
        sha256=sha256,
        size_bytes=(folder / WEIGHTS_NAME).stat().st_size,
        base_weight_hash=base_weight_hash,
        metrics={"imported": True, "update_norms": norms, "logit_change": change},
        promotion=promotion,
        promotion_note=render_message(PROMOTION_MESSAGES, "imported", {}, translate=False),
        ready_at=timezone.now(),
    )
