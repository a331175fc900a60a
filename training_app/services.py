"""Dataset uploads and training jobs: every state change of a Dataset or TrainingJob."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Iterable

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.translation import gettext as _

from adapters_app.models import AdapterVersion, Task
from adapters_app.services import ServiceError, version_allocate

from .ingest import DatasetInvalid, Example, ParsedDataset, Problem, parse_dataset, split_examples
from .messages import problem_message
from .models import Dataset, TrainingJob
from .promotion import promote_version

if TYPE_CHECKING:
    from .trainer import Progress, TrainingResult

logger = logging.getLogger(__name__)

ALLOWED_EXTENSIONS = (".jsonl", ".csv", ".txt")
SPLIT_SEED = 0
JOB_LOG_LINES = 200


class DatasetRejected(ServiceError):
    """An upload failed validation; nothing was stored."""

    def __init__(self, problems: list[Problem], total: int):
        self.problems = problems
        self.total = total
        super().__init__(
            _("The dataset has %(count)s problem(s); fix them and upload again.") % {"count": total},
            code="invalid_dataset",
        )

    def as_list(self) -> list[dict]:
        return [
            {"line": problem.line, "code": problem.code, "message": problem_message(problem)}
            for problem in self.problems
        ]


# --- datasets -----------------------------------------------------------------


def dataset_directory() -> Path:
    return Path(settings.MEDIA_ROOT) / "datasets"


def dataset_path(dataset: Dataset) -> Path:
    return dataset_directory() / dataset.stored_name


def _extension(original_name: str) -> str:
    return Path(original_name).suffix.lower()


def _copy_upload(source: IO[bytes] | Iterable[bytes], destination: Path) -> int:
    """Stream an upload to disk, stopping as soon as it exceeds the size limit."""
    limit = settings.LORAWEB_MAX_UPLOAD_BYTES
    written = 0
    chunks = source.chunks() if hasattr(source, "chunks") else iter(lambda: source.read(1 << 20), b"")
    with destination.open("wb") as out:
        for chunk in chunks:
            written += len(chunk)
            if written > limit:
                raise ServiceError(
                    _("The file is larger than the limit of %(limit)s bytes; split it or raise LORAWEB_MAX_UPLOAD_BYTES.")
                    % {"limit": limit},
                    code="file_too_large",
                    status_code=413,
                )
            out.write(chunk)
    return written


@dataclass(frozen=True)
class UploadOutcome:
    dataset: Dataset
    created: bool


def dataset_upload(
    task: Task,
    upload: IO[bytes],
    *,
    original_name: str,
    user: AbstractBaseUser | None = None,
) -> UploadOutcome:
    """Validate an uploaded file completely, then store it under a generated name.

    Nothing is stored when validation fails. The same file uploaded twice to one task
    returns the existing dataset.
    """
    display_name = Path(original_name.replace("\\", "/")).name[:255] or "dataset"
    extension = _extension(display_name)
    if extension not in ALLOWED_EXTENSIONS:
        raise ServiceError(
            _("“%(name)s” is not a supported file type; upload .jsonl, .csv or .txt.") % {"name": display_name},
            code="unsupported_extension",
        )

    directory = dataset_directory()
    directory.mkdir(parents=True, exist_ok=True)
    handle, temporary_name = tempfile.mkstemp(dir=directory, prefix=".upload-", suffix=extension)
    os.close(handle)
    temporary = Path(temporary_name)
    try:
        _copy_upload(upload, temporary)
        try:
            parsed = parse_dataset(temporary, display_name)
        except DatasetInvalid as invalid:
            logger.info("Rejected upload %r for task %s: %d problems", display_name, task.slug, invalid.total_problems)
            raise DatasetRejected(invalid.problems, invalid.total_problems) from None

        existing = task.datasets.filter(sha256=parsed.sha256).first()
        if existing is not None:
            return UploadOutcome(dataset=existing, created=False)

        train, validation = split_examples(parsed.examples, seed=SPLIT_SEED)
        stored_name = f"{task.pk}-{uuid.uuid4().hex}{extension}"
        final_path = directory / stored_name
        os.replace(temporary, final_path)
        try:
            dataset = Dataset.objects.create(
                task=task,
                original_name=display_name,
                stored_name=stored_name,
                format=parsed.format,
                encoding=parsed.encoding,
                sha256=parsed.sha256,
                size_bytes=parsed.size_bytes,
                num_examples=len(parsed.examples),
                num_train=len(train),
                num_validation=len(validation),
                num_duplicates=parsed.duplicates,
                split_seed=SPLIT_SEED,
                created_by=user if user is not None and user.is_authenticated else None,
            )
        except Exception:
            final_path.unlink(missing_ok=True)
            raise
    finally:
        temporary.unlink(missing_ok=True)

    logger.info("Stored dataset %s for task %s: %d examples", dataset.pk, task.slug, dataset.num_examples)
    return UploadOutcome(dataset=dataset, created=True)


def dataset_parse(dataset: Dataset) -> ParsedDataset:
    return parse_dataset(dataset_path(dataset), dataset.original_name)


def dataset_split(dataset: Dataset) -> tuple[list[Example], list[Example]]:
    """Return the train and validation examples of a stored dataset (deterministic)."""
    return split_examples(dataset_parse(dataset).examples, seed=dataset.split_seed)


def dataset_preview(dataset: Dataset, limit: int = 10) -> list[Example]:
    return dataset_parse(dataset).examples[:limit]


# --- training jobs --------------------------------------------------------------


def training_start(
    task: Task,
    *,
    dataset_ids: list[int],
    warm_start: bool | None = None,
    hyperparameters: dict | None = None,
    user: AbstractBaseUser | None = None,
) -> TrainingJob:
    """Create version N+1 and its job in one transaction, and queue the job after commit.

    `warm_start=None` means: continue from the active version when the task has one.
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


