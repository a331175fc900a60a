"""Dataset uploads and training jobs: every state change of a Dataset or TrainingJob."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.translation import gettext as _

from adapters_app.models import AdapterVersion, Task
from adapters_app.services import ServiceError, version_allocate

from .dataset_services import (  # noqa: F401 - views, the API and the demo call these through services
    DatasetRejected,
    UploadOutcome,
    dataset_delete,
    dataset_directory,
    dataset_examples,
    dataset_path,
    dataset_preview,
    dataset_split,
    dataset_upload,
    dataset_versions,
    encoding_note,
    format_description,
    prepared_path,
    upload_options,
    upload_too_large_error,
)
from .ingest import Example
from .models import Dataset, TrainingJob
from .promotion import promote_version

if TYPE_CHECKING:
    from .trainer import Progress, TrainingResult

logger = logging.getLogger(__name__)

JOB_LOG_LINES = 200


# --- training jobs --------------------------------------------------------------


def training_start(
    task: Task,
    *,
    dataset_ids: list[int],
    warm_start: bool | None = None,
    hyperparameters: dict | None = None,
    user: AbstractBaseUser | None = None,
    enqueue: bool = True,
) -> TrainingJob:
    """Create version N+1 and its job in one transaction, and queue the job after commit.

    `warm_start=None` means: continue from the active version when the task has one.
    With `enqueue=False` the caller runs the job itself (`manage.py train`).
    """
    from .trainer import ConfigError, TrainingConfig

    try:
        config = TrainingConfig.from_dict(hyperparameters or {})
        config.validate()
    except ConfigError as error:
        raise ServiceError(str(error), code="invalid_hyperparameters") from error

    if not dataset_ids:
        raise ServiceError(_("Choose at least one dataset to train on."), code="no_datasets")
    datasets = list(task.datasets.filter(pk__in=dataset_ids))
    missing = sorted(set(dataset_ids) - {dataset.pk for dataset in datasets})
    if missing:
        raise ServiceError(
            _("Dataset(s) %(ids)s do not belong to task %(task)s.")
            % {"ids": ", ".join(str(pk) for pk in missing), "task": task.slug},
            code="unknown_dataset",
        )

    with transaction.atomic():
        task = Task.objects.select_for_update().select_related("active_version").get(pk=task.pk)
        parent = task.active_version
        if warm_start is None:
            warm_start = parent is not None
        if warm_start and parent is None:
            raise ServiceError(
                _("Task %(task)s has no active version to continue from; start fresh instead.") % {"task": task.slug},
                code="no_active_version",
            )
        parent = parent if warm_start else None

        version = version_allocate(task, parent=parent, hyperparameters=config.to_dict())
        job = TrainingJob.objects.create(
            task=task,
            version=version,
            warm_start_from=parent,
            hyperparameters=config.to_dict(),
            created_by=user if user is not None and user.is_authenticated else None,
        )
        job.datasets.set(datasets)
        if enqueue:
            transaction.on_commit(lambda: _enqueue(job.pk))

    logger.info(
        "Queued job %s: task %s v%d from %s on datasets %s",
        job.pk,
        task.slug,
        version.number,
        parent.label if parent else "scratch",
        [dataset.pk for dataset in datasets],
    )
    return job


def _enqueue(job_id: int) -> None:
    from .tasks import train_adapter

    result = train_adapter.delay(job_id)
    TrainingJob.objects.filter(pk=job_id).update(celery_task_id=result.id or "")


def job_cancel(job: TrainingJob, *, user: AbstractBaseUser | None = None) -> TrainingJob:
    """Ask a job to stop: a queued job is cancelled now, a running one at its next step."""
    now = timezone.now()
    cancelled_now = TrainingJob.objects.filter(pk=job.pk, state=TrainingJob.State.QUEUED).update(
        state=TrainingJob.State.CANCELLED, cancel_requested=True, finished_at=now
    )
    if cancelled_now:
        AdapterVersion.objects.filter(pk=job.version_id).update(status=AdapterVersion.Status.CANCELLED)
    else:
        TrainingJob.objects.filter(pk=job.pk, state=TrainingJob.State.RUNNING).update(cancel_requested=True)
    logger.info("Cancel requested for job %s by user %s", job.pk, getattr(user, "pk", None))
    job.refresh_from_db()
    return job


def _append_log(job_id: int, code: str, **params: object) -> None:
    """Add a line to the job's log, stored as a code so each viewer reads it in their language."""
    job = TrainingJob.objects.only("log").get(pk=job_id)
    entry = {"at": timezone.now().isoformat(timespec="seconds"), "code": code, "params": params}
    TrainingJob.objects.filter(pk=job_id).update(log=(job.log + [entry])[-JOB_LOG_LINES:])


def _claim(job_id: int) -> bool:
    """Move a queued job to running; exactly one worker can win, so redelivery is harmless."""
    now = timezone.now()
    claimed = TrainingJob.objects.filter(pk=job_id, state=TrainingJob.State.QUEUED, cancel_requested=False).update(
        state=TrainingJob.State.RUNNING, started_at=now, heartbeat_at=now, worker_host=socket.gethostname()
    )
    return claimed == 1


