"""Deleting tasks and datasets: confirmation, maintainer role, audit record, and only unreferenced files."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from adapters_app.models import AdapterVersion, AuditEvent, Task
from adapters_app.roles import SYSTEM
from adapters_app.services import ServiceError, task_create
from tests.app.test_transfer import ready_version_from
from tests.unit.test_serving_adapters import save_lora_adapter
from training_app import services
from training_app.deletion import task_delete
from training_app.models import Dataset

pytestmark = pytest.mark.django_db


def pairs(count: int, prefix: str = "") -> bytes:
    rows = [json.dumps({"prompt": f"{prefix}Say {index}", "completion": f"number {index}"}) for index in range(count)]
    return ("\n".join(rows) + "\n").encode()


@pytest.fixture
def adapter_folder(tiny_base_dir, tmp_path) -> Path:
    return save_lora_adapter(tiny_base_dir, tmp_path / "adapter", rank=2, target_modules=["c_attn"], seed=7)


@pytest.fixture
def two_tasks(task, adapter_folder, settings):
    """poetry and prose, each with a dataset and a ready v1; poetry's v1 is active."""
    from adapters_app.services import version_activate

    prose = task_create(slug="prose", name="Prose", user=SYSTEM)
    for each in (task, prose):
        services.dataset_upload(each, io.BytesIO(pairs(20, each.slug)), original_name="data.jsonl", user=SYSTEM)
        ready_version_from(each, adapter_folder, settings)
    version_activate(task.versions.get(number=1), reason="first", user=SYSTEM)
    return task, prose


def files_under(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file()) if folder.exists() else []


def test_task_delete_page_removes_own_files(
    client, user, two_tasks, settings, django_capture_on_commit_callbacks
):
    poetry, prose = two_tasks
    adapters = Path(settings.LORAWEB_ADAPTER_ROOT)
    prose_files = files_under(adapters / "prose") + [services.dataset_path(prose.datasets.get())]
    client.force_login(user)

    confirm = client.get("/tasks/poetry/delete")
    wrong = client.post("/tasks/poetry/delete", {"confirm_slug": "prose", "reason": "cleanup"})
    with django_capture_on_commit_callbacks(execute=True):
        done = client.post("/tasks/poetry/delete", {"confirm_slug": "poetry", "reason": "cleanup"})

    assert confirm.status_code == 200
    assert 'id="confirm-delete"' in confirm.content.decode()
    assert wrong.status_code == 200
    assert "is not the slug of this task" in wrong.content.decode()
    assert done.status_code == 302
    assert not Task.objects.filter(slug="poetry").exists()
    assert not AdapterVersion.objects.filter(task__slug="poetry").exists()
    assert not (adapters / "poetry").exists()
    assert all(path.is_file() for path in prose_files)
    assert len(files_under(Path(settings.MEDIA_ROOT))) == 2  # prose's uploaded and prepared files
    event = AuditEvent.objects.get(action="task.delete")
    assert (event.object_repr, event.actor_username, event.reason) == ("poetry", user.username, "cleanup")
    assert event.details["versions"] == 1
    assert event.details["active_version"] == 1


def test_task_delete_needs_maintainer(trainer_user, client, two_tasks):
    with pytest.raises(ServiceError) as raised:
        task_delete(two_tasks[0], user=trainer_user)
    client.force_login(trainer_user)
    page = client.post("/tasks/poetry/delete", {"confirm_slug": "poetry"})

    assert raised.value.status_code == 403
    assert page.status_code == 403
    assert Task.objects.filter(slug="poetry").exists()
    assert not AuditEvent.objects.exists()


def test_task_delete_api(api_client, two_tasks, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        deleted = api_client.delete("/api/v1/tasks/prose?reason=retired")
    again = api_client.delete("/api/v1/tasks/prose")

    assert deleted.status_code == 204
    assert again.status_code == 404
    assert AuditEvent.objects.get(action="task.delete").reason == "retired"


def test_task_with_queued_job_is_not_deleted(two_tasks, monkeypatch):
    poetry = two_tasks[0]
    monkeypatch.setattr(services, "_enqueue", lambda job_id: None)
    services.training_start(poetry, dataset_ids=[poetry.datasets.get().pk], user=SYSTEM)

    with pytest.raises(ServiceError) as raised:
        task_delete(poetry, user=SYSTEM)

    assert raised.value.code == "task_busy"
    assert "v2" in raised.value.message
    assert Task.objects.filter(slug="poetry").exists()


def test_task_delete_keeps_folders_outside_its_own(two_tasks, settings, django_capture_on_commit_callbacks):
    poetry, prose = two_tasks
    prose_version = prose.versions.get(number=1)
    # A row pointing into another task's folder (a hand-edited database) must not delete that folder.
    AdapterVersion.objects.filter(task=poetry).update(storage_path=prose_version.storage_path)

    with django_capture_on_commit_callbacks(execute=True):
        task_delete(poetry, user=SYSTEM)

    assert (prose_version.adapter_dir() / "adapter_model.safetensors").is_file()


def test_dataset_delete_is_audited(task, maintainer_user, django_capture_on_commit_callbacks):
    dataset = services.dataset_upload(task, io.BytesIO(pairs(20)), original_name="spare.jsonl", user=SYSTEM).dataset

    with django_capture_on_commit_callbacks(execute=True):
        services.dataset_delete(dataset, user=maintainer_user, reason="duplicate")

    event = AuditEvent.objects.get(action="dataset.delete")
    assert event.object_repr == f"poetry/spare.jsonl (#{dataset.pk})"
    assert (event.actor, event.reason, event.details["sha256"]) == (maintainer_user, "duplicate", dataset.sha256)


def test_dataset_in_training_record_kept(task, adapter_folder, settings):
    dataset = services.dataset_upload(task, io.BytesIO(pairs(20)), original_name="scored.jsonl", user=SYSTEM).dataset
    version = ready_version_from(task, adapter_folder, settings)
    AdapterVersion.objects.filter(pk=version.pk).update(
        metrics={"record": {"datasets": [{"id": dataset.pk, "sha256": dataset.sha256, "split_seed": 0, "role": "validation"}]}}
    )

    with pytest.raises(ServiceError) as raised:
        services.dataset_delete(dataset, user=SYSTEM)

    assert raised.value.code == "dataset_in_use"
    assert "v1" in raised.value.message
    assert Dataset.objects.filter(pk=dataset.pk).exists()
    assert not AuditEvent.objects.exists()
