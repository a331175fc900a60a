"""JSON API for datasets and training jobs (`/api/v1/`)."""

from __future__ import annotations

from datetime import datetime

from django.http import HttpRequest
from django.utils.translation import gettext as _
from ninja import File, Router, Schema, Status
from ninja.files import UploadedFile

from adapters_app.api import VersionOut, version_out
from adapters_app.services import NotFound, task_get

from . import services
from .messages import job_log_lines
from .models import Dataset, TrainingJob

router = Router(tags=["training"])


class DatasetOut(Schema):
    id: int
    task: str
    file_name: str
    format: str
    encoding: str
    sha256: str
    size_bytes: int
    num_examples: int
    num_train: int
    num_validation: int
    num_duplicates: int
    created: bool = False
    created_at: datetime


class TrainIn(Schema):
    dataset_ids: list[int]
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
    return {
        "id": dataset.pk,
        "task": dataset.task.slug,
        "file_name": dataset.original_name,
        "format": dataset.format,
        "encoding": dataset.encoding,
        "sha256": dataset.sha256,
        "size_bytes": dataset.size_bytes,
        "num_examples": dataset.num_examples,
        "num_train": dataset.num_train,
        "num_validation": dataset.num_validation,
        "num_duplicates": dataset.num_duplicates,
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


def _job(job_id: int) -> TrainingJob:
    job = TrainingJob.objects.select_related("task", "version", "warm_start_from").filter(pk=job_id).first()
    if job is None:
        raise NotFound(_("No training job with id %(id)s.") % {"id": job_id}, code="job_not_found")
    return job


@router.post("/tasks/{slug}/datasets", response={201: DatasetOut, 200: DatasetOut})
def upload_dataset(request: HttpRequest, slug: str, file: File[UploadedFile]):
    task = task_get(slug)
    outcome = services.dataset_upload(task, file, original_name=file.name or "dataset", user=request.user)
    return Status(201 if outcome.created else 200, dataset_out(outcome.dataset, outcome.created))


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
