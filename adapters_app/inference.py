"""Serve prompts through a task's adapter: the Django side of the framework-free engine.

The engine (and with it torch) is created on first use, so processes that only render
dashboard pages never load the model. Every completion goes through one scheduler thread per
process, which batches concurrent requests; views submit and then wait (async views await).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError, connection
from django.utils.translation import gettext as _

from . import metrics
from .base_model import current_base_choice
from .models import AdapterVersion, Task
from .services import ServiceError, broken_version_error, model_name_resolve

if TYPE_CHECKING:
    from .serving.engine import Engine, GenerationRequest, GenerationResult, PreloadReport
    from .serving.handles import GenerationHandle
    from .serving.scheduler import Scheduler

logger = logging.getLogger(__name__)

_engine: Engine | None = None
_scheduler: Scheduler | None = None
_engine_lock = threading.Lock()
# Task slug -> version key pinned for it, so a pinned task's previous version can be unpinned.
_pinned_keys: dict[str, str] = {}
# The thread of `load_engine_in_background`, and the error of its load when it failed.
_engine_loader: threading.Thread | None = None
_engine_load_error: str | None = None


class TooManyRequests(ServiceError):
    """The generation queue is full; the client should retry after `retry_after_s` seconds."""

    status_code = 429

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message, code="queue_full")
        self.retry_after_s = retry_after_s


def get_engine() -> Engine:
    """Return this process's engine, loading the base model on the first call only.

    A process with LORAWEB_ROLE=dashboard never loads the model (nor imports torch), and
    raises ServiceError with status 503 instead.
    """
    global _engine, _scheduler
    if _engine is not None:
        return _engine
    if settings.LORAWEB_ROLE == "dashboard":
        raise ServiceError(
            _("This server only serves dashboard pages (LORAWEB_ROLE=dashboard); completions are served by the inference servers."),
            code="inference_disabled",
            status_code=503,
        )

    with _engine_lock:
        if _engine is None:
            from .serving.base import load_base_model, resolve_dtype
            from .serving.engine import Engine
            from .serving.scheduler import Scheduler

            if settings.LORAWEB_TORCH_THREADS:
                import torch

                torch.set_num_threads(settings.LORAWEB_TORCH_THREADS)
            choice = current_base_choice()
            device = settings.LORAWEB_DEVICE
            base = load_base_model(choice.path, device=device, dtype=resolve_dtype(settings.LORAWEB_DTYPE, device))
            engine = Engine(
                base,
                cache_max_adapters=settings.LORAWEB_ADAPTER_CACHE_MAX_ADAPTERS,
                cache_max_bytes=settings.LORAWEB_ADAPTER_CACHE_MAX_BYTES,
            )
            if settings.LORAWEB_PRELOAD_ADAPTERS:
                preload_active_versions(engine)
            _scheduler = Scheduler(
                engine,
                batch_window_ms=settings.LORAWEB_BATCH_WINDOW_MS,
                max_batch_size=settings.LORAWEB_MAX_BATCH_SIZE,
                max_queue=settings.LORAWEB_MAX_QUEUE,
                request_timeout_s=settings.LORAWEB_REQUEST_TIMEOUT_S,
            ).start()
            _engine = engine
            # Stop the scheduler thread before the interpreter tears torch down under it.
            atexit.register(_stop_at_exit)
    return _engine


def loaded_engine() -> tuple[Engine | None, Scheduler | None]:
    """Return this process's engine and scheduler if they are loaded, never loading them."""
    return _engine, _scheduler


def engine_state() -> str:
    """Return "ready", "loading", "failed" or "not_loaded", never loading the engine."""
    if _engine is not None:
        return "ready"
    if _engine_loader is not None and _engine_loader.is_alive():
        return "loading"
    if _engine_load_error is not None:
        return "failed"
    return "not_loaded"


def load_engine_in_background() -> threading.Thread:
    """Start loading the engine in a daemon thread and return it; inference servers call this at start.

    A failed load is logged and reported by `engine_state`. The next completion request, if
    one arrives, tries again.
    """
    global _engine_loader
    thread = threading.Thread(target=_load_engine_logged, name="engine-loader", daemon=True)
    _engine_loader = thread
    thread.start()
    return thread


