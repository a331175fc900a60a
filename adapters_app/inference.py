"""Serve prompts through a task's adapter: the Django side of the framework-free engine.

The engine (and with it torch) is created on first use, so processes that only render
dashboard pages never load the model.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from django.conf import settings
from django.utils.translation import gettext as _

from .base_model import current_base_choice
from .models import AdapterVersion, Task
from .services import ServiceError, model_name_resolve

if TYPE_CHECKING:
    from .serving.engine import Engine, GenerationResult

logger = logging.getLogger(__name__)

_engine: Engine | None = None
_engine_lock = threading.Lock()


def get_engine() -> Engine:
    """Return this process's engine, loading the base model on the first call only."""
    global _engine
    if _engine is not None:
        return _engine

    with _engine_lock:
        if _engine is None:
            from .serving.base import load_base_model
            from .serving.engine import Engine

            if settings.LORAWEB_TORCH_THREADS:
                import torch

                torch.set_num_threads(settings.LORAWEB_TORCH_THREADS)
            choice = current_base_choice()
            base = load_base_model(choice.path, device=settings.LORAWEB_DEVICE)
            _engine = Engine(
                base,
                cache_max_adapters=settings.LORAWEB_ADAPTER_CACHE_MAX_ADAPTERS,
                cache_max_bytes=settings.LORAWEB_ADAPTER_CACHE_MAX_BYTES,
            )
    return _engine


def reset_engine() -> None:
    """Drop the engine so the next request loads the base again (tests switch bases)."""
    global _engine
    with _engine_lock:
        _engine = None


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Completion:
    task: Task
    version: AdapterVersion | None
    result: GenerationResult

    @property
    def model_name(self) -> str:
        if self.version is None:
            return self.task.slug
        return f"{self.task.slug}@v{self.version.number}"


def version_key(version: AdapterVersion) -> str:
    # Versions are immutable once ready, so the primary key identifies the weights.
    return f"version-{version.pk}"


@dataclass(frozen=True)
class Admission:
    """A request whose task and version were resolved when it was admitted."""

    model: str
    task: Task
    version: AdapterVersion | None
    params: SamplingParams


def admit(model: str, params: SamplingParams) -> Admission:
    """Check limits and resolve `model` (`slug` or `slug@vN`) to the version that will answer.

    This is the only step that reads the database, so a rollback committed before it
    applies to this request, and generation itself may run on another thread.
    """
    if params.max_tokens > settings.LORAWEB_MAX_NEW_TOKENS:
        raise ServiceError(
            _("max_tokens is %(value)s but this server allows at most %(limit)s; ask for fewer tokens.")
            % {"value": params.max_tokens, "limit": settings.LORAWEB_MAX_NEW_TOKENS},
            code="max_tokens_too_large",
        )

    task, version = model_name_resolve(model)
    engine = get_engine()
    if version is not None and version.base_weight_hash and version.base_weight_hash != engine.base.weight_hash:
        raise ServiceError(
            _("%(version)s of %(task)s was trained on a different base model than the one loaded; retrain it on this base.")
            % {"version": version.label, "task": task.slug},
            code="base_mismatch",
            status_code=409,
        )
    return Admission(model=model, task=task, version=version, params=params)


def generate(admission: Admission, prompt: str, *, on_token: Callable[[str], None] | None = None) -> Completion:
    """Generate a completion for an admitted request with the adapter of its version."""
    from .serving.adapters import AdapterError
    from .serving.engine import GenerationError, GenerationRequest

    task, version, params = admission.task, admission.version, admission.params
    request = GenerationRequest(
        prompt=prompt,
        adapter_key=version_key(version) if version is not None else None,
        adapter_path=version.adapter_dir() if version is not None else None,
        adapter_sha256=version.sha256 if version is not None else None,
        max_new_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        seed=params.seed,
        stop=list(params.stop),
        on_token=on_token,
    )
    try:
        result = get_engine().generate_one(request)
    except GenerationError as error:
        raise ServiceError(str(error), code="invalid_generation_request") from error
    except AdapterError as error:
        # Never fall back to the bare base: the caller asked for this adapter.
        label = version.label if version else "base"
        logger.error("Adapter of %s %s rejected: %s", task.slug, label, error)
        raise ServiceError(
            _("The adapter of %(version)s could not be loaded: %(error)s") % {"version": label, "error": error},
            code="adapter_invalid",
            status_code=500,
        ) from error

    logger.info(
        "Completed %s for task %s version %s: %d tokens, cache %s",
        admission.model,
        task.slug,
        version.label if version else "base",
        result.completion_tokens,
        "hit" if result.cache_hit else "miss",
    )
    return Completion(task=task, version=version, result=result)


def complete(
    model: str,
    prompt: str,
    params: SamplingParams,
    *,
    on_token: Callable[[str], None] | None = None,
) -> Completion:
    """Admit and generate in one call, for callers that do not stream."""
    return generate(admit(model, params), prompt, on_token=on_token)
