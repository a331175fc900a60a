"""Batched text generation on the frozen base with a per-request LoRA adapter.

All requests passed to `Engine.generate` run as one left-padded batch with a shared KV cache.
Each row uses its own adapter (or none) through the multi-LoRA hooks, its own sampling settings
and its own random generator, and stops on its own. A row that has finished keeps a fixed
position and a masked-out pad token until the whole batch is done. Rows never attend to each
other, so the rest of the batch can change a row's logits only by floating-point rounding in
the batched kernels.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapters import AdapterCache, LoadedAdapter, read_adapter
from .base import BaseModel
from .lora import MultiLoraHooks, build_batch_plan
from .prompting import format_prompt

logger = logging.getLogger(__name__)

# Highest temperature a request may set. Sampling at 2.0 is already close to uniform noise.
MAX_TEMPERATURE = 2.0
MAX_SEED = 2**63 - 1
STREAM_HOLD_CHARACTER = "\ufffd"  # what a partial UTF-8 sequence decodes to


class GenerationError(ValueError):
    """A generation request is invalid, so nothing was generated."""


@dataclass
class GenerationRequest:
    """One prompt to complete, with the adapter and sampling settings to use.

    `adapter_key` is the immutable version key of the adapter (None runs the bare base), and
    `adapter_path` is its PEFT folder, read only when the key is not cached yet. `temperature`
    0 means greedy decoding. `top_k` 0 and `top_p` 1.0 disable those filters. `on_token` is
    called in the generating thread with each new piece of completion text.
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


@dataclass(frozen=True)
class GenerationResult:
    """The completion of one request.

    `elapsed_ms` runs from the start of the batch (after the engine lock was taken) to the
    moment this row finished, adapter loading included. `completion_tokens` counts every token
    sampled, an end-of-text token and tokens cut off with a stop string included.
    `tokens_per_second` divides them by the time from the prefill's start to the row's finish.
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


@dataclass
class _RowState:
    """Decoding progress of one batch row."""

    request: GenerationRequest
    prompt_ids: list[int]
    generator: torch.Generator | None
    token_ids: list[int] = field(default_factory=list)  # completion tokens, without end-of-text
    generated: int = 0  # tokens sampled, end-of-text included
    text: str = ""
    streamed_chars: int = 0
    finish_reason: str | None = None
    finished_at: float = 0.0
    stream_failed: bool = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


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


def filter_top_k(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Set every score below the k-th largest to -inf (ties with it are kept)."""
    if top_k <= 0 or top_k >= scores.shape[-1]:
        return scores
    kth_largest = torch.topk(scores, top_k).values[-1]
    return scores.masked_fill(scores < kth_largest, float("-inf"))


def filter_top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of highest-probability tokens whose total probability reaches top_p."""
    if top_p >= 1.0:
        return scores
    sorted_scores, sorted_ids = torch.sort(scores, descending=True)
    probabilities = torch.softmax(sorted_scores, dim=-1)
    # Mass of the tokens ranked above each token. The top token has 0, so it is always kept.
    mass_before = torch.cumsum(probabilities, dim=-1) - probabilities
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(0, sorted_ids, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def sample_token(
    logits: torch.Tensor, request: GenerationRequest, generator: torch.Generator | None
) -> int:
    """Pick the next token from one row's logits [vocab] with the request's sampling settings."""
    if request.temperature == 0.0:
        return int(torch.argmax(logits))
    scores = logits.float() / request.temperature
    scores = filter_top_k(scores, request.top_k)
    scores = filter_top_p(scores, request.top_p)
    probabilities = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probabilities, 1, generator=generator))


def find_stop(text: str, stops: Sequence[str]) -> int:
    """Return the index of the earliest stop string in `text`, or -1."""
    found = [index for index in (text.find(stop) for stop in stops) if index >= 0]
    return min(found) if found else -1


def stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """Return the length of the longest end of `text` that could begin a stop string."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest


