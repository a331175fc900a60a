"""Measure what an adapter does: the size of each layer's update and its effect on logits."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .adapters import LoadedAdapter
    from .base import BaseModel
    from .lora import MultiLoraHooks

logger = logging.getLogger(__name__)

# A fixed, ordinary English prompt: any input shows a non-zero update, this one is short.
PROBE_TEXT = "The quick brown fox jumps over the lazy dog."


def update_norms(adapter: LoadedAdapter) -> dict[str, float]:
    """Return the Frobenius norm of each module's scaled update, scale · B·A, by module path."""
    import torch

    norms = {}
    for path, weights in sorted(adapter.modules.items()):
        # B is [out, r] and A is [r, in], so B·A has the shape of the base weight (transposed).
        product = weights.lora_b.float() @ weights.lora_a.float()
        norms[path] = float(torch.linalg.matrix_norm(product).item() * weights.scale)
    return norms


def logit_change(base: BaseModel, hooks: MultiLoraHooks, adapter: LoadedAdapter, text: str = PROBE_TEXT) -> float:
    """Return the largest absolute change the adapter makes to the base's logits on `text`."""
    import torch

    from .lora import build_batch_plan

    input_ids = torch.tensor([base.tokenizer(text)["input_ids"]], device=base.device)
    with torch.inference_mode():
        plain = base.model(input_ids=input_ids).logits
        plan = build_batch_plan([adapter], device=base.device, dtype=plain.dtype)
        with hooks.activate(plan):
            adapted = base.model(input_ids=input_ids).logits
    return float((adapted - plain).abs().max().item())
