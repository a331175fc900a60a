"""Back up a whole installation into one zip archive, and restore it on an empty one.

The archive contains `data.json` (every task, golden prompt, dataset, version, job, activation
event and audit event, linked by natural keys: task slug, version number, dataset stored name,
username), the dataset files under `datasets/`, the adapter folders under `adapters/`, and
`manifest.json`, which lists every other member with its size and sha256. Import checks every
member against the manifest before it writes anything.

It lives in training_app because it reads both apps' rows (training_app -> adapters_app).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import models, transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from django.utils.translation import gettext as _

from adapters_app.models import ActivationEvent, AdapterVersion, AuditEvent, GoldenPrompt, Task
from adapters_app.roles import Actor, Role, require_role
from adapters_app.services import ServiceError

from .dataset_services import dataset_directory
from .models import Dataset, TrainingJob

logger = logging.getLogger(__name__)

ARCHIVE_FORMAT = "loraweb-archive"
ARCHIVE_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
DATA_NAME = "data.json"
DATASETS_PREFIX = "datasets/"
ADAPTERS_PREFIX = "adapters/"
CHUNK_BYTES = 1 << 20
UNFINISHED_JOB_STATES = (TrainingJob.State.QUEUED, TrainingJob.State.RUNNING)


@dataclass(frozen=True)
class ArchiveSummary:
    tasks: int
    datasets: int
    versions: int
    jobs: int
    files: int
    bytes: int


# --- rows <-> JSON -----------------------------------------------------------------


def _plain_fields(obj: models.Model, skip: Iterable[str] = ()) -> dict[str, Any]:
    """Return the row's own columns (no primary key, no foreign keys) as JSON values."""
    skipped = set(skip)
    row: dict[str, Any] = {}
    for field in obj._meta.concrete_fields:
        if field.primary_key or field.is_relation or field.name in skipped:
            continue
        value = field.value_from_object(obj)
        row[field.name] = value.isoformat() if isinstance(value, datetime) else value
    return row


def _model_fields(model: type[models.Model], row: dict[str, Any]) -> dict[str, Any]:
    """Turn `_plain_fields` output back into keyword arguments; unknown keys are ignored."""
    values: dict[str, Any] = {}
    for field in model._meta.concrete_fields:
        if field.primary_key or field.is_relation or field.name not in row:
            continue
        value = row[field.name]
        if isinstance(field, models.DateTimeField) and value is not None:
            value = parse_datetime(value)
        values[field.name] = value
    return values


def _username(user: models.Model | None) -> str | None:
    return user.get_username() if user is not None else None


def _export_rows() -> dict[str, Any]:
    tasks = []
    for task in Task.objects.select_related("active_version", "created_by").order_by("slug"):
        tasks.append(
            {
                **_plain_fields(task),
                "created_by": _username(task.created_by),
                "active_version": task.active_version.number if task.active_version_id else None,
                "golden_prompts": [_plain_fields(prompt) for prompt in task.golden_prompts.order_by("pk")],
            }
        )
    datasets = [
        {
            **_plain_fields(dataset),
            "task": dataset.task.slug,
            "created_by": _username(dataset.created_by),
            # Metrics name datasets by this key; import rewrites it to the new row's key.
            "eval_key": dataset.eval_key,
        }
        for dataset in Dataset.objects.select_related("task", "created_by").order_by("pk")
    ]
    versions = [
        {**_plain_fields(version), "task": version.task.slug, "parent": version.parent.number if version.parent_id else None}
        for version in AdapterVersion.objects.select_related("task", "parent").order_by("task__slug", "number")
    ]
    jobs = [
        {
            **_plain_fields(job),
            "task": job.task.slug,
            "version": job.version.number,
            "warm_start_from": job.warm_start_from.number if job.warm_start_from_id else None,
            "datasets": sorted(job.datasets.values_list("stored_name", flat=True)),
            "created_by": _username(job.created_by),
        }
        for job in TrainingJob.objects.select_related("task", "version", "warm_start_from", "created_by").order_by("pk")
    ]
    activations = [
        {
            **_plain_fields(event),
            "task": event.task.slug,
            "from_version": event.from_version.number if event.from_version_id else None,
            "to_version": event.to_version.number if event.to_version_id else None,
            "actor": _username(event.actor),
        }
        for event in ActivationEvent.objects.select_related("task", "from_version", "to_version", "actor").order_by("pk")
    ]
    audits = [
        {**_plain_fields(event), "actor": _username(event.actor)}
        for event in AuditEvent.objects.select_related("actor").order_by("pk")
    ]
    return {
        "tasks": tasks,
        "datasets": datasets,
        "versions": versions,
        "jobs": jobs,
        "activation_events": activations,
        "audit_events": audits,
    }


