"""export_archive and import_archive: a whole installation out and back, checked by sha256."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from adapters_app.inference import SamplingParams, complete
from adapters_app.models import ActivationEvent, AdapterVersion, AuditEvent, GoldenPrompt, Task
from adapters_app.roles import SYSTEM
from adapters_app.services import version_activate
from tests.app.test_transfer import ready_version_from
from tests.unit.test_serving_adapters import save_lora_adapter
from training_app import services
from training_app.models import Dataset, TrainingJob

pytestmark = pytest.mark.django_db

GREEDY = SamplingParams(max_tokens=6, temperature=0.0)


def pairs(count: int, prefix: str = "") -> bytes:
    rows = [json.dumps({"prompt": f"{prefix}Say {index}", "completion": f"number {index}"}) for index in range(count)]
    return ("\n".join(rows) + "\n").encode()


def hashes(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def installation(task, maintainer_user, tiny_base_dir, tmp_path, settings, django_capture_on_commit_callbacks):
    """Task poetry with a policy, a golden prompt, a trained-on dataset, an active v1 and a deleted dataset."""
    Task.objects.filter(pk=task.pk).update(auto_activate=False, min_improvement=0.25)
    GoldenPrompt.objects.create(task=task, prompt="Say 3", expected="number 3")
    dataset = services.dataset_upload(task, io.BytesIO(pairs(20)), original_name="pairs.jsonl", user=maintainer_user).dataset
    job = services.training_start(task, dataset_ids=[dataset.pk], user=maintainer_user, enqueue=False)
    folder = save_lora_adapter(tiny_base_dir, tmp_path / "adapter", rank=4, target_modules=["c_attn", "c_fc"], seed=11)
    # Stand in for the worker: the job's version gets its files and metrics.
    staged = ready_version_from(task, folder, settings, folder_name="v1-archive")
    AdapterVersion.objects.filter(pk=job.version_id).update(
        status=AdapterVersion.Status.READY,
        storage_path=staged.storage_path,
        sha256=staged.sha256,
        base_weight_hash=staged.base_weight_hash,
        metrics={
            "eval_loss": {dataset.eval_key: 1.5},
            "record": {"datasets": [{"id": dataset.pk, "sha256": dataset.sha256, "split_seed": 0, "role": "train and validation"}]},
        },
    )
    staged.delete()
    TrainingJob.objects.filter(pk=job.pk).update(state=TrainingJob.State.SUCCEEDED, progress=1.0)
    version_activate(AdapterVersion.objects.get(pk=job.version_id), reason="first version", user=maintainer_user)
    spare = services.dataset_upload(task, io.BytesIO(pairs(20, "x")), original_name="spare.jsonl", user=SYSTEM).dataset
    with django_capture_on_commit_callbacks(execute=True):
        services.dataset_delete(spare, user=maintainer_user, reason="not needed")
    return task


def wipe(settings, tmp_path: Path, name: str) -> None:
    """Stand in for a fresh machine: no rows, and empty media and adapter folders."""
    Task.objects.update(active_version=None)
    Task.objects.all().delete()
    AuditEvent.objects.all().delete()
    settings.MEDIA_ROOT = tmp_path / name / "media"
    settings.LORAWEB_ADAPTER_ROOT = tmp_path / name / "adapters"


def test_round_trip_restores_rows_files_output(installation, maintainer_user, settings, tmp_path):
    from adapters_app.inference import get_engine

    before_answer = complete("poetry", "Say 3", GREEDY).result.text
    before_files = {"media": hashes(Path(settings.MEDIA_ROOT)), "adapters": hashes(Path(settings.LORAWEB_ADAPTER_ROOT))}
    archive = tmp_path / "backup.zip"

    call_command("export_archive", str(archive))
    wipe(settings, tmp_path, "fresh")
    call_command("import_archive", str(archive))

    task = Task.objects.select_related("active_version", "created_by").get(slug="poetry")
    assert (task.auto_activate, task.min_improvement) == (False, 0.25)
    assert list(task.golden_prompts.values_list("prompt", "expected")) == [("Say 3", "number 3")]
    dataset = Dataset.objects.get()
    assert dataset.original_name == "pairs.jsonl"
    assert dataset.created_by == maintainer_user
    version = task.active_version
    assert version.number == 1
    assert version.status == AdapterVersion.Status.READY
    assert version.metrics["eval_loss"] == {dataset.eval_key: 1.5}
    assert version.metrics["record"]["datasets"][0]["id"] == dataset.pk
    job = TrainingJob.objects.get()
    assert (job.version, job.state, list(job.datasets.all())) == (version, TrainingJob.State.SUCCEEDED, [dataset])
    event = ActivationEvent.objects.get()
    assert (event.to_version, event.actor, event.reason) == (version, maintainer_user, "first version")
    audit = AuditEvent.objects.get()
    assert (audit.action, audit.actor, audit.reason) == ("dataset.delete", maintainer_user, "not needed")
    after_files = {"media": hashes(Path(settings.MEDIA_ROOT)), "adapters": hashes(Path(settings.LORAWEB_ADAPTER_ROOT))}
    assert after_files == before_files
    get_engine().cache.clear()
    assert complete("poetry", "Say 3", GREEDY).result.text == before_answer
    call_command("verify_adapters")


def test_changed_byte_rejects_import(installation, settings, tmp_path):
    archive = tmp_path / "backup.zip"
    call_command("export_archive", str(archive))
    tampered = tmp_path / "tampered.zip"
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(tampered, "w") as target:
        for info in source.infolist():
            content = source.read(info)
            if info.filename.endswith("adapter_model.safetensors"):
                content = content[:100] + bytes([content[100] ^ 1]) + content[101:]
                damaged = info.filename
            target.writestr(info, content)
    wipe(settings, tmp_path, "fresh")

    with pytest.raises(CommandError) as raised:
        call_command("import_archive", str(tampered))

    assert damaged in str(raised.value)
    assert "checksum" in str(raised.value)
    assert not Task.objects.exists()
    assert not Path(settings.MEDIA_ROOT).exists()
    assert not Path(settings.LORAWEB_ADAPTER_ROOT).exists()


def test_import_rejects_existing_tasks(installation, tmp_path):
    archive = tmp_path / "backup.zip"
    call_command("export_archive", str(archive))

    with pytest.raises(CommandError, match="already has 1 tasks"):
        call_command("import_archive", str(archive))

    assert Task.objects.count() == 1