def _load_engine_logged() -> None:
    global _engine_load_error
    from django.db import connections

    logger.info("Loading the base model in the background")
    try:
        get_engine()
    except Exception as error:  # noqa: BLE001 - any failure must show in readiness, not end a thread silently
        _engine_load_error = str(error)
        logger.exception("Loading the base model failed; /readyz reports this server as unavailable")
    else:
        _engine_load_error = None
        logger.info("Base model loaded")
    finally:
        # Preloading adapters opened a database connection in this thread, which ends now.
        connections.close_all()


def get_scheduler() -> Scheduler:
    """Return the scheduler that batches this process's completions, creating the engine if needed."""
    get_engine()
    assert _scheduler is not None
    return _scheduler


def reset_engine() -> None:
    """Stop the scheduler and drop the engine, so the next request loads the base again (tests switch bases)."""
    global _engine, _scheduler, _engine_load_error
    with _engine_lock:
        if _scheduler is not None:
            _scheduler.stop()
        _engine = None
        _scheduler = None
        _engine_load_error = None
        _pinned_keys.clear()


def _stop_at_exit() -> None:
    # Log handlers may already be closed at exit (pytest closes its capture streams), and
    # logging would then print an error for each message of the shutdown.
    logging.raiseExceptions = False
    reset_engine()


def preload_active_versions(engine: Engine) -> PreloadReport:
    """Load the active version of every task into the engine's cache, pinned tasks first and pinned.

    Runs when the engine is created. Versions trained on another base, or whose adapter fails
    to load, are skipped and logged; they fail again with a clear error when requested.
    """
    from .serving.engine import PreloadItem

    pinned = set(settings.LORAWEB_PINNED_TASKS)
    items = []
    versions: dict[str, AdapterVersion] = {}
    tasks = Task.objects.select_related("active_version").filter(active_version__isnull=False).order_by("slug")
    for task in tasks:
        version = task.active_version
        if not version.is_ready:
            continue
        if version.base_weight_hash and version.base_weight_hash != engine.base.weight_hash:
            logger.warning("Not preloading %s %s: trained on a different base", task.slug, version.label)
            continue
        is_pinned = task.slug in pinned
        if is_pinned:
            _pinned_keys[task.slug] = version_key(version)
        items.append(PreloadItem(key=version_key(version), path=version.adapter_dir(), sha256=version.sha256 or None, pinned=is_pinned))
        versions[version_key(version)] = version

    report = engine.preload(items)
    for key, error in report.errors.items():
        report_adapter_failure(versions[key], error)
    logger.info(
        "Preloaded %d adapters (%d skipped, cache full; %d failed)", len(report.loaded), len(report.skipped), len(report.failed)
    )
    return report


def adapter_load(version: AdapterVersion, *, pin: bool = False) -> bool:
    """Load a version's adapter into this process's cache now, and return whether it was cached already."""
    from .serving.adapters import AdapterError

    try:
        _adapter, hit = get_engine().load(version_key(version), version.adapter_dir(), version.sha256 or None, pin=pin)
    except AdapterError as error:
        if report_adapter_failure(version, error):
            raise broken_version_error(version) from error
        raise ServiceError(
            _("The adapter of %(version)s could not be loaded: %(error)s") % {"version": version.label, "error": error},
            code="adapter_invalid",
            status_code=500,
        ) from error
    return hit


def report_adapter_failure(version: AdapterVersion, error: BaseException) -> bool:
    """Mark `version` broken when serving found its files missing or damaged; return whether it is broken.

    The serving layer only raises; this is where its finding reaches the database. A missing
    file while the whole adapter root is missing is a storage outage, not damage, so nothing
    is marked then. Recording never hides the request's own error: a database failure here is
    logged and the request still fails with the adapter error.
    """
    from .integrity import adapter_root_available, version_mark_broken
    from .serving.adapters import AdapterFileError

    if not isinstance(error, AdapterFileError) or not (version.is_ready or version.is_broken):
        return False
    if error.missing and not adapter_root_available():
        logger.error("Adapter root %s is missing; not marking %s broken", settings.LORAWEB_ADAPTER_ROOT, version)
        return False
    try:
        version_mark_broken(version, str(error))
    except DatabaseError:
        logger.exception("Could not mark %s broken", version)
        return False
    return version.is_broken


def _report_submit_failure(admissions: Sequence[Admission], error: BaseException) -> ServiceError | None:
    """Record a damaged adapter found while submitting, and return the refusal for it (else None)."""
    key = getattr(error, "key", None)
    for admission in admissions:
        version = admission.version
        if version is not None and key == version_key(version) and report_adapter_failure(version, error):
            return broken_version_error(version, active="@" not in admission.model)
    return None


