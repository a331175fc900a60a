"""JSON API for datasets and training jobs (`/api/v1/`)."""

from __future__ import annotations

from datetime import datetime

from django.http import HttpRequest
from django.utils.translation import gettext as _
from ninja import File, Form, Router, Schema, Status
from ninja.files import UploadedFile
from pydantic import Field

from adapters_app.api import VersionOut, version_out
from adapters_app.services import NotFound, ServiceError, task_get

from . import services
from .ingest import MAX_EXAMPLE_TOKENS, ON_TOO_LONG_REJECT
from .messages import job_log_lines
from .models import Dataset, TrainingJob
from .uploads import upload_over_limit

router = Router(tags=["training"])


class TokenStatsOut(Schema):
    total: int
    mean: float
    p95: int
    max: int
    # Bar i of histogram counts examples of bin_width * i to bin_width * (i + 1) - 1 tokens.
    bin_width: int
    histogram: list[int]


class DatasetOut(Schema):
    id: int
    task: str
    file_name: str
    format: str
    shape: str
    compression: str
    delimiter: str
    encoding: str
    encoding_detected: bool
    encoding_note: str
    sha256: str
    size_bytes: int
    num_examples: int
    num_train: int
    num_validation: int
    num_duplicates: int
    num_truncated: int
    max_length: int
    on_too_long: str
    drop_duplicates: bool
    prompt_column: str
    completion_column: str
    tokens: TokenStatsOut | None
    used_by_versions: list[int]
    created: bool = False
    created_at: datetime


class TrainIn(Schema):
    # Documents the rule of training_start, which rejects an empty list with its own message.
    dataset_ids: list[int] = Field(json_schema_extra={"minItems": 1})
    warm_start: bool | None = None
    hyperparameters: dict = {}


class TrainOut(Schema):
    version: int
    job_id: int
    state: str
    warm_start_from: int | None


class JobOut(Schema):
    id: int
    task: str
    version: int
    state: str
    progress: float
    step: int
    total_steps: int
    loss: float | None
    loss_history: list[list[float]]
    eval_history: list[list[float]]
    tokens_seen: int
    tokens_per_second: float | None
    eta_seconds: float | None
    error: str
    cancel_requested: bool
    warm_start_from: int | None
    dataset_ids: list[int]
    hyperparameters: dict
    log: list[str]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


def dataset_out(dataset: Dataset, created: bool = False) -> dict:
    histogram = dataset.length_histogram or {}
    tokens = None
    if dataset.has_statistics:
        tokens = {
            "total": dataset.token_total,
            "mean": dataset.token_mean,
            "p95": dataset.token_p95,
            "max": dataset.token_max,
            "bin_width": histogram.get("bin_width", 1),
            "histogram": histogram.get("counts", []),
        }
    return {
        "id": dataset.pk,
        "task": dataset.task.slug,
        "file_name": dataset.original_name,
        "format": dataset.format,
        "shape": dataset.shape,
        "compression": dataset.compression,
        "delimiter": dataset.delimiter,
        "encoding": dataset.encoding,
        "encoding_detected": dataset.encoding_detected,
        "encoding_note": services.encoding_note(dataset),
        "sha256": dataset.sha256,
        "size_bytes": dataset.size_bytes,
        "num_examples": dataset.num_examples,
        "num_train": dataset.num_train,
        "num_validation": dataset.num_validation,
        "num_duplicates": dataset.num_duplicates,
        "num_truncated": dataset.num_truncated,
        "max_length": dataset.max_length,
        "on_too_long": dataset.on_too_long,
        "drop_duplicates": dataset.drop_duplicates,
        "prompt_column": dataset.prompt_column,
        "completion_column": dataset.completion_column,
        "tokens": tokens,
        "used_by_versions": [version.number for version in services.dataset_versions(dataset)],
        "created": created,
        "created_at": dataset.created_at,
    }


