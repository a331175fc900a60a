"""Deleting a whole task: its versions, datasets, jobs and files, with an audit record.

It lives in training_app because a task's datasets and jobs are training_app rows; the
dependency direction (training_app -> adapters_app) keeps adapters_app unaware of them.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils.translation import gettext as _

from adapters_app.audit import audit_record
from adapters_app.models import AdapterVersion, Task
from adapters_app.roles import Actor, Role, require_role
from adapters_app.services import ServiceError

from .dataset_services import dataset_path, prepared_path
from .models import Dataset, TrainingJob

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskDeletion:
    slug: str
    versions: int
    datasets: int
    jobs: int

    @property
    def message(self) -> str:
        return _(
            "Task %(task)s was deleted with %(versions)s versions, %(datasets)s datasets and %(jobs)s "
            "training jobs; the deletion is kept in the audit log."
        ) % {"task": self.slug, "versions": self.versions, "datasets": self.datasets, "jobs": self.jobs}


def task_delete(task: Task, *, user: Actor, reason: str = "") -> TaskDeletion:
    """Delete a task with every row that belongs to it, then its files; needs the maintainer role.

    Refused (409) while one of its jobs is queued or running, because the worker would write an
    adapter into a folder that is being removed. Files go only after the rows are committed, and
    only files under the task's own adapter folder and dataset files no other row names.
    """
    require_role(user, Role.MAINTAINER)

    with transaction.atomic():
        locked = Task.objects.select_for_update().get(pk=task.pk)
        busy = list(
            locked.training_jobs.filter(state__in=[TrainingJob.State.QUEUED, TrainingJob.State.RUNNING])
            .select_related("version")
            .order_by("pk")
        )
        if busy:
            raise ServiceError(
                _("Task %(task)s has a training job in progress (%(versions)s); cancel it or wait for it to end, then delete the task.")
                % {"task": locked.slug, "versions": ", ".join(job.version.label for job in busy)},
                code="task_busy",
                status_code=409,
            )

        adapter_dirs = _adapter_dirs(locked)
        dataset_files = _dataset_files(locked)
        version_ids = list(locked.versions.values_list("pk", flat=True))
        deletion = TaskDeletion(
            slug=locked.slug,
            versions=len(version_ids),
            datasets=locked.datasets.count(),
            jobs=locked.training_jobs.count(),
        )
        audit_record(
            "task.delete",
            locked.slug,
            user=user,
            reason=reason.strip(),
            details={
                "task": locked.slug,
                "name": locked.name,
                "active_version": locked.active_version.number if locked.active_version_id else None,
                "versions": deletion.versions,
                "datasets": deletion.datasets,
                "jobs": deletion.jobs,
                "activation_events": locked.activation_events.count(),
            },
        )
        # The active pointer protects its version from deletion; clear it first.
        Task.objects.filter(pk=locked.pk).update(active_version=None)
        locked.delete()
        task_root = Path(settings.LORAWEB_ADAPTER_ROOT) / locked.slug
        transaction.on_commit(lambda: _remove_files(adapter_dirs, dataset_files, task_root, version_ids))

    logger.info(
        "Deleted task %s (%d versions, %d datasets, %d jobs) by %r",
        deletion.slug, deletion.versions, deletion.datasets, deletion.jobs, getattr(user, "pk", user),
    )
    return deletion


def _adapter_dirs(task: Task) -> list[Path]:
    """Return the version folders of `task` that lie inside its own adapter folder and no other task uses."""
    task_root = (Path(settings.LORAWEB_ADAPTER_ROOT) / task.slug).resolve()
    folders = []
    for storage_path in task.versions.exclude(storage_path="").values_list("storage_path", flat=True):
        folder = (Path(settings.LORAWEB_ADAPTER_ROOT) / storage_path).resolve()
        if folder == task_root or not folder.is_relative_to(task_root):
            logger.warning("Keeping %s: it is outside the adapter folder of task %s", folder, task.slug)
            continue
        if AdapterVersion.objects.filter(storage_path=storage_path).exclude(task=task).exists():
            logger.warning("Keeping %s: a version of another task uses it", folder)
            continue
        folders.append(folder)
    return folders


def _dataset_files(task: Task) -> list[Path]:
    files = []
    for dataset in task.datasets.all():
        files.append(dataset_path(dataset))
        examples = prepared_path(dataset)
        if examples is not None and not Dataset.objects.filter(prepared_name=dataset.prepared_name).exclude(task=task).exists():
            files.append(examples)
    return files


def _remove_files(adapter_dirs: list[Path], dataset_files: list[Path], task_root: Path, version_ids: list[int]) -> None:
    from adapters_app import inference

    engine, _scheduler = inference.loaded_engine()
    if engine is not None:
        for pk in version_ids:
            engine.unload(inference.version_key(AdapterVersion(pk=pk)))
    for folder in adapter_dirs:
        shutil.rmtree(folder, ignore_errors=True)
    for path in dataset_files:
        try:
            path.unlink(missing_ok=True)
        except OSError as error:
            logger.warning("Could not delete dataset file %s: %s", path, error)
    # The task's folder goes only when nothing else is left in it (an import that is still
    # writing its temporary folder keeps it).
    try:
        os.rmdir(task_root)
    except OSError:
        pass