def adapter_unload(version: AdapterVersion) -> bool:
    """Drop a version's adapter (and its pin) from this process's cache; return whether it was loaded."""
    return get_engine().unload(version_key(version))


def _pin_if_configured(task: Task, version: AdapterVersion | None) -> None:
    """Keep a pinned task's active version loaded, and release the version it replaced."""
    if version is None or task.slug not in settings.LORAWEB_PINNED_TASKS:
        return
    key = version_key(version)
    previous = _pinned_keys.get(task.slug)
    if previous == key:
        return
    cache = get_engine().cache
    cache.pin(key)
    if previous is not None:
        cache.unpin(previous)
    _pinned_keys[task.slug] = key


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
    _check_max_tokens(params)

    task, version = model_name_resolve(model)
    engine = get_engine()
    if version is not None and version.base_weight_hash and version.base_weight_hash != engine.base.weight_hash:
        raise ServiceError(
            _("%(version)s of %(task)s was trained on a different base model than the one loaded; retrain it on this base.")
            % {"version": version.label, "task": task.slug},
            code="base_mismatch",
            status_code=409,
        )
    _pin_if_configured(task, version)
    return Admission(model=model, task=task, version=version, params=params)


def admit_base(task: Task, params: SamplingParams) -> Admission:
    """Admit a request for the bare base model of `task`, with no adapter (compare mode)."""
    _check_max_tokens(params)
    get_engine()
    return Admission(model=task.slug, task=task, version=None, params=params)


def _check_max_tokens(params: SamplingParams) -> None:
    if params.max_tokens > settings.LORAWEB_MAX_NEW_TOKENS:
        raise ServiceError(
            _("max_tokens is %(value)s but this server allows at most %(limit)s; ask for fewer tokens.")
            % {"value": params.max_tokens, "limit": settings.LORAWEB_MAX_NEW_TOKENS},
            code="max_tokens_too_large",
        )


