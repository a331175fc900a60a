"""Batched text generation on the frozen base with a per-request LoRA adapter.

`Engine.generate` runs a list of requests as one left-padded batch with a shared KV cache, and
the scheduler (`serving/scheduler.py`) feeds the same batch primitives from a queue, admitting
new requests between decode steps. Each row uses its own adapter (or none) through the multi-LoRA
hooks, its own sampling settings and its own random generator, and leaves the batch when it
finishes. Rows never attend to each other, so the rest of the batch can change a row's logits
only by floating-point rounding in the batched kernels.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .adapters import AdapterCache, LoadedAdapter, read_adapter
from .base import BaseModel
from .batch import PreparedRequest, RunningBatch, row_result
from .lora import BatchPlan, MultiLoraHooks, build_batch_plan
from .prompting import format_prompt
from .sampling import (  # noqa: F401  (re-exported: callers import them from the engine)
    filter_top_k,
    filter_top_p,
    find_stop,
    sample_token,
    stop_prefix_length,
)

logger = logging.getLogger(__name__)

# Highest temperature a request may set. Sampling at 2.0 is already close to uniform noise.
MAX_TEMPERATURE = 2.0
MAX_SEED = 2**63 - 1


class GenerationError(ValueError):
    """A generation request is invalid, so nothing was generated."""


@dataclass
class GenerationRequest:
    """One prompt to complete, with the adapter and sampling settings to use.

    `adapter_key` is the immutable version key of the adapter (None runs the bare base), and
    `adapter_path` is its PEFT folder, read only when the key is not cached yet. `temperature`
    0 means greedy decoding. `top_k` 0 and `top_p` 1.0 disable those filters. `on_token` is
    called in the generating thread with each new piece of completion text, so it must return
    quickly. `ignore_eos` keeps decoding past end-of-text up to `max_new_tokens` (benchmarks
    use it for a fixed length). `timeout_s` bounds the time from submission to the last token
    when the request goes through the scheduler (None: the scheduler's default).
    """

    prompt: str
    adapter_key: str | None = None
    adapter_path: Path | None = None
    adapter_sha256: str | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    on_token: Callable[[str], None] | None = None
    ignore_eos: bool = False
    timeout_s: float | None = None


@dataclass(frozen=True)
class GenerationResult:
    """The completion of one request.

    `elapsed_ms` runs from the moment the request was prepared (tokenized, adapter loaded) to
    the moment its row finished, and `queued_ms` is the part spent waiting to join a batch.
    `completion_tokens` counts every token sampled, an end-of-text token and tokens cut off with
    a stop string included. `tokens_per_second` divides them by the time from the row's prefill
    to its finish.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of text or a stop string) or "length"
    adapter_key: str | None
    cache_hit: bool
    adapter_load_ms: float
    elapsed_ms: float
    tokens_per_second: float
    queued_ms: float = 0.0


