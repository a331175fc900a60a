"""OpenAI-style completions served in-process by the engine on the tiny base."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.django_db


def read_stream(response) -> str:
    """Return the whole body of a streaming response, whose content may be an async iterator."""
    from asgiref.sync import async_to_sync

    async def collect() -> list[bytes]:
        return [chunk async for chunk in response.streaming_content]

    if hasattr(response.streaming_content, "__aiter__"):
        return b"".join(async_to_sync(collect)()).decode()
    return b"".join(response.streaming_content).decode()


def test_task_without_version_uses_bare_base(api_client, task):
    body = {"model": "poetry", "prompt": "Roses are red", "max_tokens": 5, "temperature": 0}
    response = api_client.post("/v1/completions", body, content_type="application/json")

    assert response.status_code == 200, response.content
    data = response.json()
    assert data["object"] == "text_completion"
    assert data["model"] == "poetry"
    assert data["loraweb"]["version"] is None
    assert data["usage"]["completion_tokens"] <= 5
    assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + data["usage"]["completion_tokens"]


def test_stream_matches_plain_answer(api_client, task):
    body = {"model": "poetry", "prompt": "Roses are red", "max_tokens": 6, "temperature": 0}
    plain = api_client.post("/v1/completions", body, content_type="application/json").json()

    response = api_client.post("/v1/completions", {**body, "stream": True}, content_type="application/json")
    assert response["Content-Type"] == "text/event-stream"
    events = [line[len("data: "):] for line in read_stream(response).splitlines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == plain["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]


def test_max_tokens_above_limit_rejected(api_client, task, settings):
    settings.LORAWEB_MAX_NEW_TOKENS = 8
    body = {"model": "poetry", "prompt": "x", "max_tokens": 9}
    response = api_client.post("/v1/completions", body, content_type="application/json")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "max_tokens_too_large"
    assert "9" in response.json()["error"]["message"]


def test_unready_pinned_version_rejected(api_client, task):
    from adapters_app.services import version_allocate

    version_allocate(task, parent=None, hyperparameters={})
    response = api_client.post("/v1/completions", {"model": "poetry@v1", "prompt": "x"}, content_type="application/json")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "version_not_ready"


def test_models_list_tasks(api_client, task):
    data = api_client.get("/v1/models").json()
    assert data["object"] == "list"
    assert [model["id"] for model in data["data"]] == ["poetry"]
    assert data["data"][0]["active_version"] is None