def job_out(job: TrainingJob) -> dict:
    return {
        "id": job.pk,
        "task": job.task.slug,
        "version": job.version.number,
        "state": job.state,
        "progress": job.progress,
        "step": job.step,
        "total_steps": job.total_steps,
        "loss": job.last_loss,
        "loss_history": job.loss_history,
        "eval_history": job.eval_history,
        "tokens_seen": job.tokens_seen,
        "tokens_per_second": job.tokens_per_second,
        "eta_seconds": job.eta_seconds,
        "error": job.error,
        "cancel_requested": job.cancel_requested,
        "warm_start_from": job.warm_start_from.number if job.warm_start_from_id else None,
        "dataset_ids": sorted(job.datasets.values_list("pk", flat=True)),
        "hyperparameters": job.hyperparameters,
        "log": job_log_lines(job.log),
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
    }


def _dataset(dataset_id: int) -> Dataset:
    dataset = Dataset.objects.select_related("task").filter(pk=dataset_id).first()
    if dataset is None:
        raise NotFound(_("No dataset with id %(id)s.") % {"id": dataset_id}, code="dataset_not_found")
    return dataset


def _job(job_id: int) -> TrainingJob:
    job = TrainingJob.objects.select_related("task", "version", "warm_start_from").filter(pk=job_id).first()
    if job is None:
        raise NotFound(_("No training job with id %(id)s.") % {"id": job_id}, code="job_not_found")
    return job


@router.post("/tasks/{slug}/datasets", response={201: DatasetOut, 200: DatasetOut})
def upload_dataset(
    request: HttpRequest,
    slug: str,
    file: File[UploadedFile | None] = None,
    max_length: Form[int] = MAX_EXAMPLE_TOKENS,
    on_too_long: Form[str] = ON_TOO_LONG_REJECT,
    drop_duplicates: Form[bool] = False,
    prompt_column: Form[str] = "",
    completion_column: Form[str] = "",
):
    # The upload handler drops a file part over the size limit, so `file` is then missing.
    if upload_over_limit(request):
        raise services.upload_too_large_error()
    if file is None:
        raise ServiceError(_("Send the dataset as the multipart field “file”."), code="missing_file")

    task = task_get(slug)
    options = services.upload_options(
        max_length=max_length,
        on_too_long=on_too_long,
        drop_duplicates=drop_duplicates,
        prompt_column=prompt_column,
        completion_column=completion_column,
    )
    outcome = services.dataset_upload(
        task, file, original_name=file.name or "dataset", options=options, user=request.user
    )
    return Status(201 if outcome.created else 200, dataset_out(outcome.dataset, outcome.created))


@router.get("/datasets/{dataset_id}", response=DatasetOut)
def read_dataset(request: HttpRequest, dataset_id: int):
    return dataset_out(_dataset(dataset_id))


@router.delete("/datasets/{dataset_id}", response={204: None})
def delete_dataset(request: HttpRequest, dataset_id: int):
    services.dataset_delete(_dataset(dataset_id), user=request.user)
    return Status(204, None)


@router.get("/tasks/{slug}/datasets", response=list[DatasetOut])
def list_datasets(request: HttpRequest, slug: str):
    task = task_get(slug)
    return [dataset_out(dataset) for dataset in task.datasets.order_by("pk")]


@router.post("/tasks/{slug}/versions", response={202: TrainOut})
def start_version(request: HttpRequest, slug: str, payload: TrainIn):
    job = services.training_start(
        task_get(slug),
        dataset_ids=payload.dataset_ids,
        warm_start=payload.warm_start,
        hyperparameters=payload.hyperparameters,
        user=request.user,
    )
    return Status(
        202,
        {
            "version": job.version.number,
            "job_id": job.pk,
            "state": job.state,
            "warm_start_from": job.warm_start_from.number if job.warm_start_from_id else None,
        },
    )


# Listing and creating versions share one path, and a path belongs to one router.
@router.get("/tasks/{slug}/versions", response=list[VersionOut])
def list_versions(request: HttpRequest, slug: str):
    task = task_get(slug)
    versions = task.versions.select_related("parent").order_by("number")
    return [version_out(version, task.active_version_id) for version in versions]


@router.get("/jobs/{job_id}", response=JobOut)
def read_job(request: HttpRequest, job_id: int):
    return job_out(_job(job_id))


@router.post("/jobs/{job_id}/cancel", response=JobOut)
def cancel_job(request: HttpRequest, job_id: int):
    job = services.job_cancel(_job(job_id), user=request.user)
    return job_out(_job(job.pk))
