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
from django.db import transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.translation import gettext as _

from adapters_app.messages import render_message
from adapters_app.models import AdapterVersion, Task
from adapters_app.roles import Actor, Role, actor_user, require_role
from adapters_app.services import ServiceError, version_allocate
from loraweb.logs import bind_log_context, log_context

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
from .job_health import JobHeartbeat, broker_task_ids
from .messages import JOB_LOG_MESSAGES
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
    user: Actor,
    enqueue: bool = True,
) -> TrainingJob:
    """Create version N+1 and its job in one transaction, and queue the job after commit.

    Needs the trainer role. `warm_start=None` means: continue from the active version when the task has one.
    With `enqueue=False` the caller runs the job itself (`manage.py train`).
    """
    from .trainer import ConfigError, TrainingConfig

    require_role(user, Role.TRAINER)
    try:
        config = TrainingConfig.from_dict(hyperparameters or {})
        config.validate()
    except ConfigError as error:
        raise ServiceError(str(error), code="invalid_hyperparameters") from error

    if not dataset_ids:
        raise ServiceError(_("Choose at least one dataset to train on."), code="no_datasets")
    # An id beyond a 64-bit key names no dataset, and SQLite raises OverflowError on it in a query.
    storable_ids = [pk for pk in dataset_ids if -(2**63) <= pk < 2**63]
    datasets = list(task.datasets.filter(pk__in=storable_ids))
    missing = sorted(set(dataset_ids) - {dataset.pk for dataset in datasets})
    if missing:
        raise ServiceError(
            _("Dataset(s) %(ids)s do not belong to task %(task)s.")
            % {"ids": ", ".join(str(pk) for pk in missing), "task": task.slug},
            code="unknown_dataset",
        )

    with transaction.atomic():
        # `of` locks only the task row: Postgres cannot lock the nullable side of the join.
        task = Task.objects.select_for_update(of=("self",)).select_related("active_version").get(pk=task.pk)
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
            created_by=actor_user(user),
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
    # The id is stored before the message is sent, so the sweeper can always tell whether the
    # message of a queued job is still in the broker.
    task_id = str(uuid.uuid4())
    TrainingJob.objects.filter(pk=job_id).update(celery_task_id=task_id)
    _publish(job_id, task_id)


def _publish(job_id: int, task_id: str) -> bool:
    """Send the job's message; when the broker cannot be reached, the job stays queued for the sweeper."""
    from kombu.exceptions import OperationalError

    from .tasks import train_adapter

    try:
        train_adapter.apply_async(args=[job_id], task_id=task_id)
    except OperationalError:
        logger.warning("Job %s not sent: the broker cannot be reached; the sweeper sends it again", job_id, exc_info=True)
        _append_log(job_id, "queue_unreachable")
        return False
    return True


def job_cancel(job: TrainingJob, *, user: Actor) -> TrainingJob:
    """Ask a job to stop: a queued job is cancelled now, a running one at its next step. Needs the trainer role."""
    require_role(user, Role.TRAINER)
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
    with log_context(job_id=job_id):
        _training_run(job_id, listener)


def _training_run(job_id: int, listener: Callable[[Progress], None] | None) -> None:
    if not _claim(job_id):
        _log_unclaimed(job_id)
        return

    # Imported after the claim, so a repeated delivery exits without loading torch.
    from .trainer import TrainingCancelled, train_lora

    job = TrainingJob.objects.select_related("task", "version", "warm_start_from").get(pk=job_id)
    task, version = job.task, job.version
    bind_log_context(task=task.slug, version=version.label)
    _append_log(job_id, "started", host=socket.gethostname())
    reporter = _JobReporter(job_id, listener)
    output_dir = Path(settings.LORAWEB_ADAPTER_ROOT) / task.slug / f"v{version.number}-{uuid.uuid4().hex[:8]}"
    heartbeat = JobHeartbeat(job_id)
    heartbeat.start()

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
    finally:
        heartbeat.stop()

    if not _record_result(job, result, output_dir):
        return
    names = dict(job.task.datasets.values_list("pk", "original_name"))
    losses = ", ".join(
        f"{names.get(int(key.removeprefix('dataset-')), key)} {loss:.4f}" for key, loss in sorted(result.eval_loss.items())
    )
    _append_log(job_id, "finished", seconds=f"{result.wall_seconds:.1f}", losses=losses)


def _log_unclaimed(job_id: int) -> None:
    """Say why a delivered job was not run: the same message can arrive twice (late acknowledgement)."""
    job = TrainingJob.objects.filter(pk=job_id).values("state", "worker_host", "cancel_requested").first()
    if job is None:
        logger.warning("Job %s not run: it no longer exists", job_id)
    elif job["state"] == TrainingJob.State.RUNNING:
        logger.warning("Job %s not run again: it is already running on %s (repeated delivery)", job_id, job["worker_host"])
    elif job["state"] == TrainingJob.State.QUEUED:
        logger.warning("Job %s not run: cancellation was requested before it started", job_id)
    else:
        logger.warning("Job %s not run again: it already ended %s (repeated delivery)", job_id, job["state"])


def _finish(job_id: int, state: str, version_status: str, error: str) -> None:
    # Only a running job: when the sweeper already failed it, its reason stays.
    with transaction.atomic():
        job = TrainingJob.objects.select_for_update().get(pk=job_id)
        finished = TrainingJob.objects.filter(pk=job_id, state=TrainingJob.State.RUNNING).update(
            state=state, error=error, finished_at=timezone.now()
        )
        if finished:
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