# --- export ---------------------------------------------------------------------------


def _export_files(rows: dict[str, Any]) -> list[tuple[str, Path]]:
    """Return (member name, source path) for every file the rows refer to.

    A missing file of a ready version or of a dataset stops the export: a backup that lacks it
    could not restore the installation. Broken versions are exported with what is left of them.
    """
    files: list[tuple[str, Path]] = []
    for dataset in rows["datasets"]:
        for name in (dataset["stored_name"], dataset["prepared_name"]):
            if not name:
                continue
            path = dataset_directory() / name
            if not path.is_file():
                raise ServiceError(
                    _("The file %(path)s of dataset %(name)s is missing, so the archive would be incomplete.")
                    % {"path": path, "name": dataset["original_name"]},
                    code="archive_source_missing",
                )
            files.append((DATASETS_PREFIX + name, path))

    root = Path(settings.LORAWEB_ADAPTER_ROOT)
    for version in rows["versions"]:
        if not version["storage_path"]:
            continue
        folder = root / version["storage_path"]
        if not folder.is_dir():
            if version["status"] == AdapterVersion.Status.READY:
                raise ServiceError(
                    _("The adapter folder %(path)s of %(task)s v%(number)s is missing; run verify_adapters, "
                      "then export again.") % {"path": folder, "task": version["task"], "number": version["number"]},
                    code="archive_source_missing",
                )
            continue
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                member = PurePosixPath(version["storage_path"], *path.relative_to(folder).parts)
                files.append((ADAPTERS_PREFIX + str(member), path))
    return files


def archive_export(destination: Path, *, user: Actor) -> ArchiveSummary:
    """Write the whole installation to the zip `destination`; needs the maintainer role.

    The archive is written next to `destination` under a temporary name and renamed when
    complete, so a failed export never leaves a partial archive under the final name.
    """
    require_role(user, Role.MAINTAINER)
    destination = Path(destination)
    with transaction.atomic():
        rows = _export_rows()
    files = _export_files(rows)
    manifest: dict[str, Any] = {
        "format": ARCHIVE_FORMAT,
        "format_version": ARCHIVE_FORMAT_VERSION,
        "created_at": timezone.now().isoformat(timespec="seconds"),
        "files": {},
    }

    temporary = destination.with_name(f".{destination.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
            data = json.dumps(rows, indent=1, sort_keys=True, ensure_ascii=False).encode("utf-8")
            archive.writestr(DATA_NAME, data)
            manifest["files"][DATA_NAME] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            for member, source in files:
                manifest["files"][member] = _copy_into(archive, member, source)
            archive.writestr(MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True))
        os.replace(temporary, destination)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise

    summary = ArchiveSummary(
        tasks=len(rows["tasks"]),
        datasets=len(rows["datasets"]),
        versions=len(rows["versions"]),
        jobs=len(rows["jobs"]),
        files=len(manifest["files"]),
        bytes=sum(entry["size"] for entry in manifest["files"].values()),
    )
    logger.info("Exported %s to %s", summary, destination)
    return summary