def validate_request(request: GenerationRequest, prompt_tokens: int, max_positions: int) -> None:
    """Raise GenerationError naming the first invalid field of `request`."""
    if not request.prompt or not request.prompt.strip():
        raise GenerationError("prompt is empty. Enter some text to complete")

    max_new = request.max_new_tokens
    if not is_integer(max_new) or not 1 <= max_new <= max_positions:
        raise GenerationError(
            f"max_new_tokens={max_new!r} is invalid, expected an integer from 1 to {max_positions}"
        )
    if prompt_tokens + max_new > max_positions:
        raise GenerationError(
            f"The prompt has {prompt_tokens} tokens and max_new_tokens is {max_new}, "
            f"{prompt_tokens + max_new} in total, which exceeds the model's limit of "
            f"{max_positions} positions. Shorten the prompt or lower max_new_tokens"
        )

    temperature = request.temperature
    if not is_real(temperature) or not 0.0 <= temperature <= MAX_TEMPERATURE:
        raise GenerationError(
            f"temperature={temperature!r} is invalid, "
            f"expected a number from 0 to {MAX_TEMPERATURE} (0 = greedy)"
        )
    top_p = request.top_p
    if not is_real(top_p) or not 0.0 < top_p <= 1.0:
        raise GenerationError(
            f"top_p={top_p!r} is invalid, expected a number greater than 0 and at most 1"
        )
    top_k = request.top_k
    if not is_integer(top_k) or top_k < 0:
        raise GenerationError(
            f"top_k={top_k!r} is invalid, expected an integer of 0 (no limit) or more"
        )
    seed = request.seed
    if seed is not None and (not is_integer(seed) or not 0 <= seed <= MAX_SEED):
        raise GenerationError(f"seed={seed!r} is invalid, expected an integer from 0 to {MAX_SEED}")

    stops = request.stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise GenerationError(
            f"stop={stops!r} is invalid, expected a list of non-empty strings"
        )
    timeout = request.timeout_s
    if timeout is not None and (not is_real(timeout) or timeout <= 0):
        raise GenerationError(
            f"timeout_s={timeout!r} is invalid, expected a positive number of seconds"
        )
    if request.adapter_key is None and request.adapter_path is not None:
        raise GenerationError(
            f"adapter_path={str(request.adapter_path)!r} was given without an adapter_key. "
            "Set the adapter's version key"
        )
    if request.adapter_key is not None and not request.adapter_key:
        raise GenerationError("adapter_key is an empty string. Use None for the bare base model")


def is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class PreloadItem:
    """An adapter to load when the engine starts. Pinned ones are never evicted to make room."""

    key: str
    path: Path
    sha256: str | None = None
    pinned: bool = False


@dataclass(frozen=True)
class PreloadReport:
    """The outcome of `Engine.preload` for each item, by adapter key."""

    loaded: tuple[str, ...]
    skipped: tuple[str, ...]  # left out because the cache was full
    failed: dict[str, str]  # key -> error message
    # key -> the exception itself, so the caller can tell damaged files (AdapterFileError) apart.
    errors: dict[str, Exception] = field(default_factory=dict)