def _eval_datasets(task: Task, job: TrainingJob) -> list[Dataset]:
    """Return every dataset the task has trained on, plus this job's datasets.

    Scoring old datasets too is what makes forgetting visible after a retrain.
    """
    used = Dataset.objects.filter(
        Q(training_jobs__task=task, training_jobs__state=TrainingJob.State.SUCCEEDED) | Q(training_jobs=job)
    ).distinct()
    return list(used.order_by("pk"))


def _eval_sets_for(task: Task, job: TrainingJob) -> dict[str, list[Example]]:
    return {dataset.eval_key: dataset_split(dataset)[1] for dataset in _eval_datasets(task, job)}


def _thin(points: list[list[float]], limit: int = 400) -> list[list[float]]:
    """Keep at most `limit` evenly spaced points (and the last), so long runs stay cheap to store."""
    if len(points) <= limit:
        return points
    stride = len(points) / limit
    kept = [points[int(index * stride)] for index in range(limit)]
    if kept[-1] is not points[-1]:
        kept.append(points[-1])
    return kept


class _JobReporter:
    """Write progress, heartbeats and cancel checks to the job row.

    Writes come at most once a second, except at the last step and at validation points,
    which are always written so the chart misses none.
    """

    def __init__(self, job_id: int, listener: Callable[[Progress], None] | None = None):
        self.job_id = job_id
        self.listener = listener
        self.last_write = 0.0
        self.cancel_requested = False
        self.history: list[list[float]] = []
        self.eval_history: list[list[float]] = []

    def on_progress(self, progress: Progress) -> None:
        self.history.append([progress.step, round(progress.loss, 5)])
        if progress.eval_loss is not None:
            self.eval_history.append([progress.step, round(progress.eval_loss, 5)])
        if self.listener is not None:
            self.listener(progress)

        now = time.monotonic()
        final = progress.step >= progress.total_steps
        if not final and progress.eval_loss is None and now - self.last_write < 1.0:
            return
        self.last_write = now
        TrainingJob.objects.filter(pk=self.job_id).update(
            step=progress.step,
            total_steps=progress.total_steps,
            progress=min(progress.step / max(progress.total_steps, 1), 1.0),
            last_loss=progress.loss,
            loss_history=_thin(self.history),
            eval_history=self.eval_history,
            tokens_seen=progress.tokens_seen,
            elapsed_seconds=progress.elapsed_seconds,
            heartbeat_at=timezone.now(),
        )
        self.cancel_requested = TrainingJob.objects.filter(pk=self.job_id, cancel_requested=True).exists()

    def should_stop(self) -> bool:
        return self.cancel_requested


def training_run(job_id: int, *, listener: Callable[[Progress], None] | None = None) -> None:
    """Run a queued job to a final state: succeeded, failed or cancelled, never stuck."""
    from .trainer import TrainingCancelled, train_lora

    if not _claim(job_id):
        state = TrainingJob.objects.filter(pk=job_id).values_list("state", flat=True).first()
        logger.warning("Job %s not claimed (state %s); another worker has it or it is final", job_id, state)
        return

    job = TrainingJob.objects.select_related("task", "version", "warm_start_from").get(pk=job_id)
    task, version = job.task, job.version
    _append_log(job_id, "started", host=socket.gethostname())
    reporter = _JobReporter(job_id, listener)
    output_dir = Path(settings.LORAWEB_ADAPTER_ROOT) / task.slug / f"v{version.number}-{uuid.uuid4().hex[:8]}"

    try:
        from adapters_app.base_model import current_base_choice

        from .trainer import TrainingConfig

        base_path = current_base_choice().path
        train_examples: list[Example] = []
        for dataset in job.datasets.order_by("pk"):
            train_examples.extend(dataset_split(dataset)[0])
        eval_sets = _eval_sets_for(task, job)
        parent_dir = job.warm_start_from.adapter_dir() if job.warm_start_from else None
        if job.warm_start_from:
            _append_log(
                job_id, "prepared_warm", examples=len(train_examples), eval_sets=len(eval_sets), parent=job.warm_start_from.label
            )
        else:
            _append_log(job_id, "prepared_fresh", examples=len(train_examples), eval_sets=len(eval_sets))

        output_dir.parent.mkdir(parents=True, exist_ok=True)
        result = train_lora(
            base_path,
            train_examples,
            eval_sets,
            TrainingConfig.from_dict(job.hyperparameters),
            output_dir,
            init_adapter_dir=parent_dir,
            device=settings.LORAWEB_DEVICE,
            torch_threads=settings.LORAWEB_TORCH_THREADS,
            on_progress=reporter.on_progress,
            should_stop=reporter.should_stop,
            record_extra={"datasets": _dataset_records(task, job)},
        )
    except TrainingCancelled:
        _finish(job_id, TrainingJob.State.CANCELLED, AdapterVersion.Status.CANCELLED, "")
        _append_log(job_id, "cancelled")
        logger.info("Job %s cancelled", job_id)
        return
    except Exception as error:  # noqa: BLE001 - any failure must end the job as failed, not stuck
        logger.exception("Job %s failed", job_id)
        shutil.rmtree(output_dir, ignore_errors=True)
        _finish(job_id, TrainingJob.State.FAILED, AdapterVersion.Status.FAILED, f"{type(error).__name__}: {error}")
        _append_log(job_id, "failed", error=f"{type(error).__name__}: {error}")
        return

    _record_result(job, result, output_dir)
    names = dict(job.task.datasets.values_list("pk", "original_name"))
    losses = ", ".join(
        f"{names.get(int(key.removeprefix('dataset-')), key)} {loss:.4f}" for key, loss in sorted(result.eval_loss.items())
    )
    _append_log(job_id, "finished", seconds=f"{result.wall_seconds:.1f}", losses=losses)