class Engine:
    """Serves generation requests on one frozen base, each through its own LoRA adapter.

    Adapters are read through `cache` (an AdapterCache keyed by the request's adapter_key) and
    applied by forward hooks, so the base weights never change. One batch runs at a time. The
    lock makes `generate` safe to call from several threads, which then wait their turn.
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
        self._lock = threading.Lock()
        self._eos_token_id = int(base.tokenizer.eos_token_id)
        pad_token_id = base.tokenizer.pad_token_id
        self._pad_token_id = int(pad_token_id) if pad_token_id is not None else self._eos_token_id

    def close(self) -> None:
        """Remove the LoRA hooks from the base model and drop the cached adapters."""
        with self._lock:
            self.hooks.remove()
            self.cache.clear()

    def generate_one(self, request: GenerationRequest) -> GenerationResult:
        return self.generate([request])[0]

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Run all requests together as one batch and return their results in the same order.

        Raises GenerationError if any request is invalid (before anything runs) and
        AdapterError if an adapter cannot be read.
        """
        if not requests:
            return []

        # Tokenizing happens under the lock because a fast tokenizer must not be used from two
        # threads at once. Every request is validated before any adapter is read.
        with self._lock, torch.inference_mode():
            prompt_ids = [self._encode(request.prompt) for request in requests]
            for request, ids in zip(requests, prompt_ids):
                validate_request(request, len(ids), self.base.max_positions)
            return self._generate_batch(list(requests), prompt_ids)

    def load_adapter(self, request: GenerationRequest) -> tuple[LoadedAdapter, bool]:
        """Return the request's adapter from the cache, reading its folder on a miss."""
        key = request.adapter_key
        if key is None:
            raise GenerationError("The request has no adapter_key")

        def load() -> LoadedAdapter:
            if request.adapter_path is None:
                raise GenerationError(
                    f"Adapter {key} is not loaded and the request has no adapter_path "
                    "to read it from"
                )
            return read_adapter(
                Path(request.adapter_path),
                self.base,
                key=key,
                expected_sha256=request.adapter_sha256,
            )

        return self.cache.get_or_load(key, load)

    def _encode(self, prompt: str) -> list[int]:
        if not prompt:
            return []
        encoded = self.base.tokenizer(format_prompt(prompt), add_special_tokens=False)
        return list(encoded["input_ids"])

    def _generate_batch(
        self, requests: list[GenerationRequest], prompt_ids: list[list[int]]
    ) -> list[GenerationResult]:
        started = time.perf_counter()

        # Resolve each row's adapter. Rows sharing a key share one loaded adapter.
        row_adapters: list[LoadedAdapter | None] = []
        cache_hits: list[bool] = []
        load_ms: list[float] = []
        for request in requests:
            load_started = time.perf_counter()
            if request.adapter_key is None:
                adapter, hit = None, False
            else:
                adapter, hit = self.load_adapter(request)
            row_adapters.append(adapter)
            cache_hits.append(hit)
            load_ms.append((time.perf_counter() - load_started) * 1000)

        rows = [
            _RowState(request=request, prompt_ids=ids, generator=self._make_generator(request))
            for request, ids in zip(requests, prompt_ids)
        ]
        model = self.base.model
        device = self.base.device
        plan = build_batch_plan(row_adapters, device=device, dtype=next(model.parameters()).dtype)

        decode_started = time.perf_counter()
        with self.hooks.activate(plan):
            self._decode(rows)

        results = [
            self._result(row, adapter, hit, ms, started, decode_started)
            for row, adapter, hit, ms in zip(rows, row_adapters, cache_hits, load_ms)
        ]
        logger.info(
            "Generated %d requests (%d adapters) in %.0f ms: %d prompt and %d completion tokens",
            len(rows),
            len(plan.adapter_keys),
            (time.perf_counter() - started) * 1000,
            sum(result.prompt_tokens for result in results),
            sum(result.completion_tokens for result in results),
        )
        return results

    def _make_generator(self, request: GenerationRequest) -> torch.Generator | None:
        if request.temperature == 0.0:
            return None
        generator = torch.Generator(device=self.base.device)
        if request.seed is None:
            generator.seed()
        else:
            generator.manual_seed(request.seed)
        return generator

    def _decode(self, rows: list[_RowState]) -> None:
        """Prefill the left-padded prompts, then decode one token per row per step."""
        from transformers import DynamicCache

        model = self.base.model
        device = self.base.device
        batch_size = len(rows)
        padded_length = max(len(row.prompt_ids) for row in rows)

        # Left padding puts every prompt's last token in the final column, so one logits row
        # per sequence comes out of the prefill. Position ids count real tokens only, so a
        # padded prompt sees the same positions as it would alone.
        input_ids = torch.full((batch_size, padded_length), self._pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, padded_length), dtype=torch.long)
        for index, row in enumerate(rows):
            length = len(row.prompt_ids)
            input_ids[index, padded_length - length :] = torch.tensor(row.prompt_ids)
            attention_mask[index, padded_length - length :] = 1
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # [batch, padded_length]
        input_ids = input_ids.to(device)
        attention_mask = attention_mask.to(device)
        position_ids = position_ids.to(device)

        # transformers 5.25 names the KV cache argument `cache` (`past_key_values` is a deprecated
        # alias) and grows a DynamicCache in place, one layer entry per block.
        kv_cache = DynamicCache(config=model.config)
        output = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=kv_cache,
            use_cache=True,
            logits_to_keep=1,
        )
        next_positions = position_ids[:, -1] + 1  # [batch]

        max_steps = max(row.request.max_new_tokens for row in rows)
        for step in range(max_steps):
            logits = output.logits[:, -1, :]  # [batch, vocab]
            next_tokens = self._choose_tokens(rows, logits)

            for row, token in zip(rows, next_tokens):
                if not row.finished:
                    self._advance(row, token)
            if all(row.finished for row in rows) or step == max_steps - 1:
                break

            # Finished rows feed a pad token at a frozen position with its mask off, so they
            # stay within the position table and nothing attends to their new entries.
            active_list = [not row.finished for row in rows]
            active = torch.tensor(active_list, dtype=torch.bool, device=device)  # [batch]
            step_token_list = [
                token if is_active else self._pad_token_id
                for token, is_active in zip(next_tokens, active_list)
            ]
            step_tokens = torch.tensor(step_token_list, dtype=torch.long, device=device)
            step_positions = torch.where(active, next_positions, next_positions - 1)
            attention_mask = torch.cat([attention_mask, active.long().unsqueeze(1)], dim=1)
            output = model(
                input_ids=step_tokens.unsqueeze(1),
                attention_mask=attention_mask,
                position_ids=step_positions.unsqueeze(1),
                cache=kv_cache,
                use_cache=True,
            )
            next_positions = torch.where(active, next_positions + 1, next_positions)

    def _choose_tokens(self, rows: list[_RowState], logits: torch.Tensor) -> list[int]:
        greedy = torch.argmax(logits, dim=-1).tolist()  # [batch]
        tokens: list[int] = []
        for index, row in enumerate(rows):
            if row.finished or row.request.temperature == 0.0:
                tokens.append(int(greedy[index]))
            else:
                tokens.append(sample_token(logits[index], row.request, row.generator))
        return tokens

    def _advance(self, row: _RowState, token: int) -> None:
        """Append a sampled token to a row, and finish it on eos, a stop string or its limit."""
        request = row.request
        row.generated += 1
        if token == self._eos_token_id:
            self._finish(row, "stop")
            return

        row.token_ids.append(token)
        row.text = self.base.tokenizer.decode(row.token_ids, clean_up_tokenization_spaces=False)

        stop_index = find_stop(row.text, request.stop)
        if stop_index >= 0:
            row.text = row.text[:stop_index]
            self._finish(row, "stop")
            return
        if row.generated >= request.max_new_tokens:
            self._finish(row, "length")
            return

        # Hold back text that may still change: a partial UTF-8 character, or an end that may
        # grow into a stop string and then be cut off.
        streamable = row.text.rstrip(STREAM_HOLD_CHARACTER)
        streamable = streamable[: len(streamable) - stop_prefix_length(streamable, request.stop)]
        self._stream(row, streamable)

    def _finish(self, row: _RowState, reason: str) -> None:
        row.finish_reason = reason
        row.finished_at = time.perf_counter()
        self._stream(row, row.text)

    def _stream(self, row: _RowState, text: str) -> None:
        callback = row.request.on_token
        if callback is None or row.stream_failed or len(text) <= row.streamed_chars:
            return
        piece = text[row.streamed_chars :]
        row.streamed_chars = len(text)
        try:
            callback(piece)
        except Exception:
            # A broken stream consumer must not fail the other requests in the batch.
            row.stream_failed = True
            logger.exception("on_token callback failed, so streaming stopped for this request")

    def _result(
        self,
        row: _RowState,
        adapter: LoadedAdapter | None,
        cache_hit: bool,
        adapter_load_ms: float,
        started: float,
        decode_started: float,
    ) -> GenerationResult:
        decode_seconds = max(row.finished_at - decode_started, 1e-9)
        completion_tokens = row.generated
        return GenerationResult(
            text=row.text,
            prompt_tokens=len(row.prompt_ids),
            completion_tokens=completion_tokens,
            finish_reason=row.finish_reason or "length",
            adapter_key=None if adapter is None else adapter.key,
            cache_hit=cache_hit,
            adapter_load_ms=adapter_load_ms,
            elapsed_ms=(row.finished_at - started) * 1000,
            tokens_per_second=completion_tokens / decode_seconds,
        )
