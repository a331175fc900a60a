"""Serving through Django: the scheduler behind the views, limits, rollback, preloading, roles."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from django.urls import reverse

from adapters_app.models import AdapterVersion
from adapters_app.roles import SYSTEM
from tests.unit.test_serving_adapters import save_lora_adapter

pytestmark = pytest.mark.django_db

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fresh_engine():
    """Drop the process's engine before and after the test, so settings changes apply to it."""
    from adapters_app.inference import reset_engine

    reset_engine()
    yield
    reset_engine()


@pytest.fixture(scope="module")
def adapter_sources(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("app_adapters")
    return [
        save_lora_adapter(tiny_base_dir, root / f"adapter-{seed}", rank=4, target_modules=["c_attn", "c_fc"], seed=seed)
        for seed in (51, 52)
    ]


def ready_version(task, source: Path, settings) -> AdapterVersion:
    """Register a copy of an adapter folder as the task's next ready version."""
    from adapters_app.inference import get_engine
    from adapters_app.serving.adapters import ADAPTER_WEIGHTS_NAME, file_sha256
    from adapters_app.services import version_allocate

    version = version_allocate(task, parent=None, hyperparameters={"rank": 4})
    target = Path(settings.LORAWEB_ADAPTER_ROOT) / task.slug / f"v{version.number}"
    shutil.copytree(source, target)
    version.status = AdapterVersion.Status.READY
    version.storage_path = str(target.relative_to(settings.LORAWEB_ADAPTER_ROOT))
    version.sha256 = file_sha256(target / ADAPTER_WEIGHTS_NAME)
    version.base_weight_hash = get_engine().base.weight_hash
    version.save()
    return version


def read_stream(response) -> str:
    from asgiref.sync import async_to_sync

    async def collect() -> list[bytes]:
        return [chunk async for chunk in response.streaming_content]

    return b"".join(async_to_sync(collect)()).decode()


def sse_events(response) -> list[str]:
    return [line[len("data: "):] for line in read_stream(response).splitlines() if line.startswith("data: ")]


def test_full_queue_returns_429(api_client, task, settings, fresh_engine):
    settings.LORAWEB_MAX_QUEUE = 0
    body = {"model": "poetry", "prompt": "Roses are red", "max_tokens": 3}

    response = api_client.post("/v1/completions", body, content_type="application/json")

    assert response.status_code == 429
    assert response["Retry-After"].isdigit()
    assert response.json()["error"]["code"] == "queue_full"


def test_stream_429_before_events(api_client, task, settings, fresh_engine):
    settings.LORAWEB_MAX_QUEUE = 0
    body = {"model": "poetry", "prompt": "Roses are red", "max_tokens": 3, "stream": True}

    response = api_client.post("/v1/completions", body, content_type="application/json")

    assert response.status_code == 429
    assert response["Content-Type"] == "application/json; charset=utf-8"


def test_prompt_over_context_rejected(api_client, task):
    body = {"model": "poetry", "prompt": " word" * 1000, "max_tokens": 64}

    response = api_client.post("/v1/completions", body, content_type="application/json")

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_generation_request"
    assert "1024 positions" in error["message"]


def test_timeout_returns_504(api_client, task, settings, fresh_engine):
    settings.LORAWEB_REQUEST_TIMEOUT_S = 0.001
    body = {"model": "poetry", "prompt": "Roses are red", "max_tokens": 200}

    response = api_client.post("/v1/completions", body, content_type="application/json")

    assert response.status_code == 504
    assert response.json()["error"]["code"] == "generation_timeout"


def test_rollback_during_streaming(api_client, task, settings, adapter_sources):
    from adapters_app.services import task_rollback, version_activate

    first = ready_version(task, adapter_sources[0], settings)
    second = ready_version(task, adapter_sources[1], settings)
    version_activate(second, reason="newer", user=SYSTEM)
    streamed_body = {"model": "poetry", "prompt": "Tell a long story", "max_tokens": 200, "temperature": 0, "stream": True}

    # The stream is admitted on v2 and keeps generating on the scheduler thread while the
    # rollback commits and a new request is admitted.
    streaming = api_client.post("/v1/completions", streamed_body, content_type="application/json")
    task_rollback(first, reason="v2 misbehaves", user=SYSTEM)
    after = api_client.post(
        "/v1/completions", {"model": "poetry", "prompt": "Hello", "max_tokens": 3}, content_type="application/json"
    )
    events = sse_events(streaming)

    assert streaming.status_code == 200
    assert after.status_code == 200, after.content
    assert after.json()["loraweb"]["version"] == 1
    final = json.loads(events[-2])
    assert events[-1] == "[DONE]"
    assert final["loraweb"]["version"] == 2
    assert final["choices"][0]["finish_reason"] in {"length", "stop"}


@pytest.mark.django_db(transaction=True)
def test_threads_for_many_tasks_complete(api_client, token, settings, adapter_sources):
    from django.test import Client

    from adapters_app.services import task_create

    slugs = []
    for index in range(4):
        task = task_create(slug=f"task-{index}", name=f"Task {index}", user=SYSTEM)
        if index % 2 == 0:
            ready_version(task, adapter_sources[index // 2 % 2], settings)
            from adapters_app.services import version_activate

            version_activate(task.versions.get(number=1), reason="first", user=SYSTEM)
        slugs.append(task.slug)
    results: dict[int, dict] = {}

    def call(index: int) -> None:
        client = Client(HTTP_AUTHORIZATION=f"Bearer {token}")
        body = {"model": slugs[index % 4], "prompt": f"Request {index}", "max_tokens": 4, "temperature": 0}
        response = client.post("/v1/completions", body, content_type="application/json")
        results[index] = {"status": response.status_code, "body": response.json()}

    threads = [threading.Thread(target=call, args=(index,)) for index in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    for index in range(12):
        assert results[index]["status"] == 200, results[index]
        expected_version = 1 if index % 2 == 0 else None
        assert results[index]["body"]["loraweb"]["version"] == expected_version
        assert results[index]["body"]["loraweb"]["task"] == slugs[index % 4]


def test_preload_loads_and_pins_active_versions(task, settings, adapter_sources, fresh_engine):
    from adapters_app.inference import get_engine, reset_engine, version_key
    from adapters_app.services import task_create, version_activate

    other = task_create(slug="other", name="Other", user=SYSTEM)
    pinned_version = ready_version(task, adapter_sources[0], settings)
    other_version = ready_version(other, adapter_sources[1], settings)
    version_activate(pinned_version, reason="first", user=SYSTEM)
    version_activate(other_version, reason="first", user=SYSTEM)
    settings.LORAWEB_PINNED_TASKS = ["poetry"]
    reset_engine()

    cache = get_engine().cache

    assert version_key(pinned_version) in cache
    assert version_key(other_version) in cache
    assert cache.stats().pinned == 1
    assert cache.stats().loads == 2


def test_pinned_task_follows_activation(api_client, task, settings, adapter_sources, fresh_engine):
    from adapters_app.inference import get_engine, version_key
    from adapters_app.services import version_activate

    settings.LORAWEB_PINNED_TASKS = ["poetry"]
    first = ready_version(task, adapter_sources[0], settings)
    second = ready_version(task, adapter_sources[1], settings)
    version_activate(first, reason="first", user=SYSTEM)
    body = {"model": "poetry", "prompt": "Hi", "max_tokens": 2}
    api_client.post("/v1/completions", body, content_type="application/json")
    version_activate(second, reason="second", user=SYSTEM)

    api_client.post("/v1/completions", body, content_type="application/json")

    # v2 is pinned in place of v1: one pin, and both still cached (v1 only became evictable).
    cache = get_engine().cache
    assert cache.stats().pinned == 1
    assert version_key(second) in cache
    assert version_key(first) in cache


def test_explicit_load_and_unload(task, settings, adapter_sources):
    from adapters_app.inference import adapter_load, adapter_unload, get_engine, version_key

    version = ready_version(task, adapter_sources[0], settings)

    assert adapter_load(version) is False
    assert adapter_load(version) is True
    assert version_key(version) in get_engine().cache
    assert adapter_unload(version) is True
    assert version_key(version) not in get_engine().cache


def test_corrupt_adapter_is_an_error_not_the_base(api_client, task, settings, adapter_sources):
    from adapters_app.serving.adapters import ADAPTER_WEIGHTS_NAME

    version = ready_version(task, adapter_sources[0], settings)
    weights = version.adapter_dir() / ADAPTER_WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-16] + b"\0" * 16)

    response = api_client.post(
        "/v1/completions", {"model": "poetry@v1", "prompt": "Hi", "max_tokens": 2}, content_type="application/json"
    )

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "version_broken"
    version.refresh_from_db()
    assert version.is_broken
    assert "sha256" in version.broken_reason


def test_playground_form_compares_versions(client, user, task, settings, adapter_sources):
    ready_version(task, adapter_sources[0], settings)
    client.force_login(user)
    form = {"task": "poetry", "prompt": "Roses", "max_tokens": "4", "temperature": "0", "top_p": "1", "compare": ["base", "1"]}

    response = client.post(reverse("adapters_app:playground"), form)

    assert response.status_code == 200
    answers = response.context["answers"]
    assert [label for label, _completion in answers] == ["poetry, bare base (no adapter)", "poetry v1"]
    assert answers[0][1].version is None
    assert answers[1][1].version.number == 1
    assert answers[1][1].result.completion_tokens == 4


def test_playground_stream_sends_events(client, user, task, settings, adapter_sources):
    ready_version(task, adapter_sources[0], settings)
    client.force_login(user)
    form = {"task": "poetry", "prompt": "Roses", "max_tokens": "5", "temperature": "0", "top_p": "1", "compare": ["base", "1"]}

    response = client.post(reverse("adapters_app:playground_stream"), form)
    events = [json.loads(event) for event in sse_events(response)]

    assert response["Content-Type"] == "text/event-stream"
    assert events[0]["type"] == "start"
    assert [answer["version"] for answer in events[0]["answers"]] == [None, "v1"]
    done = {event["index"]: event for event in events if event["type"] == "done"}
    assert set(done) == {0, 1}
    for index in (0, 1):
        streamed = "".join(event["text"] for event in events if event["type"] == "token" and event["index"] == index)
        assert streamed == done[index]["text"]
        assert done[index]["completion_tokens"] <= 5
    assert done[1]["cache_hit"] in {True, False}
    assert events[-1] == {"type": "end"}


def test_playground_stream_needs_login(client, task):
    response = client.post(reverse("adapters_app:playground_stream"), {"task": "poetry", "prompt": "x"})

    assert response.status_code == 401


def test_dashboard_role_refuses_generation(settings, task, fresh_engine):
    from adapters_app.inference import get_engine
    from adapters_app.services import ServiceError

    settings.LORAWEB_ROLE = "dashboard"

    with pytest.raises(ServiceError) as raised:
        get_engine()

    assert raised.value.status_code == 503
    assert raised.value.code == "inference_disabled"


ROLE_PROBE = """
import os, sys
import django
django.setup()
from django.test import Client
from django.urls import resolve, Resolver404
import loraweb.urls

def status(path):
    try:
        resolve(path)
    except Resolver404:
        return 404
    return 200

client = Client()
login = client.get("/accounts/login/").status_code if status("/accounts/login/") == 200 else 404
print({"login": login, "v1": status("/v1/models"), "stream": status("/playground/stream"),
       "healthz": client.get("/healthz").status_code, "torch": "torch" in sys.modules})
"""


@pytest.mark.parametrize(
    ("role", "expected"),
    [
        ("dashboard", {"login": 200, "v1": 404, "stream": 200, "healthz": 200, "torch": False}),
        ("inference", {"login": 404, "v1": 200, "stream": 200, "healthz": 200, "torch": False}),
        ("all", {"login": 200, "v1": 200, "stream": 200, "healthz": 200, "torch": False}),
    ],
)
def test_roles_mount_url_groups_without_torch(role, expected, tiny_base_dir):
    env = {
        **__import__("os").environ,
        "DJANGO_SETTINGS_MODULE": "loraweb.test_settings",
        "LORAWEB_ROLE": role,
        "LORAWEB_BASE_MODEL": str(tiny_base_dir),
    }

    completed = subprocess.run(
        [sys.executable, "-c", ROLE_PROBE], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )

    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.strip().splitlines()[-1] == str(expected)


def test_closed_stream_cancels_request(task):
    from asgiref.sync import async_to_sync

    from adapters_app.inference import SamplingParams, admit
    from adapters_app.playground import playground_events, playground_stream_start

    admissions = [admit("poetry", SamplingParams(max_tokens=250))]

    async def read_then_disconnect():
        handles, events = await playground_stream_start(admissions, "A long story")
        stream = playground_events(admissions, handles, events)
        first = await stream.__anext__()
        await stream.aclose()  # what the ASGI server does when the client disconnects
        return first, handles[0]

    first, handle = async_to_sync(read_then_disconnect)()

    assert json.loads(first[len("data: "):])["type"] == "start"
    assert handle.cancel_requested
    with pytest.raises(Exception, match="cancelled"):
        handle.result(timeout=30)