def _eval_sets_for(task: Task, job: TrainingJob) -> dict[str, list[Example]]:
    """Validation splits of every dataset the task has trained on, plus this job's datasets.

    Scoring old datasets too is what makes forgetting visible after a retrain.
    """
    used = Dataset.objects.filter(
        Q(training_jobs__task=task, training_jobs__state=TrainingJob.State.SUCCEEDED) | Q(training_jobs=job)
    ).distinct()
    return {dataset.eval_key: dataset_split(dataset)[1] for dataset in used.order_by("pk")}


class _JobReporter:
    """Write progress, heartbeats and cancel checks to the job row, at most once a second."""

    def __init__(self, job_id: int):
        self.job_id = job_id
        self.last_write = 0.0
        self.cancel_requested = False
        self.history: list[list[float]] = []

    def on_progress(self, progress: Progress) -> None:
        self.history.append([progress.step, round(progress.loss, 5)])
        now = time.monotonic()
        final = progress.step >= progress.total_steps
        if not final and now - self.last_write < 1.0:
            return
        self.last_write = now
        TrainingJob.objects.filter(pk=self.job_id).update(
            step=progress.step,
            total_steps=progress.total_steps,
            progress=min(progress.step / max(progress.total_steps, 1), 1.0),
            last_loss=progress.loss,
            loss_history=self.history[-500:],
            heartbeat_at=timezone.now(),
        )
        self.cancel_requested = TrainingJob.objects.filter(pk=self.job_id, cancel_requested=True).exists()

    def should_stop(self) -> bool:
        return self.cancel_requested


def training_run(job_id: int) -> None:
    """Run a queued job to a final state: succeeded, failed or cancelled, never stuck."""
    from .trainer import TrainingCancelled, train_lora

    if not _claim(job_id):
        state = TrainingJob.objects.filter(pk=job_id).values_list("state", flat=True).first()
        logger.warning("Job %s not claimed (state %s); another worker has it or it is final", job_id, state)
        return

    job = TrainingJob.objects.select_related("task", "version", "warm_start_from").get(pk=job_id)
    task, version = job.task, job.version
    _append_log(job_id, "started", host=socket.gethostname())
    reporter = _JobReporter(job_id)
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


def _record_result(job: TrainingJob, result: TrainingResult, output_dir: Path) -> None:
    """Store the finished version's files and metrics, then apply the promotion rule."""
    version = job.version
    metrics = result.to_dict()
    for key in ("output_dir", "base_weight_hash"):
        metrics.pop(key, None)

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
    promote_version(job, version, result)


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