def _copy_into(archive: zipfile.ZipFile, member: str, source: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    size = 0
    with source.open("rb") as reader, archive.open(member, "w", force_zip64=True) as writer:
        while chunk := reader.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
            writer.write(chunk)
    return {"sha256": digest.hexdigest(), "size": size}


# --- import ---------------------------------------------------------------------------


def _refuse(message: str, code: str = "archive_invalid") -> ServiceError:
    return ServiceError(message, code=code)


def _read_manifest(archive: zipfile.ZipFile) -> dict[str, dict[str, Any]]:
    try:
        manifest = json.loads(archive.read(MANIFEST_NAME))
    except KeyError:
        raise _refuse(_("The archive has no %(name)s; it was not made by export_archive.") % {"name": MANIFEST_NAME}) from None
    except ValueError as error:
        raise _refuse(_("The archive's %(name)s is not valid JSON: %(error)s") % {"name": MANIFEST_NAME, "error": error}) from error
    if manifest.get("format") != ARCHIVE_FORMAT or manifest.get("format_version") != ARCHIVE_FORMAT_VERSION:
        raise _refuse(
            _("The archive has format %(format)s version %(version)s; this loraweb reads %(expected)s version %(expected_version)s.")
            % {
                "format": manifest.get("format"),
                "version": manifest.get("format_version"),
                "expected": ARCHIVE_FORMAT,
                "expected_version": ARCHIVE_FORMAT_VERSION,
            }
        )
    return manifest["files"]


def _check_member_name(name: str) -> None:
    path = PurePosixPath(name)
    inside = name == DATA_NAME or name.startswith((DATASETS_PREFIX, ADAPTERS_PREFIX))
    if not inside or path.is_absolute() or ".." in path.parts or "\\" in name:
        raise _refuse(_("The archive member %(name)s lies outside the places an archive may fill.") % {"name": name})


def _verify_members(archive: zipfile.ZipFile, listed: dict[str, dict[str, Any]]) -> None:
    """Hash every member and compare it with the manifest; raise naming the first file that differs."""
    present = {info.filename for info in archive.infolist() if not info.is_dir()} - {MANIFEST_NAME}
    unlisted = sorted(present - set(listed))
    if unlisted:
        raise _refuse(_("The archive contains %(name)s, which its manifest does not list.") % {"name": unlisted[0]})
    missing = sorted(set(listed) - present)
    if missing:
        raise _refuse(_("The archive lacks %(name)s, which its manifest lists.") % {"name": missing[0]})

    for name in sorted(listed):
        _check_member_name(name)
        digest = hashlib.sha256()
        size = 0
        try:
            with archive.open(name) as reader:
                while chunk := reader.read(CHUNK_BYTES):
                    digest.update(chunk)
                    size += len(chunk)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
            raise _refuse(
                _("The archive member %(name)s cannot be read (%(error)s); the archive is damaged.") % {"name": name, "error": error},
                code="archive_checksum_mismatch",
            ) from error
        if digest.hexdigest() != listed[name]["sha256"] or size != listed[name]["size"]:
            raise _refuse(
                _("The archive member %(name)s does not match its checksum in the manifest; the archive is damaged, so nothing was imported.")
                % {"name": name},
                code="archive_checksum_mismatch",
            )


def _target_path(member: str) -> Path:
    if member.startswith(DATASETS_PREFIX):
        return dataset_directory() / member.removeprefix(DATASETS_PREFIX)
    return Path(settings.LORAWEB_ADAPTER_ROOT) / member.removeprefix(ADAPTERS_PREFIX)


def archive_import(source: Path, *, user: Actor) -> ArchiveSummary:
    """Restore an archive made by `archive_export` into an installation without tasks.

    Needs the maintainer role. Every member is checked against the manifest first; a mismatch,
    an existing task or an existing target file refuses the import before anything is written.
    Rows and files then go in together: if either fails, neither stays.
    """
    require_role(user, Role.MAINTAINER)
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError) as error:
        raise _refuse(_("%(path)s is not a readable zip archive: %(error)s") % {"path": source, "error": error}) from error

    with archive:
        if Task.objects.exists():
            raise _refuse(
                _("This installation already has %(count)s tasks; import an archive only into an empty one "
                  "(a new database and empty adapter and media folders).") % {"count": Task.objects.count()},
                code="archive_target_not_empty",
            )
        listed = _read_manifest(archive)
        _verify_members(archive, listed)
        rows = json.loads(archive.read(DATA_NAME))
        members = sorted(name for name in listed if name != DATA_NAME)
        existing = [str(_target_path(name)) for name in members if _target_path(name).exists()]
        if existing:
            raise _refuse(
                _("%(path)s already exists; import into empty adapter and media folders.") % {"path": existing[0]},
                code="archive_target_not_empty",
            )

        written: list[Path] = []
        try:
            with transaction.atomic():
                summary = _import_rows(rows)
                for name in members:
                    written.append(_extract(archive, name, listed[name]["sha256"]))
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise

    summary = replace(summary, files=len(listed), bytes=sum(entry["size"] for entry in listed.values()))
    logger.info("Imported %s from %s", summary, source)
    return summary


def _extract(archive: zipfile.ZipFile, member: str, sha256: str) -> Path:
    target = _target_path(member)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")
    digest = hashlib.sha256()
    try:
        with archive.open(member) as reader, temporary.open("wb") as writer:
            while chunk := reader.read(CHUNK_BYTES):
                digest.update(chunk)
                writer.write(chunk)
        if digest.hexdigest() != sha256:
            raise _refuse(_("The archive member %(name)s changed while it was imported.") % {"name": member}, code="archive_checksum_mismatch")
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return target