def _record_result(job: TrainingJob, result: TrainingResult, output_dir: Path) -> bool:
    """Store the finished version's files and metrics, then apply the promotion rule.

    Returns False, and removes the files, when the job is no longer running: the sweeper
    failed it because its heartbeat stopped for too long.
    """
    version = job.version
    metrics = result.to_dict()
    for key in ("output_dir", "base_weight_hash"):
        metrics.pop(key, None)
    # The reproducibility record, as written next to the adapter, minus the loss curves.
    record = json.loads((output_dir / "training_record.json").read_text(encoding="utf-8"))
    metrics["record"] = {key: value for key, value in record.items() if key not in ("train_loss", "eval_loss")}

    with transaction.atomic():
        succeeded = TrainingJob.objects.filter(pk=job.pk, state=TrainingJob.State.RUNNING).update(
            state=TrainingJob.State.SUCCEEDED, progress=1.0, finished_at=timezone.now()
        )
        if not succeeded:
            logger.warning("Job %s trained but is no longer running; its files are removed", job.pk)
            shutil.rmtree(output_dir, ignore_errors=True)
            return False
        AdapterVersion.objects.filter(pk=version.pk).update(
            status=AdapterVersion.Status.READY,
            storage_path=str(output_dir.relative_to(settings.LORAWEB_ADAPTER_ROOT)),
            sha256=result.adapter_sha256,
            size_bytes=result.adapter_bytes,
            base_weight_hash=result.base_weight_hash,
            metrics=metrics,
            ready_at=timezone.now(),
        )

    version.refresh_from_db()
    _score_golden(version)
    promote_version(job, version, result)
    return True


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
    """Fail running jobs whose worker stopped (killed, out of memory) and resend lost queued jobs.

    Returns how many jobs it failed or sent again.
    """
    return _fail_stale_jobs() + _resend_lost_jobs()


def _fail_stale_jobs() -> int:
    timeout = settings.LORAWEB_JOB_HEARTBEAT_TIMEOUT
    cutoff = timezone.now() - timezone.timedelta(seconds=timeout)
    stale = list(
        TrainingJob.objects.filter(state=TrainingJob.State.RUNNING, heartbeat_at__lt=cutoff).values_list("pk", flat=True)
    )
    failed = 0
    for job_id in stale:
        message = render_message(JOB_LOG_MESSAGES, "worker_lost", {"seconds": timeout})
        updated = TrainingJob.objects.filter(pk=job_id, state=TrainingJob.State.RUNNING, heartbeat_at__lt=cutoff).update(
            state=TrainingJob.State.FAILED, error=message, finished_at=timezone.now()
        )
        if not updated:
            continue
        failed += 1
        job = TrainingJob.objects.select_related("task", "version").get(pk=job_id)
        AdapterVersion.objects.filter(pk=job.version_id).update(status=AdapterVersion.Status.FAILED)
        _remove_unfinished_files(job.task.slug, job.version.number)
        _append_log(job_id, "worker_lost", seconds=timeout)
        logger.warning("Job %s marked failed: no heartbeat since %s", job_id, job.heartbeat_at)
    return failed


def _remove_unfinished_files(task_slug: str, number: int) -> None:
    """Remove what a dead worker left of a version: its folder and the hidden partial one."""
    folder = Path(settings.LORAWEB_ADAPTER_ROOT) / task_slug
    for path in [*folder.glob(f"v{number}-*"), *folder.glob(f".v{number}-*")]:
        logger.info("Removing %s, left by the failed training of v%s", path, number)
        shutil.rmtree(path, ignore_errors=True)


def _resend_lost_jobs() -> int:
    """Send again the jobs queued for a while whose message is no longer in the broker.

    A Redis that keeps nothing on disk forgets its queue when it restarts. A message sent
    twice is harmless, because only one delivery can claim the job.
    """
    if settings.CELERY_TASK_ALWAYS_EAGER:
        return 0
    cutoff = timezone.now() - timezone.timedelta(seconds=settings.LORAWEB_JOB_REQUEUE_AFTER)
    waiting = list(
        TrainingJob.objects.filter(state=TrainingJob.State.QUEUED, cancel_requested=False, created_at__lt=cutoff)
        .order_by("pk")
        .values_list("pk", "celery_task_id")
    )
    if not waiting:
        return 0
    held = broker_task_ids(settings.CELERY_TASK_DEFAULT_QUEUE)
    if held is None:
        logger.info("The broker cannot be looked into; %d queued job(s) not checked", len(waiting))
        return 0

    resent = 0
    for job_id, task_id in waiting:
        if task_id and task_id in held:
            continue
        new_id = str(uuid.uuid4())
        # Compare and set, so that of two sweepers only one sends the job again.
        if not TrainingJob.objects.filter(pk=job_id, state=TrainingJob.State.QUEUED, celery_task_id=task_id).update(
            celery_task_id=new_id
        ):
            continue
        logger.warning("Job %s is queued but the broker lost its message %s; sending it again", job_id, task_id or "-")
        if _publish(job_id, new_id):
            _append_log(job_id, "requeued")
            resent += 1
    return resent
