"""Token lengths, exact duplicates, split sizes and length statistics of a dataset being read.

Everything here works on a stream of examples and keeps 18 bytes per accepted example (a
128-bit key and a 16-bit length), so validating a large file does not hold its text in
memory. Like the rest of the ingest modules it imports nothing from Django.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .trainer_data import ExampleLike, example_token_counts

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Bars of the stored length histogram.
HISTOGRAM_BINS = 32

# Upper bound of the per-example token length that the index stores (uint16).
_MAX_INDEXED_LENGTH = 0xFFFF


def split_rank(seed: int, prompt: str, completion: str) -> bytes:
    """Return the sha256 that orders examples for the train/validation split.

    JSON keeps the three parts apart even when a prompt contains any separator character.
    Equal examples get equal ranks, which is also how duplicates are found.
    """
    key = json.dumps([seed, prompt, completion])
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass(frozen=True)
class LengthVerdict:
    """Outcome of the length check of one example.

    `tokens` is the example's length in training: prompt, completion and EOS, or without EOS
    when `completion` was cut. `completion` is the text to keep, or None when the example is
    rejected, in which case `problem` is its code and `problem_tokens` the count it names.
    """

    tokens: int
    completion: str | None
    truncated: bool = False
    problem: str | None = None
    problem_tokens: int = 0


class LengthChecker:
    """Count GPT-2 tokens of examples in batches and apply the dataset's maximum length."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, max_length: int, *, truncate: bool
    ) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncate = truncate

    def check(self, examples: Sequence[ExampleLike]) -> list[LengthVerdict]:
        counts = example_token_counts(self.tokenizer, examples)
        return [
            self._verdict(example, prompt_tokens, completion_tokens)
            for example, (prompt_tokens, completion_tokens) in zip(examples, counts)
        ]

    def _verdict(
        self, example: ExampleLike, prompt_tokens: int, completion_tokens: int
    ) -> LengthVerdict:
        # Training appends EOS to every completion, so it counts towards the length.
        total = prompt_tokens + completion_tokens + 1
        if total <= self.max_length:
            return LengthVerdict(tokens=total, completion=example.completion)

        if not self.truncate:
            return LengthVerdict(tokens=total, completion=None, problem="too_long", problem_tokens=total)

        # Training would keep the prompt's tail and one completion token, which teaches
        # nothing useful, so such an example is rejected even when truncation was chosen.
        if prompt_tokens >= self.max_length:
            return LengthVerdict(
                tokens=total, completion=None, problem="prompt_too_long", problem_tokens=prompt_tokens
            )

        completion, kept = self._cut_completion(example.completion, self.max_length - prompt_tokens)
        return LengthVerdict(tokens=prompt_tokens + kept, completion=completion, truncated=True)

    def _cut_completion(self, completion: str, budget: int) -> tuple[str, int]:
        """Return the longest prefix of `completion` that ends at a token boundary and has at
        most `budget` tokens, with its token count.

        The prefix is re-tokenized, because BPE may split a cut word differently from the
        whole one. One token less is tried until the count fits.
        """
        offsets = self.tokenizer(completion, return_offsets_mapping=True)["offset_mapping"]
        keep = min(budget, len(offsets))
        while keep > 0:
            prefix = completion[: offsets[keep - 1][1]]
            count = len(self.tokenizer(prefix)["input_ids"])
            if count <= budget:
                return prefix, count
            keep -= 1
        return "", 0


@dataclass(frozen=True)
class TokenStats:
    """Length statistics of the stored examples, in GPT-2 tokens as training counts them."""

    total: int
    mean: float
    p95: int  # nearest-rank 95th percentile
    max: int
    # Bar i of `histogram` counts examples of bin_width * i to bin_width * (i + 1) - 1 tokens.
    bin_width: int
    histogram: list[int]


def token_stats(lengths: np.ndarray) -> TokenStats:
    if lengths.size == 0:
        return TokenStats(total=0, mean=0.0, p95=0, max=0, bin_width=1, histogram=[])

    counts = np.bincount(lengths)
    cumulative = np.cumsum(counts)
    rank = math.ceil(0.95 * lengths.size)
    p95 = int(np.searchsorted(cumulative, rank, side="left"))

    longest = int(lengths.max())
    bin_width = max(1, math.ceil((longest + 1) / HISTOGRAM_BINS))
    bins = math.ceil((longest + 1) / bin_width)
    padded = np.zeros(bins * bin_width, dtype=np.int64)
    padded[: counts.size] = counts
    histogram = padded.reshape(bins, bin_width).sum(axis=1)

    total = int(lengths.sum(dtype=np.int64))
    return TokenStats(
        total=total,
        mean=total / lengths.size,
        p95=p95,
        max=longest,
        bin_width=bin_width,
        histogram=[int(count) for count in histogram],
    )


class ExampleIndex:
    """The split key (first 128 bits of `split_rank`) and token length of each example."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._high = array("Q")
        self._low = array("Q")
        self._lengths = array("H")

    def __len__(self) -> int:
        return len(self._lengths)

    def add(self, prompt: str, completion: str, tokens: int) -> None:
        digest = split_rank(self.seed, prompt, completion)
        self._high.append(int.from_bytes(digest[:8], "big"))
        self._low.append(int.from_bytes(digest[8:16], "big"))
        self._lengths.append(min(tokens, _MAX_INDEXED_LENGTH))

    def lengths(self, keep: np.ndarray | None = None) -> np.ndarray:
        lengths = np.frombuffer(self._lengths, dtype=np.uint16) if len(self) else np.zeros(0, np.uint16)
        return lengths if keep is None else lengths[keep]

    def first_occurrences(self) -> np.ndarray:
        """Return a boolean mask that is True for the first copy of each distinct example."""
        first = np.zeros(len(self), dtype=bool)
        if not len(self):
            return first

        order, starts = self._groups(np.ones(len(self), dtype=bool))
        # Within a group of equal keys the first copy has the smallest position.
        first[np.minimum.reduceat(order, starts)] = True
        return first

    def split_sizes(self, keep: np.ndarray, validation_fraction: float) -> tuple[int, int]:
        """Return (train, validation) sizes that `split_examples` gives the kept examples.

        Distinct examples in key order go to validation until it contains
        `round(count * validation_fraction)` examples (at least 1), copies included. The last
        distinct example never goes there.
        """
        count = int(keep.sum())
        if count < 2:
            return count, 0

        order, starts = self._groups(keep)
        copies = np.diff(np.append(starts, order.size))
        if copies.size == 1:
            return count - 1, 1

        target = max(1, round(count * validation_fraction))
        taken = np.cumsum(copies[:-1])
        position = int(np.searchsorted(taken, target, side="left"))
        validation = int(taken[min(position, taken.size - 1)])
        return count - validation, validation

    def _groups(self, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return kept positions sorted by key, and where each run of equal keys starts."""
        positions = np.flatnonzero(keep)
        high = np.frombuffer(self._high, dtype=np.uint64)[positions]
        low = np.frombuffer(self._low, dtype=np.uint64)[positions]

        order = np.lexsort((low, high))
        high, low = high[order], low[order]
        changes = np.flatnonzero((high[1:] != high[:-1]) | (low[1:] != low[:-1])) + 1
        starts = np.concatenate(([0], changes))
        return positions[order], starts
