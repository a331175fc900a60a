"""The playground's generation: admit the chosen versions, run them as one batch, stream events.

The views stay thin: they validate the form, call these functions and render or stream.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

from django.utils.translation import gettext as _

from .forms import PlaygroundForm
from .inference import Admission, Completion, SamplingParams, admit, admit_base, asubmit, await_completion
from .serving.handles import AsyncEvents
from .services import ServiceError

if TYPE_CHECKING:
    from .serving.handles import GenerationHandle

logger = logging.getLogger(__name__)


def playground_admissions(form: PlaygroundForm) -> list[Admission]:
    """Admit the form's request: one per checked compare choice, else the chosen version.

    Call after `form.is_valid()`. Reads the database, so async views call it through
    `sync_to_async`. Raises ServiceError as `admit` does.
    """
    params = SamplingParams(
        max_tokens=form.cleaned_data["max_tokens"],
        temperature=form.cleaned_data["temperature"],
        top_p=form.cleaned_data["top_p"],
    )
    task = form.cleaned_data["task"]
    targets = form.compare_targets()
    if not targets:
        return [admit(form.model_name(), params)]
    return [admit_base(task, params) if number is None else admit(f"{task.slug}@v{number}", params) for number in targets]


def playground_texts() -> dict[str, str]:
    """Return the translated texts that the playground's streaming script shows."""
    return {
        "served_by": _("Served by"),
        "cache": _("Adapter cache"),
        "hit": _("hit"),
        "miss": _("miss, loaded in %(ms)s ms"),
        "tokens": _("Tokens"),
        "tokens_per_second": _("tokens/s"),
        "finish": _("Finish reason"),
        "failed": _("Generation failed: %(error)s"),
        "empty": _("(no text: the model ended the answer at once)"),
    }


def answer_label(admission: Admission) -> str:
    """Return the heading of one answer column, e.g. "poetry v2"."""
    if admission.version is None:
        return _("%(task)s, bare base (no adapter)") % {"task": admission.task.slug}
    return f"{admission.task.slug} {admission.version.label}"


async def playground_answers(admissions: Sequence[Admission], prompt: str) -> list[Completion]:
    """Complete `prompt` through every admission in one batch and return the completions in order."""
    handles = await asubmit(admissions, prompt)
    return [await await_completion(admission, handle) for admission, handle in zip(admissions, handles)]


async def playground_stream_start(
    admissions: Sequence[Admission], prompt: str
) -> tuple[list[GenerationHandle], AsyncEvents]:
    """Submit `prompt` through every admission in one batch, with their tokens sent to events."""
    events = AsyncEvents()
    handles = await asubmit(admissions, prompt, on_tokens=[events.on_token(index) for index in range(len(admissions))])
    for index, handle in enumerate(handles):
        events.watch(index, handle)
    return handles, events


def _event(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


async def playground_events(
    admissions: Sequence[Admission], handles: Sequence[GenerationHandle], events: AsyncEvents
) -> AsyncIterator[str]:
    """Yield the playground's server-sent events until every answer is done.

    Events are JSON objects: one "start" listing the answer columns, "token" pieces, one "done"
    (with the version, cache hit, load time and tokens/s) or "error" per answer, then "end".
    """
    columns = [
        {"index": index, "label": answer_label(admission), "version": admission.version.label if admission.version else None}
        for index, admission in enumerate(admissions)
    ]
    try:
        yield _event({"type": "start", "answers": columns})
        remaining = len(admissions)
        while remaining:
            kind, index, payload = await events.get()
            if kind == "token":
                yield _event({"type": "token", "index": index, "text": payload})
                continue
            remaining -= 1
            try:
                completion = await await_completion(admissions[index], payload)
            except ServiceError as error:
                yield _event({"type": "error", "index": index, "message": error.message})
                continue
            result = completion.result
            yield _event(
                {
                    "type": "done",
                    "index": index,
                    "text": result.text,
                    "finish_reason": result.finish_reason,
                    "completion_tokens": result.completion_tokens,
                    "tokens_per_second": round(result.tokens_per_second, 1),
                    "cache_hit": result.cache_hit,
                    "adapter_load_ms": round(result.adapter_load_ms, 1),
                }
            )
        yield _event({"type": "end"})
    finally:
        # The browser went away (the server closes this generator) or every answer is done;
        # cancelling a finished request does nothing.
        for handle in handles:
            handle.cancel()
