"""A running batch: left-padded rows that share one KV cache and decode one token per step.

Rows join through `RunningBatch.absorb` (after their own prefill) and leave through
`drop_finished`, which compacts the KV cache, the attention mask and the positions, so
finished rows cost nothing in later steps. Every row carries explicit position ids
(`cumsum(mask) - 1`), and padded cache entries are masked out, so a row's logits do not depend
on which other rows share the batch, up to floating-point rounding in the batched kernels.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .sampling import find_stop, sample_token, stop_prefix_length

if TYPE_CHECKING:
    from transformers import DynamicCache

    from .adapters import LoadedAdapter
    from .engine import Engine, GenerationRequest, GenerationResult

logger = logging.getLogger(__name__)

STREAM_HOLD_CHARACTER = "\ufffd"  # what a partial UTF-8 sequence decodes to


@dataclass
class PreparedRequest:
    """A validated, tokenized request whose adapter is loaded, ready to join a batch."""

    request: GenerationRequest
    prompt_ids: list[int]
    adapter: LoadedAdapter | None
    cache_hit: bool
    adapter_load_ms: float
    submitted_at: float = field(default_factory=time.perf_counter)

    @property
    def adapter_key(self) -> str | None:
        return None if self.adapter is None else self.adapter.key


@dataclass
class RowState:
    """Decoding progress of one batch row."""

    prepared: PreparedRequest
    generator: torch.Generator | None
    started_at: float = 0.0  # when the row's prefill began
    next_token: int = -1  # sampled but not yet fed to the model
    token_ids: list[int] = field(default_factory=list)  # completion tokens, without end-of-text
    generated: int = 0  # tokens sampled, end-of-text included
    text: str = ""
    streamed_chars: int = 0
    finish_reason: str | None = None
    finished_at: float = 0.0
    stream_failed: bool = False
    error: BaseException | None = None  # set when the row was stopped by a timeout or cancel

    @property
    def request(self) -> GenerationRequest:
        return self.prepared.request

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def left_pad_columns(tensor: torch.Tensor, columns: int, dim: int) -> torch.Tensor:
    """Return `tensor` with `columns` zero entries prepended along `dim`."""
    if columns == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = columns
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def kv_layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Return each layer's (keys, values), both [batch, heads, seq, head_dim]."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def kv_cache_from_layers(
    config: object, layers: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> DynamicCache:
    """Build a DynamicCache that contains the given per-layer keys and values."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for layer, (keys, values) in zip(cache.layers, layers):
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
    return cache