def _remap(value: Any, keys: dict[str, str], ids: dict[int, int]) -> Any:
    """Rewrite `dataset-<old id>` keys and training-record dataset ids to the imported rows' ids."""
    if isinstance(value, list):
        return [_remap(item, keys, ids) for item in value]
    if not isinstance(value, dict):
        return value
    result = {keys.get(key, key): _remap(item, keys, ids) for key, item in value.items()}
    if "split_seed" in result and result.get("id") in ids:
        result["id"] = ids[result["id"]]
    return result


def _import_rows(rows: dict[str, Any]) -> ArchiveSummary:
    usernames = {
        name
        for group in ("tasks", "datasets", "jobs")
        for row in rows[group]
        if (name := row.get("created_by"))
    } | {row["actor"] for group in ("activation_events", "audit_events") for row in rows[group] if row.get("actor")}
    user_model = get_user_model()
    users = {user.get_username(): user for user in user_model.objects.filter(**{f"{user_model.USERNAME_FIELD}__in": usernames})}

    def created(model: type[models.Model], row: dict[str, Any], **relations: Any) -> models.Model:
        obj = model.objects.create(**_model_fields(model, row), **relations)
        # auto_now_add sets the time of this import; keep the original one.
        if "created_at" in row:
            model.objects.filter(pk=obj.pk).update(created_at=parse_datetime(row["created_at"]))
        return obj

    tasks: dict[str, Task] = {}
    for row in rows["tasks"]:
        task = created(Task, row, created_by=users.get(row["created_by"]))
        tasks[task.slug] = task
        for prompt in row["golden_prompts"]:
            created(GoldenPrompt, prompt, task=task)

    datasets: dict[str, Dataset] = {}
    keys: dict[str, str] = {}
    ids: dict[int, int] = {}
    for row in rows["datasets"]:
        dataset = created(Dataset, row, task=tasks[row["task"]], created_by=users.get(row["created_by"]))
        datasets[dataset.stored_name] = dataset
        keys[row["eval_key"]] = dataset.eval_key
        ids[int(row["eval_key"].removeprefix("dataset-"))] = dataset.pk

    versions: dict[tuple[str, int], AdapterVersion] = {}
    for row in sorted(rows["versions"], key=lambda item: (item["task"], item["number"])):
        fields = {**row, "metrics": _remap(row["metrics"], keys, ids)}
        if fields["status"] == AdapterVersion.Status.TRAINING:
            fields["status"] = AdapterVersion.Status.FAILED
        parent = versions.get((row["task"], row["parent"])) if row["parent"] is not None else None
        versions[(row["task"], row["number"])] = created(AdapterVersion, fields, task=tasks[row["task"]], parent=parent)

    for row in rows["jobs"]:
        fields = dict(row)
        if fields["state"] in UNFINISHED_JOB_STATES:
            # No worker runs the job after a restore, so it is failed instead of waiting forever.
            fields["state"] = TrainingJob.State.FAILED
            fields["error"] = "The job had not finished when the archive was made; train again."
        job = created(
            TrainingJob,
            fields,
            task=tasks[row["task"]],
            version=versions[(row["task"], row["version"])],
            warm_start_from=versions.get((row["task"], row["warm_start_from"])) if row["warm_start_from"] else None,
            created_by=users.get(row["created_by"]),
        )
        job.datasets.set([datasets[name] for name in row["datasets"]])

    for row in rows["activation_events"]:
        created(
            ActivationEvent,
            row,
            task=tasks[row["task"]],
            from_version=versions.get((row["task"], row["from_version"])),
            to_version=versions.get((row["task"], row["to_version"])),
            actor=users.get(row["actor"]),
        )
    for row in rows["audit_events"]:
        created(AuditEvent, row, actor=users.get(row["actor"]))

    for row in rows["tasks"]:
        if row["active_version"] is not None:
            active = versions[(row["slug"], row["active_version"])]
            Task.objects.filter(pk=tasks[row["slug"]].pk).update(active_version=active)

    return ArchiveSummary(
        tasks=len(tasks), datasets=len(datasets), versions=len(versions), jobs=len(rows["jobs"]), files=0, bytes=0
    )
