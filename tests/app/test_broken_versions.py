"""A version whose adapter file is damaged becomes broken and is refused, never served by the bare base."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from adapters_app.models import AdapterVersion, AuditEvent
from adapters_app.roles import SYSTEM
from adapters_app.services import ServiceError, task_create, version_activate
from tests.app.test_transfer import ready_version_from
from tests.unit.test_serving_adapters import save_lora_adapter

pytestmark = pytest.mark.django_db

GREEDY = {"prompt": "Roses are red", "max_tokens": 4, "temperature": 0}


@pytest.fixture(autouse=True)
def cold_cache():
    """Start each test with no adapter in memory, so the first request reads the files."""
    from adapters_app.inference import get_engine

    get_engine().cache.clear()
    yield
    get_engine().cache.clear()


@pytest.fixture
def adapter_folder(tiny_base_dir, tmp_path) -> Path:
    return save_lora_adapter(tiny_base_dir, tmp_path / "adapter", rank=4, target_modules=["c_attn"], seed=5)


@pytest.fixture
def two_tasks(task, adapter_folder, settings):
    """Tasks poetry and prose, each served by an active v1."""
    prose = task_create(slug="prose", name="Prose", user=SYSTEM)
    versions = {}
    for each in (task, prose):
        version = ready_version_from(each, adapter_folder, settings)
        version_activate(version, reason="first version", user=SYSTEM)
        versions[each.slug] = version
    return versions


def corrupt(version: AdapterVersion) -> None:
    """Flip one byte in the middle of the weights file, as a failing disk would."""
    path = version.adapter_dir() / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def complete(api_client, model: str):
    return api_client.post("/v1/completions", {"model": model, **GREEDY}, content_type="application/json")


def test_corrupt_adapter_breaks_only_its_task(api_client, two_tasks):
    corrupt(two_tasks["poetry"])

    first = complete(api_client, "poetry")
    other = complete(api_client, "prose")
    again = complete(api_client, "poetry")

    assert first.status_code == 409, first.content
    assert first.json()["error"]["code"] == "version_broken"
    message = first.json()["error"]["message"]
    assert "poetry" in message
    assert "v1" in message
    assert "roll" in message
    assert other.status_code == 200, other.content
    assert other.json()["loraweb"]["version"] == 1
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "version_broken"

    version = AdapterVersion.objects.get(pk=two_tasks["poetry"].pk)
    assert version.status == AdapterVersion.Status.BROKEN
    assert "sha256" in version.broken_reason
    assert version.broken_at is not None
    assert AdapterVersion.objects.get(pk=two_tasks["prose"].pk).status == AdapterVersion.Status.READY
    event = AuditEvent.objects.get(action="version.broken")
    assert event.object_repr == "poetry@v1"
    assert event.details["active"] is True


def test_truncated_adapter_refused_by_version_name_and_playground(api_client, client, user, two_tasks):
    path = two_tasks["poetry"].adapter_dir() / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])

    pinned = complete(api_client, "poetry@v1")
    client.force_login(user)
    page = client.post("/playground/", {"task": "poetry", "prompt": "Roses", "max_tokens": 3, "temperature": 0, "top_p": 1})

    assert pinned.status_code == 409
    assert pinned.json()["error"]["code"] == "version_broken"
    assert page.status_code == 200
    assert "is missing or damaged" in page.content.decode()
    assert AdapterVersion.objects.get(pk=two_tasks["poetry"].pk).is_broken


def test_broken_version_cannot_be_activated(task, adapter_folder, settings):
    version = ready_version_from(task, adapter_folder, settings)
    AdapterVersion.objects.filter(pk=version.pk).update(status=AdapterVersion.Status.BROKEN, broken_reason="test")

    with pytest.raises(ServiceError) as raised:
        version_activate(version, reason="try", user=SYSTEM)

    assert raised.value.code == "version_broken"
    assert "import the adapter again" in raised.value.message
    task.refresh_from_db()
    assert task.active_version_id is None


def test_dashboard_and_task_page_show_broken_active_version(client, user, two_tasks):
    AdapterVersion.objects.filter(pk=two_tasks["poetry"].pk).update(
        status=AdapterVersion.Status.BROKEN, broken_reason="Adapter weights file not found: x"
    )
    client.force_login(user)

    dashboard = client.get("/").content.decode()
    detail = client.get("/tasks/poetry/").content.decode()

    assert 'class="badge broken"' in dashboard
    assert 'id="active-broken"' in detail
    assert "Adapter weights file not found: x" in detail


def test_verify_adapters_marks_damaged_and_restores_repaired(two_tasks, capsys):
    weights = two_tasks["poetry"].adapter_dir() / "adapter_model.safetensors"
    original = weights.read_bytes()
    corrupt(two_tasks["poetry"])

    with pytest.raises(CommandError, match="1 versions are broken"):
        call_command("verify_adapters")
    broken_output = capsys.readouterr().out
    weights.write_bytes(original)
    call_command("verify_adapters")
    restored_output = capsys.readouterr().out

    assert "broken    poetry@v1" in broken_output
    assert "Checked 2 versions" in broken_output
    assert "restored  poetry@v1" in restored_output
    assert AdapterVersion.objects.get(pk=two_tasks["poetry"].pk).status == AdapterVersion.Status.READY
    assert AdapterVersion.objects.get(pk=two_tasks["prose"].pk).status == AdapterVersion.Status.READY
    assert list(AuditEvent.objects.order_by("pk").values_list("action", flat=True)) == ["version.broken", "version.restored"]


def test_verify_adapters_without_adapter_root(two_tasks, settings, tmp_path):
    settings.LORAWEB_ADAPTER_ROOT = tmp_path / "not-mounted"

    with pytest.raises(CommandError, match="does not exist"):
        call_command("verify_adapters")

    assert not AdapterVersion.objects.filter(status=AdapterVersion.Status.BROKEN).exists()
