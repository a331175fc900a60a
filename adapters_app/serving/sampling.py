"""Per-row token choice and stop-string handling for generation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .engine import GenerationRequest


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
