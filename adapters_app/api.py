"""JSON API for tasks and versions (`/api/v1/`)."""

from __future__ import annotations

from datetime import datetime

from django.http import HttpRequest
from ninja import File, Router, Schema, Status
from ninja.files import UploadedFile
from pydantic import Field

from .models import AdapterVersion, Task, slug_validator
from .services import task_create, task_get, version_activate, version_get
from .transfer import UploadedPart, export_response, version_import

router = Router(tags=["tasks"])


# The services check these rules and reject with translated messages; the schema only
# documents them, so that clients built from it send valid values.
class TaskIn(Schema):
    slug: str = Field(json_schema_extra={"pattern": slug_validator.regex.pattern, "maxLength": 64})
    name: str = Field("", json_schema_extra={"maxLength": 200})
    description: str = ""


class TaskOut(Schema):
    slug: str
    name: str
    description: str
    base_model: str
    active_version: int | None
    created_at: datetime


class VersionOut(Schema):
    version: int
    status: str
    parent: int | None
    active: bool
    hyperparameters: dict
    metrics: dict
    promotion_note: str
    base_model: str
    base_weight_hash: str
    sha256: str
    size_bytes: int | None
    created_at: datetime
    ready_at: datetime | None


class ActivateIn(Schema):
    version: int
    # A reason needs at least one character that is not a space (checked by version_activate).
    reason: str = Field(json_schema_extra={"pattern": r"\S"})


class ActivateOut(Schema):
    task: str
    version: int
    previous_version: int | None
    changed: bool
    message: str


def task_out(task: Task) -> dict:
    return {
        "slug": task.slug,
        "name": task.name,
        "description": task.description,
        "base_model": task.base_model_id,
        "active_version": task.active_version.number if task.active_version_id else None,
        "created_at": task.created_at,
    }


def version_out(version: AdapterVersion, active_id: int | None) -> dict:
    return {
        "version": version.number,
        "status": version.status,
        "parent": version.parent.number if version.parent_id else None,
        "active": version.pk == active_id,
        "hyperparameters": version.hyperparameters,
        "metrics": version.metrics,
        "promotion_note": version.promotion_message(),
        "base_model": version.base_model_id,
        "base_weight_hash": version.base_weight_hash,
        "sha256": version.sha256,
        "size_bytes": version.size_bytes,
        "created_at": version.created_at,
        "ready_at": version.ready_at,
    }


@router.post("/tasks", response={201: TaskOut})
def create_task(request: HttpRequest, payload: TaskIn):
    task = task_create(slug=payload.slug, name=payload.name, description=payload.description, user=request.user)
    return Status(201, task_out(task))


@router.get("/tasks", response=list[TaskOut])
def list_tasks(request: HttpRequest):
    return [task_out(task) for task in Task.objects.select_related("active_version")]


@router.get("/tasks/{slug}", response=TaskOut)
def read_task(request: HttpRequest, slug: str):
    return task_out(task_get(slug))


@router.delete("/tasks/{slug}", response={204: None})
def delete_task(request: HttpRequest, slug: str, reason: str = ""):
    """Delete the task with its versions, datasets, jobs and files; needs the maintainer role."""
    # The task's datasets and jobs are training_app rows, so the service lives there.
    from training_app.deletion import task_delete

    task_delete(task_get(slug), user=request.user, reason=reason)
    return Status(204, None)


# Registered before the `{number}` route, which would otherwise match "import".
@router.post("/tasks/{slug}/versions/import", response={201: VersionOut})
def import_version(request: HttpRequest, slug: str, file: File[UploadedFile]):
    task = task_get(slug)
    version = version_import(task, [UploadedPart(file.name or "adapter.zip", file)], user=request.user)
    task.refresh_from_db()
    return Status(201, version_out(version, task.active_version_id))


@router.get("/tasks/{slug}/versions/{number}", response=VersionOut)
def read_version(request: HttpRequest, slug: str, number: int):
    task = task_get(slug)
    return version_out(version_get(task, number), task.active_version_id)


@router.get("/tasks/{slug}/versions/{number}/export")
def export_version(request: HttpRequest, slug: str, number: int):
    version = version_get(task_get(slug), number)
    return export_response(version, user=request.user)


@router.post("/tasks/{slug}/activate", response=ActivateOut)
def activate(request: HttpRequest, slug: str, payload: ActivateIn):
    version = version_get(task_get(slug), payload.version)
    result = version_activate(version, reason=payload.reason, user=request.user)
    return {
        "task": result.task.slug,
        "version": result.current.number,
        "previous_version": result.previous.number if result.previous else None,
        "changed": result.changed,
        "message": result.message,
    }