class Engine:
    """Serves generation requests on one frozen base, each through its own LoRA adapter.

    Adapters are read through `cache` (an AdapterCache keyed by the request's adapter_key) and
    applied by forward hooks, so the base weights never change. One forward pass runs at a time
    under `lock`, so `generate` and a scheduler thread may share the engine. `prepare`
    (tokenizing, validating, reading an adapter) needs no model lock and may run in any thread.
    """

    def __init__(
        self,
        base: BaseModel,
        *,
        cache_max_adapters: int = 32,
        cache_max_bytes: int = 512 * 1024 * 1024,
    ) -> None:
        self.base = base
        self.cache = AdapterCache(max_adapters=cache_max_adapters, max_bytes=cache_max_bytes)
        self.hooks = MultiLoraHooks(base.model)
        self.lock = threading.RLock()
        # A fast tokenizer must not be used from two threads at once.
        self._tokenizer_lock = threading.Lock()
        self.dtype: torch.dtype = next(base.model.parameters()).dtype
        self.eos_token_id = int(base.tokenizer.eos_token_id)
        pad_token_id = base.tokenizer.pad_token_id
        self.pad_token_id = int(pad_token_id) if pad_token_id is not None else self.eos_token_id
        self._last_plan: tuple[tuple[str | None, ...], BatchPlan] | None = None
        # GPT-2's output projection is the token embedding [vocab, hidden], read transposed.
        # A [hidden, vocab] copy projects a 16-row decode step in 35 ms instead of 46 ms on a
        # 2-core CPU, and one row twice as fast. It costs 154 MB more in float32.
        output_weight = base.model.get_output_embeddings().weight.detach()  # [vocab, hidden]
        self.output_projection_t = output_weight.t().contiguous()  # [hidden, vocab]
        self.output_bias = getattr(base.model.get_output_embeddings(), "bias", None)

    def close(self) -> None:
        """Remove the LoRA hooks from the base model and drop the cached adapters."""
        with self.lock:
            self.hooks.remove()
            self.cache.clear()
            self._last_plan = None

    def generate_one(self, request: GenerationRequest) -> GenerationResult:
        return self.generate([request])[0]

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Run all requests together as one batch and return their results in the same order.

        Raises GenerationError if any request is invalid (before any adapter is read) and
        AdapterError if an adapter cannot be read.
        """
        if not requests:
            return []

        prompt_ids = [self.encode(request.prompt) for request in requests]
        for request, ids in zip(requests, prompt_ids):
            validate_request(request, len(ids), self.base.max_positions)
        prepared = [self._prepare_validated(request, ids) for request, ids in zip(requests, prompt_ids)]

        started = time.perf_counter()
        with self.lock, torch.inference_mode():
            batch = RunningBatch(self)
            batch.prefill(prepared)
            finished = batch.drop_finished()
            while batch.rows:
                batch.step()
                finished.extend(batch.drop_finished())

        result_of = {id(row.prepared): row_result(row) for row in finished}
        results = [result_of[id(item)] for item in prepared]
        logger.info(
            "Generated %d requests (%d adapters) in %.0f ms: %d prompt and %d completion tokens",
            len(results),
            len({item.adapter_key for item in prepared if item.adapter_key is not None}),
            (time.perf_counter() - started) * 1000,
            sum(result.prompt_tokens for result in results),
            sum(result.completion_tokens for result in results),
        )
        return results

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Tokenize and validate `request` and load its adapter, without taking the model lock.

        Raises GenerationError for an invalid request and AdapterError for a bad adapter.
        """
        prompt_ids = self.encode(request.prompt)
        validate_request(request, len(prompt_ids), self.base.max_positions)
        return self._prepare_validated(request, prompt_ids)

    def load_adapter(self, request: GenerationRequest) -> tuple[LoadedAdapter, bool]:
        """Return the request's adapter from the cache, reading its folder on a miss."""
        key = request.adapter_key
        if key is None:
            raise GenerationError("The request has no adapter_key")
        if request.adapter_path is None:
            cached = self.cache.get(key)
            if cached is None:
                raise GenerationError(
                    f"Adapter {key} is not loaded and the request has no adapter_path to read it from"
                )
            return cached, True
        return self.load(key, request.adapter_path, request.adapter_sha256)

    def load(
        self, key: str, path: Path | str, sha256: str | None = None, *, pin: bool = False
    ) -> tuple[LoadedAdapter, bool]:
        """Load the adapter folder `path` under `key` unless it is cached, and return (adapter, hit).

        With `pin` the key is pinned first, so it stays loaded until `unload` or `unpin`.
        """
        if pin:
            self.cache.pin(key)

        def read() -> LoadedAdapter:
            return read_adapter(Path(path), self.base, key=key, expected_sha256=sha256)

        return self.cache.get_or_load(key, read)

    def unload(self, key: str) -> bool:
        """Drop the adapter `key` and its pin, and return whether it was loaded.

        Requests already in a batch keep their reference and finish on it.
        """
        return self.cache.evict(key)

    def preload(self, items: Iterable[PreloadItem]) -> PreloadReport:
        """Load adapters until the cache is full, pinned items first, and report what happened.

        An item is skipped, not loaded, when it would make the cache evict an adapter loaded
        here. The size check uses the safetensors file size as the estimate of the loaded size.
        A failing adapter is logged and reported, and the others still load.
        """
        ordered = sorted(items, key=lambda item: not item.pinned)
        loaded: list[str] = []
        skipped: list[str] = []
        failed: dict[str, str] = {}
        errors: dict[str, Exception] = {}
        for item in ordered:
            stats = self.cache.stats()
            if item.key not in self.cache and not item.pinned:
                estimate = estimated_adapter_bytes(item.path)
                if stats.count + 1 > stats.max_adapters or stats.bytes + estimate > stats.max_bytes:
                    skipped.append(item.key)
                    continue
            try:
                self.load(item.key, item.path, item.sha256, pin=item.pinned)
            except (ValueError, OSError) as error:
                # AdapterError and GenerationError are ValueErrors.
                logger.error("Preloading adapter %s from %s failed: %s", item.key, item.path, error)
                if item.pinned:
                    self.cache.unpin(item.key)
                failed[item.key] = str(error)
                errors[item.key] = error
                continue
            loaded.append(item.key)
        if skipped:
            logger.info("Adapter cache full after preloading %d adapters, skipped %d", len(loaded), len(skipped))
        return PreloadReport(loaded=tuple(loaded), skipped=tuple(skipped), failed=failed, errors=errors)

    def encode(self, prompt: str) -> list[int]:
        if not prompt:
            return []
        with self._tokenizer_lock:
            encoded = self.base.tokenizer(format_prompt(prompt), add_special_tokens=False)
        return list(encoded["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        with self._tokenizer_lock:
            return self.base.tokenizer.decode(token_ids, clean_up_tokenization_spaces=False)

    def make_generator(self, request: GenerationRequest) -> torch.Generator | None:
        if request.temperature == 0.0:
            return None
        generator = torch.Generator(device=self.base.device)
        if request.seed is None:
            generator.seed()
        else:
            generator.manual_seed(request.seed)
        return generator

    def plan_for(self, row_adapters: Sequence[LoadedAdapter | None]) -> BatchPlan:
        """Return the LoRA plan for these rows, reusing the last one while the rows stay the same."""
        keys = tuple(None if adapter is None else adapter.key for adapter in row_adapters)
        if self._last_plan is not None and self._last_plan[0] == keys:
            return self._last_plan[1]
        first = row_adapters[0] if row_adapters else None
        if first is not None and all(key == first.key for key in keys):
            # One adapter for every row, as in a single stream: switching between cached
            # adapters then costs a dict lookup instead of a plan over every module.
            plan_key = (len(keys), str(self.base.device), self.dtype)
            plan = first.single_adapter_plans.get(plan_key)
            if plan is None:
                plan = build_batch_plan(row_adapters, device=self.base.device, dtype=self.dtype)
                first.single_adapter_plans[plan_key] = plan
        else:
            plan = build_batch_plan(row_adapters, device=self.base.device, dtype=self.dtype)
        self._last_plan = (keys, plan)
        return plan

    def next_token_logits(self, row_adapters: Sequence[LoadedAdapter | None], **inputs: Any) -> torch.Tensor:
        """Run a batch whose row i uses `row_adapters[i]` and return its last positions' logits.

        The result is [batch, vocab]. The caller must hold `lock`. Only the last position feeds
        sampling, so the output projection runs on that position alone.
        """
        plan = self.plan_for(row_adapters)
        with self.hooks.activate(plan):
            output = self.base.model.transformer(use_cache=True, **inputs)
        hidden = output.last_hidden_state[:, -1, :]  # [batch, hidden]
        logits = hidden @ self.output_projection_t  # [batch, vocab]
        if self.output_bias is not None:
            logits = logits + self.output_bias
        return logits

    def _prepare_validated(self, request: GenerationRequest, prompt_ids: list[int]) -> PreparedRequest:
        load_started = time.perf_counter()
        if request.adapter_key is None:
            adapter, hit = None, False
        else:
            adapter, hit = self.load_adapter(request)
        return PreparedRequest(
            request=request,
            prompt_ids=prompt_ids,
            adapter=adapter,
            cache_hit=hit,
            adapter_load_ms=(time.perf_counter() - load_started) * 1000,
        )


def estimated_adapter_bytes(folder: Path) -> int:
    """Return the size of the adapter's weights file, or 0 when it is missing."""
    from .adapters import ADAPTER_WEIGHTS_NAME

    try:
        return (Path(folder) / ADAPTER_WEIGHTS_NAME).stat().st_size
    except OSError:
        return 0