def _finish(job_id: int, state: str, version_status: str, error: str) -> None:
    with transaction.atomic():
        job = TrainingJob.objects.select_for_update().get(pk=job_id)
        TrainingJob.objects.filter(pk=job_id).update(state=state, error=error, finished_at=timezone.now())
        AdapterVersion.objects.filter(pk=job.version_id).update(status=version_status)


def _dataset_records(task: Task, job: TrainingJob) -> list[dict]:
    """What a version needs to be reproduced: each dataset's hash and split, trained on or scored."""
    trained = set(job.datasets.values_list("pk", flat=True))
    records = []
    for dataset in _eval_datasets(task, job):
        records.append(
            {
                "id": dataset.pk,
                "file_name": dataset.original_name,
                "sha256": dataset.sha256,
                "split_seed": dataset.split_seed,
                "role": "train and validation" if dataset.pk in trained else "validation",
            }
        )
    return records


def _record_result(job: TrainingJob, result: TrainingResult, output_dir: Path) -> None:
    """Store the finished version's files and metrics, then apply the promotion rule."""
    version = job.version
    metrics = result.to_dict()
    for key in ("output_dir", "base_weight_hash"):
        metrics.pop(key, None)
    # The reproducibility record, as written next to the adapter, minus the loss curves.
    record = json.loads((output_dir / "training_record.json").read_text(encoding="utf-8"))
    metrics["record"] = {key: value for key, value in record.items() if key not in ("train_loss", "eval_loss")}

    with transaction.atomic():
        AdapterVersion.objects.filter(pk=version.pk).update(
            status=AdapterVersion.Status.READY,
            storage_path=str(output_dir.relative_to(settings.LORAWEB_ADAPTER_ROOT)),
            sha256=result.adapter_sha256,
            size_bytes=result.adapter_bytes,
            base_weight_hash=result.base_weight_hash,
            metrics=metrics,
            ready_at=timezone.now(),
        )
        TrainingJob.objects.filter(pk=job.pk).update(
            state=TrainingJob.State.SUCCEEDED, progress=1.0, finished_at=timezone.now()
        )

    version.refresh_from_db()
    _score_golden(version)
    promote_version(job, version, result)


def _score_golden(version: AdapterVersion) -> None:
    """Add golden-prompt scores to the version's metrics; a failure here never fails the job."""
    from adapters_app.base_model import current_base_choice
    from adapters_app.golden import score_golden_prompts

    try:
        golden = score_golden_prompts(version, current_base_choice().path)
    except Exception as error:  # noqa: BLE001 - the version is trained and stored; scoring is extra
        logger.exception("Scoring golden prompts of %s failed", version)
        golden = {"error": f"{type(error).__name__}: {error}"}
    if golden is None:
        return
    metrics = {**version.metrics, "golden": golden}
    AdapterVersion.objects.filter(pk=version.pk).update(metrics=metrics)
    version.metrics = metrics


def sweep_stale_jobs() -> int:
    """Fail running jobs whose worker stopped sending heartbeats (killed, out of memory)."""
    cutoff = timezone.now() - timezone.timedelta(seconds=settings.LORAWEB_JOB_HEARTBEAT_TIMEOUT)
    stale = list(
        TrainingJob.objects.filter(state=TrainingJob.State.RUNNING, heartbeat_at__lt=cutoff).values_list("pk", flat=True)
    )
    for job_id in stale:
        message = _("The worker stopped reporting for more than %(seconds)s seconds; the job was marked failed.") % {
            "seconds": settings.LORAWEB_JOB_HEARTBEAT_TIMEOUT
        }
        updated = TrainingJob.objects.filter(pk=job_id, state=TrainingJob.State.RUNNING, heartbeat_at__lt=cutoff).update(
            state=TrainingJob.State.FAILED, error=message, finished_at=timezone.now()
        )
        if updated:
            job = TrainingJob.objects.get(pk=job_id)
            AdapterVersion.objects.filter(pk=job.version_id).update(status=AdapterVersion.Status.FAILED)
            logger.warning("Job %s marked failed: no heartbeat since %s", job_id, job.heartbeat_at)
    return len(stale)
