"""OpenAI-compatible completions API (`/v1/completions`, `/v1/models`).

`model` is a task slug (served by its active version) or `slug@vN` (a fixed version).
Responses follow OpenAI's shapes; loraweb adds a `loraweb` object with the version used.
The completions view is async: under ASGI it awaits the scheduler thread instead of holding
one of Django's threads while tokens are generated.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated

from django.http import HttpRequest, StreamingHttpResponse
from django.utils.translation import gettext as _
from ninja import Router, Schema
from pydantic import Field

from loraweb.ratelimit import arate_limit_check, user_identity

from .inference import Admission, Completion, SamplingParams, aadmit, asubmit, await_completion
from .models import Task
from .serving.handles import AsyncEvents
from .services import ServiceError

if TYPE_CHECKING:
    from .serving.scheduler import GenerationHandle

router = Router(tags=["openai"])


class CompletionIn(Schema):
    model: str
    # The schema documents what the server checks with its own messages: a prompt has a character
    # that is not a space, and a list contains exactly one prompt.
    prompt: Annotated[str, Field(json_schema_extra={"pattern": r"\S"})] | Annotated[
        list[Annotated[str, Field(json_schema_extra={"pattern": r"\S"})]],
        Field(json_schema_extra={"minItems": 1, "maxItems": 1}),
    ]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(None, json_schema_extra={"minimum": 0, "maximum": 2**63 - 1})
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


def _completion_body(completion: Completion) -> dict:
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


@router.post("/completions")
async def create_completion(request: HttpRequest, payload: CompletionIn):
    """Answer one prompt; generation runs on the scheduler thread while this view only awaits."""
    await arate_limit_check("completions", user_identity(request.auth))
    prompt = _prompt(payload)
    params = _params(payload)
    admission = await aadmit(payload.model, params)

    # Submitting validates the prompt, loads the adapter and checks the queue, so those errors
    # still get a plain HTTP error status when streaming.
    events = AsyncEvents()
    handles = await asubmit([admission], prompt, on_tokens=[events.on_token(0) if payload.stream else None])
    if payload.stream:
        events.watch(0, handles[0])
        return _stream(admission, handles[0], events)

    return _completion_body(await await_completion(admission, handles[0]))


def _stream(admission: Admission, handle: GenerationHandle, events: AsyncEvents) -> StreamingHttpResponse:
    """Stream server-sent events as the scheduler produces tokens."""
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())

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

    async def stream_events() -> AsyncIterator[str]:
        try:
            while True:
                kind, _index, payload = await events.get()
                if kind == "token":
                    yield chunk(payload, None)
                    continue
                try:
                    completion = await await_completion(admission, payload)
                except ServiceError as error:
                    error_body = {"error": {"message": error.message, "type": "server_error", "code": error.code}}
                    yield f"data: {json.dumps(error_body)}\n\n"
                else:
                    yield chunk("", completion.result.finish_reason, _extras(completion))
                break
            yield "data: [DONE]\n\n"
        finally:
            # The client disconnected (the server closes this generator) or the stream ended;
            # cancelling a finished request does nothing.
            handle.cancel()

    response = StreamingHttpResponse(stream_events(), content_type="text/event-stream")
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
