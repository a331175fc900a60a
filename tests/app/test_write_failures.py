"""A disk that fills up while an adapter is written leaves no partial version behind.

The fault is injected at the write itself: the save writes part of a file, then fails with
ENOSPC, as a full disk does.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from adapters_app.models import AdapterVersion
from adapters_app.roles import SYSTEM
from training_app import services
from training_app.models import TrainingJob
from tests.app.test_transfer import upload, zip_of
from tests.unit.test_serving_adapters import save_lora_adapter

pytestmark = pytest.mark.django_db


def disk_full(path: Path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def leftovers(root: Path) -> list[Path]:
    """Files, and folders other than empty task folders, under the adapter root."""
    if not root.exists():
        return []
    return [path for path in root.rglob("*") if path.is_file() or any(path.iterdir())]


def test_trainer_full_disk_leaves_nothing(task, jsonl_file, good_rows, settings, monkeypatch):
    from peft import PeftModel

    with jsonl_file(good_rows).open("rb") as handle:
        dataset = services.dataset_upload(task, handle, original_name="data.jsonl", user=SYSTEM).dataset
    job = services.training_start(
        task, dataset_ids=[dataset.pk], hyperparameters={"rank": 2, "max_steps": 2, "batch_size": 4}, user=SYSTEM, enqueue=False
    )

    def save_half(self, save_directory, **kwargs):
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_model.safetensors").write_bytes(b"\0" * 64)
        raise disk_full(folder / "adapter_model.safetensors")

    monkeypatch.setattr(PeftModel, "save_pretrained", save_half)
    services.training_run(job.pk)

    job.refresh_from_db()
    assert job.state == TrainingJob.State.FAILED
    assert "No space left on device" in job.error
    assert AdapterVersion.objects.get(pk=job.version_id).status == AdapterVersion.Status.FAILED
    assert AdapterVersion.objects.get(pk=job.version_id).storage_path == ""
    assert leftovers(Path(settings.LORAWEB_ADAPTER_ROOT)) == []


def test_import_full_disk_leaves_nothing(api_client, task, tiny_base_dir, tmp_path, settings, monkeypatch):
    from adapters_app import transfer

    folder = save_lora_adapter(tiny_base_dir, tmp_path / "adapter", rank=4, target_modules=["c_attn"], seed=3)
    content = zip_of({name: (folder / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")})

    def copy_half(source, destination: Path, budget: int) -> int:
        data = source.read()
        destination.write_bytes(data[: len(data) // 2])
        raise disk_full(destination)

    monkeypatch.setattr(transfer, "_copy_limited", copy_half)
    response = upload(api_client, task.slug, "adapter.zip", content)

    assert response.status_code == 507, response.content
    assert response.json()["errors"][0]["code"] == "storage_full"
    assert "No space left on device" in response.content.decode()
    assert not AdapterVersion.objects.exists()
    assert leftovers(Path(settings.LORAWEB_ADAPTER_ROOT)) == []