class RunningBatch:
    """Rows decoding together on one engine. Only the thread that holds the engine lock uses it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.rows: list[RowState] = []
        self.kv_cache: DynamicCache | None = None
        self.attention_mask: torch.Tensor | None = None  # [batch, cached columns], long
        self.next_positions: torch.Tensor | None = None  # [batch], position of each row's next token
        self.forward_passes = 0

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def row_adapters(self) -> list[LoadedAdapter | None]:
        return [row.prepared.adapter for row in self.rows]

    def prefill(self, prepared: Sequence[PreparedRequest]) -> None:
        """Start an empty batch with `prepared`, run their prompts and sample each first token.

        Rows are ordered by adapter so that rows sharing an adapter sit next to each other,
        which lets the LoRA plan read each adapter once per module when the groups are even.
        """
        if self.rows:
            raise RuntimeError("prefill starts an empty batch; use absorb to add rows to a running one")
        engine = self.engine
        device = engine.base.device
        ordered = sorted(prepared, key=lambda item: item.adapter_key or "")
        started = time.perf_counter()
        self.rows = [
            RowState(prepared=item, generator=engine.make_generator(item.request), started_at=started)
            for item in ordered
        ]

        # Left padding puts every prompt's last token in the final column, so one logits row
        # per sequence comes out of the prefill. Position ids count real tokens only, so a
        # padded prompt sees the same positions as it would alone.
        batch_size = len(self.rows)
        padded_length = max(len(row.prepared.prompt_ids) for row in self.rows)
        input_ids = torch.full((batch_size, padded_length), engine.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, padded_length), dtype=torch.long)
        for index, row in enumerate(self.rows):
            length = len(row.prepared.prompt_ids)
            input_ids[index, padded_length - length :] = torch.tensor(row.prepared.prompt_ids)
            attention_mask[index, padded_length - length :] = 1
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # [batch, padded_length]

        from transformers import DynamicCache

        # transformers 5.25 names the KV cache argument `cache` (`past_key_values` is a
        # deprecated alias) and grows a DynamicCache in place, one layer entry per block.
        self.kv_cache = DynamicCache(config=engine.base.model.config)
        self.attention_mask = attention_mask.to(device)
        logits = engine.next_token_logits(
            self.row_adapters,
            input_ids=input_ids.to(device),
            attention_mask=self.attention_mask,
            position_ids=position_ids.to(device),
            cache=self.kv_cache,
        )
        self.forward_passes += 1
        self.next_positions = position_ids[:, -1].to(device) + 1  # [batch]
        self._sample(logits)

    def step(self) -> None:
        """Feed each row's last sampled token and sample the next one."""
        if not self.rows:
            return
        device = self.engine.base.device
        tokens = torch.tensor([[row.next_token] for row in self.rows], dtype=torch.long)  # [batch, 1]
        ones = torch.ones((len(self.rows), 1), dtype=torch.long, device=device)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        logits = self.engine.next_token_logits(
            self.row_adapters,
            input_ids=tokens.to(device),
            attention_mask=self.attention_mask,
            position_ids=self.next_positions.unsqueeze(1),
            cache=self.kv_cache,
        )
        self.forward_passes += 1
        self.next_positions = self.next_positions + 1
        self._sample(logits)

    def absorb(self, other: RunningBatch) -> None:
        """Append the rows of `other` (prefilled, not yet finished) to this batch and empty it.

        The shorter cache is left-padded with masked-out zero entries, so both line up on
        their last column, as left padding does within one prefill.
        """
        if not other.rows:
            return
        if not self.rows:
            self._take(other)
            return

        own_columns = self.attention_mask.shape[1]
        other_columns = other.attention_mask.shape[1]
        columns = max(own_columns, other_columns)
        merged_layers = []
        for (own_keys, own_values), (other_keys, other_values) in zip(
            kv_layers(self.kv_cache), kv_layers(other.kv_cache)
        ):
            keys = torch.cat(
                [
                    left_pad_columns(own_keys, columns - own_columns, dim=2),
                    left_pad_columns(other_keys, columns - other_columns, dim=2),
                ]
            )  # [own + other, heads, columns, head_dim]
            values = torch.cat(
                [
                    left_pad_columns(own_values, columns - own_columns, dim=2),
                    left_pad_columns(other_values, columns - other_columns, dim=2),
                ]
            )
            merged_layers.append((keys, values))
        self.kv_cache = kv_cache_from_layers(self.engine.base.model.config, merged_layers)
        self.attention_mask = torch.cat(
            [
                left_pad_columns(self.attention_mask, columns - own_columns, dim=1),
                left_pad_columns(other.attention_mask, columns - other_columns, dim=1),
            ]
        )
        self.next_positions = torch.cat([self.next_positions, other.next_positions])
        self.rows.extend(other.rows)
        other._clear()

    def drop_finished(self) -> list[RowState]:
        """Remove finished rows from the batch and its KV cache, and return them."""
        finished = [row for row in self.rows if row.finished]
        if not finished:
            return []
        keep = [index for index, row in enumerate(self.rows) if not row.finished]
        if not keep:
            self._clear()
            return finished

        device = self.engine.base.device
        index = torch.tensor(keep, dtype=torch.long, device=device)
        self.rows = [self.rows[position] for position in keep]
        self.attention_mask = self.attention_mask.index_select(0, index)
        self.next_positions = self.next_positions.index_select(0, index)

        # Columns that only the dropped rows used are padding for every remaining row, so
        # cutting them shrinks the attention of all later steps.
        used_columns = self.attention_mask.any(dim=0).nonzero()  # [n, 1]
        first_used = int(used_columns[0, 0]) if used_columns.numel() else 0
        layers = [
            (keys.index_select(0, index)[:, :, first_used:], values.index_select(0, index)[:, :, first_used:])
            for keys, values in kv_layers(self.kv_cache)
        ]
        self.kv_cache = kv_cache_from_layers(self.engine.base.model.config, layers)
        self.attention_mask = self.attention_mask[:, first_used:]
        return finished

    def finish_row(self, row: RowState, reason: str, error: BaseException | None = None) -> None:
        """Stop a row now (a timeout or a cancel), keeping the text it has so far."""
        row.error = error
        self._finish(row, reason)

    def _take(self, other: RunningBatch) -> None:
        self.rows = other.rows
        self.kv_cache = other.kv_cache
        self.attention_mask = other.attention_mask
        self.next_positions = other.next_positions
        other._clear()

    def _clear(self) -> None:
        self.rows = []
        self.kv_cache = None
        self.attention_mask = None
        self.next_positions = None

    def _sample(self, logits: torch.Tensor) -> None:
        """Choose each row's next token from logits [batch, vocab] and advance the row."""
        greedy = torch.argmax(logits, dim=-1).tolist()  # [batch]
        for index, row in enumerate(self.rows):
            if row.request.temperature == 0.0:
                token = int(greedy[index])
            else:
                token = sample_token(logits[index], row.request, row.generator)
            self._advance(row, token)

    def _advance(self, row: RowState, token: int) -> None:
        """Append a sampled token to a row, and finish it on eos, a stop string or its limit."""
        request = row.request
        row.generated += 1
        row.next_token = token
        if token == self.engine.eos_token_id and not request.ignore_eos:
            self._finish(row, "stop")
            return

        row.token_ids.append(token)
        row.text = self.engine.decode(row.token_ids)

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

    def _finish(self, row: RowState, reason: str) -> None:
        row.finish_reason = reason
        row.finished_at = time.perf_counter()
        if row.error is None:
            self._stream(row, row.text)

    def _stream(self, row: RowState, text: str) -> None:
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


def row_result(row: RowState) -> GenerationResult:
    """Return the GenerationResult of a finished row."""
    from .engine import GenerationResult

    prepared = row.prepared
    decode_seconds = max(row.finished_at - row.started_at, 1e-9)
    return GenerationResult(
        text=row.text,
        prompt_tokens=len(prepared.prompt_ids),
        completion_tokens=row.generated,
        finish_reason=row.finish_reason or "length",
        adapter_key=prepared.adapter_key,
        cache_hit=prepared.cache_hit,
        adapter_load_ms=prepared.adapter_load_ms,
        elapsed_ms=(row.finished_at - prepared.submitted_at) * 1000,
        tokens_per_second=row.generated / decode_seconds,
        queued_ms=max(row.started_at - prepared.submitted_at, 0.0) * 1000,
    )
