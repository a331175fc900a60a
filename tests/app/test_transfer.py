"""Export a version as a PEFT zip and import external adapters, through the API."""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from adapters_app.models import AdapterVersion
from adapters_app.serving.adapters import file_sha256
from tests.unit.test_serving_adapters import save_lora_adapter

pytestmark = pytest.mark.django_db


def ready_version_from(task, folder: Path, settings, folder_name: str = "v1-test") -> AdapterVersion:
    """Register an adapter folder as a ready version of `task`, as training would."""
    from adapters_app.inference import get_engine
    from adapters_app.services import version_allocate

    target = Path(settings.LORAWEB_ADAPTER_ROOT) / task.slug / folder_name
    shutil.copytree(folder, target)
    version = version_allocate(task, parent=None, hyperparameters={"rank": 4})
    version.status = AdapterVersion.Status.READY
    version.storage_path = str(target.relative_to(settings.LORAWEB_ADAPTER_ROOT))
    version.sha256 = file_sha256(target / "adapter_model.safetensors")
    version.base_weight_hash = get_engine().base.weight_hash
    version.save()
    return version


@pytest.fixture
def adapter_folder(tiny_base_dir, tmp_path) -> Path:
    return save_lora_adapter(tiny_base_dir, tmp_path / "adapter", rank=4, target_modules=["c_attn", "c_fc"], seed=3)


def zip_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def upload(api_client, slug: str, name: str, content: bytes):
    from django.core.files.uploadedfile import SimpleUploadedFile

    return api_client.post(f"/api/v1/tasks/{slug}/versions/import", {"file": SimpleUploadedFile(name, content)})


def test_export_loads_in_plain_peft_with_same_logits(api_client, task, adapter_folder, tiny_base_dir, settings, tmp_path):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    from adapters_app.inference import get_engine
    from adapters_app.serving.adapters import read_adapter
    from adapters_app.serving.lora import build_batch_plan

    version = ready_version_from(task, adapter_folder, settings)
    response = api_client.get(f"/api/v1/tasks/{task.slug}/versions/1/export")
    assert response.status_code == 200
    assert response["Content-Disposition"].endswith('filename="poetry-v1.zip"')

    extracted = tmp_path / "extracted"
    with zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content))) as archive:
        assert {"adapter_config.json", "adapter_model.safetensors", "loraweb_version.json"} <= set(archive.namelist())
        archive.extractall(extracted)
    assert json.loads((extracted / "adapter_config.json").read_text())["base_model_name_or_path"] == task.base_model_id

    input_ids = torch.tensor([[464, 2068, 7586, 21831, 18045, 625]])
    peft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tiny_base_dir), extracted).eval()
    with torch.inference_mode():
        expected = peft_model(input_ids=input_ids).logits

    engine = get_engine()
    adapter = read_adapter(version.adapter_dir(), engine.base, key="export-check")
    with torch.inference_mode(), engine.hooks.activate(build_batch_plan([adapter], device="cpu", dtype=torch.float32)):
        actual = engine.base.model(input_ids=input_ids).logits
    assert torch.allclose(actual, expected, atol=1e-4, rtol=1e-5)


def test_import_zip_becomes_candidate_version(api_client, task, adapter_folder):
    content = zip_of(
        {
            "my-adapter/adapter_config.json": (adapter_folder / "adapter_config.json").read_bytes(),
            "my-adapter/adapter_model.safetensors": (adapter_folder / "adapter_model.safetensors").read_bytes(),
            "my-adapter/README.md": b"ignored",
        }
    )
    response = upload(api_client, task.slug, "adapter.zip", content)

    assert response.status_code == 201, response.content
    body = response.json()
    assert body["version"] == 1
    assert body["status"] == "ready"
    assert body["active"] is False
    version = AdapterVersion.objects.get(task=task, number=1)
    assert version.sha256 == file_sha256(adapter_folder / "adapter_model.safetensors")
    assert version.metrics["logit_change"] > 0
    assert (version.adapter_dir() / "adapter_model.safetensors").is_file()
    assert not (version.adapter_dir() / "README.md").exists()

    completion = api_client.post(
        "/v1/completions", {"model": "poetry@v1", "prompt": "Hello", "max_tokens": 3, "temperature": 0},
        content_type="application/json",
    )
    assert completion.status_code == 200
    assert completion.json()["loraweb"]["version"] == 1


def test_export_import_round_trip(api_client, task, adapter_folder, settings):
    ready_version_from(task, adapter_folder, settings)
    exported = b"".join(api_client.get(f"/api/v1/tasks/{task.slug}/versions/1/export").streaming_content)

    response = upload(api_client, task.slug, "poetry-v1.zip", exported)
    assert response.status_code == 201, response.content
    copy = AdapterVersion.objects.get(task=task, number=2)
    assert copy.sha256 == AdapterVersion.objects.get(task=task, number=1).sha256


def rejected(api_client, task, name: str, content: bytes) -> dict:
    response = upload(api_client, task.slug, name, content)
    assert response.status_code in (400, 413), response.content
    assert AdapterVersion.objects.filter(task=task).count() == 0
    return response.json()["errors"][0]


def adapter_files(folder: Path, **config_changes) -> dict[str, bytes]:
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(config_changes)
    return {
        "adapter_config.json": json.dumps(config).encode(),
        "adapter_model.safetensors": (folder / "adapter_model.safetensors").read_bytes(),
    }


def test_import_rejects_other_base(api_client, task, adapter_folder):
    files = adapter_files(adapter_folder, base_model_name_or_path="meta-llama/Llama-2-7b-hf")
    error = rejected(api_client, task, "a.zip", zip_of(files))
    assert error["code"] == "base_mismatch"
    assert "Llama-2-7b" in error["message"]


def test_import_rejects_unknown_modules(api_client, task, adapter_folder):
    files = adapter_files(adapter_folder, target_modules=["q_proj", "v_proj"])
    error = rejected(api_client, task, "a.zip", zip_of(files))
    assert error["code"] == "invalid_adapter"
    assert "q_proj" in error["message"]


def test_import_rejects_zero_update(api_client, task, tiny_base_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    # PEFT's default initialisation leaves B at zero: a valid file that changes nothing.
    model = get_peft_model(
        GPT2LMHeadModel.from_pretrained(tiny_base_dir),
        LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM"),
    )
    model.save_pretrained(tmp_path / "zero")
    error = rejected(api_client, task, "zero.zip", zip_of(adapter_files(tmp_path / "zero")))
    assert error["code"] == "zero_update"


def test_import_rejects_corrupt_weights(api_client, task, adapter_folder):
    files = adapter_files(adapter_folder)
    files["adapter_model.safetensors"] = files["adapter_model.safetensors"][:200]
    error = rejected(api_client, task, "a.zip", zip_of(files))
    assert error["code"] == "invalid_adapter"


def test_import_rejects_missing_weights_and_bad_zip(api_client, task, adapter_folder):
    files = adapter_files(adapter_folder)
    del files["adapter_model.safetensors"]
    assert rejected(api_client, task, "a.zip", zip_of(files))["code"] == "missing_adapter_file"
    assert rejected(api_client, task, "a.zip", b"not a zip at all")["code"] == "bad_zip"


def test_import_rejects_oversized_upload(api_client, task, adapter_folder, settings):
    settings.LORAWEB_MAX_ADAPTER_UPLOAD_BYTES = 1000
    response = upload(api_client, task.slug, "a.zip", zip_of(adapter_files(adapter_folder)))
    assert response.status_code == 413
    assert response.json()["errors"][0]["code"] == "adapter_too_large"
