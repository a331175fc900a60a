"""OpenAI-compatible completions API (`/v1/completions`, `/v1/models`).

`model` is a task slug (served by its active version) or `slug@vN` (a fixed version).
Responses follow OpenAI's shapes; loraweb adds a `loraweb` object with the version used.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from typing import Iterator

from django.http import HttpRequest, StreamingHttpResponse
from django.utils.translation import gettext as _
from ninja import Router, Schema
from pydantic import Field

from .inference import Admission, Completion, SamplingParams, admit, complete, generate
from .models import Task
from .services import ServiceError

router = Router(tags=["openai"])


class CompletionIn(Schema):
    model: str
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None


def _params(payload: CompletionIn) -> SamplingParams:
    if isinstance(payload.stop, list):
        stop = payload.stop
    elif payload.stop:
        stop = [payload.stop]
    else:
        stop = []
    return SamplingParams(
        max_tokens=payload.max_tokens,
        temperature=payload.temperature,
        top_p=payload.top_p,
        top_k=payload.top_k,
        seed=payload.seed,
        stop=tuple(stop),
    )


def _prompt(payload: CompletionIn) -> str:
    if isinstance(payload.prompt, str):
        return payload.prompt
    if len(payload.prompt) != 1:
        raise ServiceError(
            _("prompt is a list of %(count)s strings; send one prompt per request.") % {"count": len(payload.prompt)},
            code="multiple_prompts",
        )
    return payload.prompt[0]


def _extras(completion: Completion) -> dict:
    result = completion.result
    return {
        "task": completion.task.slug,
        "version": completion.version.number if completion.version else None,
        "cache_hit": result.cache_hit,
        "adapter_load_ms": round(result.adapter_load_ms, 3),
        "tokens_per_second": round(result.tokens_per_second, 2),
    }


@router.post("/completions")
def create_completion(request: HttpRequest, payload: CompletionIn):
    prompt = _prompt(payload)
    params = _params(payload)
    if payload.stream:
        # Admission errors (unknown model, limits) still get a plain HTTP error status.
        return _stream(admit(payload.model, params), prompt)

    completion = complete(payload.model, prompt, params)
    result = completion.result
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": completion.model_name,
        "choices": [{"text": result.text, "index": 0, "logprobs": None, "finish_reason": result.finish_reason}],
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        },
        "loraweb": _extras(completion),
    }


_DONE = object()


def _stream(admission: Admission, prompt: str) -> StreamingHttpResponse:
    """Stream server-sent events while a background thread generates."""
    pieces: queue.Queue = queue.Queue()
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())

    def produce() -> None:
        try:
            pieces.put(generate(admission, prompt, on_token=pieces.put))
        except ServiceError as error:
            pieces.put(error)
        finally:
            pieces.put(_DONE)

    def chunk(text: str, finish_reason: str | None, extras: dict | None = None) -> str:
        body = {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": admission.model,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}],
        }
        if extras is not None:
            body["loraweb"] = extras
        return f"data: {json.dumps(body)}\n\n"

    def events() -> Iterator[str]:
        threading.Thread(target=produce, name="completion-stream", daemon=True).start()
        while True:
            item = pieces.get()
            if item is _DONE:
                break
            if isinstance(item, ServiceError):
                yield f"data: {json.dumps({'error': {'message': item.message, 'type': 'invalid_request_error', 'code': item.code}})}\n\n"
            elif isinstance(item, Completion):
                yield chunk("", item.result.finish_reason, _extras(item))
            else:
                yield chunk(item, None)
        yield "data: [DONE]\n\n"

    response = StreamingHttpResponse(events(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


@router.get("/models")
def list_models(request: HttpRequest):
    data = []
    for task in Task.objects.select_related("active_version").prefetch_related("versions"):
        created = int(task.created_at.timestamp())
        data.append(
            {
                "id": task.slug,
                "object": "model",
                "created": created,
                "owned_by": "loraweb",
                "base_model": task.base_model_id,
                "active_version": task.active_version.number if task.active_version_id else None,
            }
        )
        for version in sorted(task.versions.all(), key=lambda item: item.number):
            if version.is_ready:
                data.append(
                    {
                        "id": f"{task.slug}@v{version.number}",
                        "object": "model",
                        "created": int(version.created_at.timestamp()),
                        "owned_by": "loraweb",
                        "base_model": version.base_model_id,
                        "parent": task.slug,
                    }
                )
    return {"object": "list", "data": data}