def generation_request(admission: Admission, prompt: str, *, on_token: Callable[[str], None] | None = None) -> GenerationRequest:
    """Return the engine request for an admitted request and its prompt."""
    from .serving.engine import GenerationRequest

    version, params = admission.version, admission.params
    return GenerationRequest(
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


def submit(
    admissions: Sequence[Admission], prompt: str, *, on_tokens: Sequence[Callable[[str], None] | None] | None = None
) -> list[GenerationHandle]:
    """Queue `prompt` once per admission, to start in the same batch, and return the handles.

    Raises ServiceError for an invalid request (400), a bad adapter (500) or a full queue (429).
    Blocks while a cold adapter is read, so async callers run it in a worker thread.
    """
    try:
        return _submit_group(admissions, prompt, on_tokens)
    except Exception as error:
        raise _submit_failure(admissions, error, _report_submit_failure(admissions, error)) from error


def _submit_group(
    admissions: Sequence[Admission], prompt: str, on_tokens: Sequence[Callable[[str], None] | None] | None
) -> list[GenerationHandle]:
    callbacks = list(on_tokens) if on_tokens is not None else [None] * len(admissions)
    requests = [
        generation_request(admission, prompt, on_token=callback) for admission, callback in zip(admissions, callbacks)
    ]
    return get_scheduler().submit_group(requests)


def _submit_failure(admissions: Sequence[Admission], error: BaseException, refusal: ServiceError | None) -> ServiceError:
    failure = refusal or service_error_for(error, admissions[0])
    for admission in admissions:
        metrics.record_completion_failure(admission.task.slug, failure.code)
    return failure


def service_error_for(error: BaseException, admission: Admission) -> ServiceError:
    """Return the ServiceError that explains to the client why generation for `admission` failed.

    Re-raises errors that are not about generation, so bugs still surface as bugs.
    """
    from .serving.adapters import AdapterError
    from .serving.engine import GenerationError
    from .serving.handles import GenerationCancelled, GenerationTimeout, QueueFull, SchedulerStopped

    label = admission.version.label if admission.version else "base"
    if isinstance(error, ServiceError):
        return error
    if isinstance(error, QueueFull):
        logger.warning("Rejected a request for %s: %s", admission.model, error)
        return TooManyRequests(
            _("The server is busy: the generation queue is full. Retry in %(seconds)s s.") % {"seconds": error.retry_after_s},
            retry_after_s=error.retry_after_s,
        )
    if isinstance(error, GenerationTimeout):
        return ServiceError(
            _("Generation for %(model)s did not finish within the server's time limit; ask for fewer tokens or retry later.")
            % {"model": admission.model},
            code="generation_timeout",
            status_code=504,
        )
    if isinstance(error, (GenerationCancelled, SchedulerStopped)):
        return ServiceError(
            _("Generation for %(model)s was stopped before it finished; send the request again.") % {"model": admission.model},
            code="generation_stopped",
            status_code=503,
        )
    if isinstance(error, GenerationError):
        return ServiceError(str(error), code="invalid_generation_request")
    if isinstance(error, AdapterError):
        # Never fall back to the bare base: the caller asked for this adapter.
        logger.error("Adapter of %s %s rejected: %s", admission.task.slug, label, error)
        return ServiceError(
            _("The adapter of %(version)s could not be loaded: %(error)s") % {"version": label, "error": error},
            code="adapter_invalid",
            status_code=500,
        )
    raise error


def _failure(error: BaseException, admission: Admission) -> ServiceError:
    """Return the ServiceError for a failed generation (see service_error_for), counted in the metrics."""
    failure = service_error_for(error, admission)
    metrics.record_completion_failure(admission.task.slug, failure.code)
    return failure


def _completion(admission: Admission, result: GenerationResult) -> Completion:
    metrics.record_completion(admission.task.slug, result.elapsed_ms / 1000)
    logger.info(
        "Completed %s for task %s version %s: %d tokens, cache %s",
        admission.model,
        admission.task.slug,
        admission.version.label if admission.version else "base",
        result.completion_tokens,
        "hit" if result.cache_hit else "miss",
    )
    return Completion(task=admission.task, version=admission.version, result=result)


def generate(admission: Admission, prompt: str, *, on_token: Callable[[str], None] | None = None) -> Completion:
    """Generate a completion for an admitted request with the adapter of its version, and wait for it."""
    return generate_many([admission], prompt, on_tokens=[on_token])[0]


def generate_many(
    admissions: Sequence[Admission], prompt: str, *, on_tokens: Sequence[Callable[[str], None] | None] | None = None
) -> list[Completion]:
    """Complete `prompt` through each admission in one batch, and return the completions in order."""
    handles = submit(admissions, prompt, on_tokens=on_tokens)
    completions = []
    for admission, handle in zip(admissions, handles):
        try:
            result = handle.result()
        except Exception as error:
            raise _failure(error, admission) from error
        completions.append(_completion(admission, result))
    return completions


def complete(
    model: str,
    prompt: str,
    params: SamplingParams,
    *,
    on_token: Callable[[str], None] | None = None,
) -> Completion:
    """Admit and generate in one call, for callers that do not stream."""
    return generate(admit(model, params), prompt, on_token=on_token)


async def aadmit(model: str, params: SamplingParams) -> Admission:
    """`admit` for async views: the base model loads in a worker thread, the database query in Django's."""
    await asyncio.to_thread(get_engine)
    return await sync_to_async(admit)(model, params)


async def asubmit(
    admissions: Sequence[Admission], prompt: str, *, on_tokens: Sequence[Callable[[str], None] | None] | None = None
) -> list[GenerationHandle]:
    """`submit` for async views, in a worker thread because reading a cold adapter blocks.

    A damaged adapter is recorded through Django's thread for database work, the one every
    other query of the view uses. Once submitted, the requests only wait for tokens, so that
    thread's database connection is closed (see release_database_connection).
    """
    try:
        handles = await asyncio.to_thread(_submit_group, admissions, prompt, on_tokens)
    except Exception as error:
        refusal = await sync_to_async(_report_submit_failure)(admissions, error)
        raise _submit_failure(admissions, error, refusal) from error

    await sync_to_async(release_database_connection)()
    return handles


def release_database_connection() -> None:
    """Close the calling thread's database connection before a request waits for its tokens.

    Under ASGI, Django runs each request's database work in a thread of its own, so every
    request in flight keeps a connection until its response ends, for the whole generation.
    200 waiting completions then opened 200 PostgreSQL connections, over the server's default
    limit of 100, and the next requests failed with 500. A later query opens a new connection.
    """
    # Inside a transaction (ATOMIC_REQUESTS, or a test case) the connection must stay open.
    if not connection.in_atomic_block:
        connection.close()


async def await_completion(admission: Admission, handle: GenerationHandle) -> Completion:
    """Wait for a submitted request without blocking the event loop, and return its completion."""
    from .serving.handles import wait_for_result

    try:
        result = await wait_for_result(handle)
    except Exception as error:
        raise _failure(error, admission) from error
    return _completion(admission, result)
