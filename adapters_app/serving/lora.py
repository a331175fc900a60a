"""Batched multi-LoRA on a frozen GPT-2 through forward hooks.

Every row of a batch may use a different adapter, or none. For each targeted Conv1D the hook
adds `scale * (x @ A.T) @ B.T` to the base output of the rows that have an adapter there, with
one pair of batched matmuls over those rows (the gather-then-bmm scheme of Punica's SGMV and
S-LoRA). Ranks that differ within a batch are zero-padded to the largest, which adds only exact
zeros. The base modules and their weights are never modified, so the base state dict keeps its
hash, and a hook does nothing unless a plan is active in the calling thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .adapters import LoadedAdapter
from .base import TARGETABLE_MODULES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModulePlan:
    """The LoRA work for one Conv1D in one batch.

    `slot_a` and `slot_b` stack the factors of every adapter slot that targets this module,
    zero-padded to `max_rank`. `row_slots` gives each batch row's slot, or -1 for no LoRA.
    `rows`, `row_a_t`, `row_b_t` and `row_scale` are the same weights gathered once per row that
    has a slot, so each forward pass only runs the two batched matmuls.
    """

    max_rank: int
    slot_a: torch.Tensor  # [slots, max_rank, in_features]
    slot_b: torch.Tensor  # [slots, out_features, max_rank]
    slot_scale: torch.Tensor  # [slots]
    row_slots: torch.Tensor  # [batch], long, -1 where the row has no LoRA on this module
    rows: torch.Tensor  # [n], long, batch rows with a slot
    row_a_t: torch.Tensor  # [n, in_features, max_rank], A transposed for x @ A.T
    row_b_t: torch.Tensor  # [n, max_rank, out_features], B transposed for h @ B.T
    row_scale: torch.Tensor  # [n, 1, 1]


@dataclass(frozen=True)
class BatchPlan:
    """The adapter of each batch row, with the per-module stacked weights the hooks apply."""

    batch_size: int
    adapter_keys: tuple[str, ...]  # slot index -> adapter key
    row_adapter_keys: tuple[str | None, ...]  # batch row -> adapter key, None for the bare base
    modules: dict[str, ModulePlan]


def build_batch_plan(
    row_adapters: Sequence[LoadedAdapter | None],
    *,
    device: torch.device | str,
    dtype: torch.dtype,
) -> BatchPlan:
    """Build the plan for a batch whose row i uses `row_adapters[i]` (None: base only).

    Rows that share an adapter share its slot. Rows without an adapter, or whose adapter does
    not target a module, are left out of that module's matmuls and get exactly the base output.
    """
    if not row_adapters:
        raise ValueError("A batch plan needs at least one row")

    # Distinct adapters get slots in order of first appearance.
    slot_of_key: dict[str, int] = {}
    slot_adapters: list[LoadedAdapter] = []
    row_slot_list: list[int] = []
    for adapter in row_adapters:
        if adapter is None:
            row_slot_list.append(-1)
            continue
        if adapter.key not in slot_of_key:
            slot_of_key[adapter.key] = len(slot_adapters)
            slot_adapters.append(adapter)
        row_slot_list.append(slot_of_key[adapter.key])

    module_paths = sorted({path for adapter in slot_adapters for path in adapter.modules})
    modules = {
        path: build_module_plan(path, slot_adapters, row_slot_list, device=device, dtype=dtype)
        for path in module_paths
    }

    return BatchPlan(
        batch_size=len(row_adapters),
        adapter_keys=tuple(adapter.key for adapter in slot_adapters),
        row_adapter_keys=tuple(adapter.key if adapter else None for adapter in row_adapters),
        modules=modules,
    )


def build_module_plan(
    module_path: str,
    slot_adapters: Sequence[LoadedAdapter],
    row_slot_list: Sequence[int],
    *,
    device: torch.device | str,
    dtype: torch.dtype,
) -> ModulePlan:
    """Stack the factors of the slots that target `module_path`, and gather them per row."""
    targeting = [
        (slot, adapter.modules[module_path])
        for slot, adapter in enumerate(slot_adapters)
        if module_path in adapter.modules
    ]
    max_rank = max(weights.rank for _, weights in targeting)
    first = targeting[0][1]
    in_features = int(first.lora_a.shape[1])
    out_features = int(first.lora_b.shape[0])

    # Slots that do not target this module keep all-zero factors and are never gathered,
    # because their rows are left out of `rows` below.
    slot_count = len(slot_adapters)
    slot_a = torch.zeros(slot_count, max_rank, in_features, device=device, dtype=dtype)
    slot_b = torch.zeros(slot_count, out_features, max_rank, device=device, dtype=dtype)
    slot_scale = torch.zeros(slot_count, device=device, dtype=dtype)
    targeting_slots: set[int] = set()
    for slot, weights in targeting:
        if weights.lora_a.shape[1] != in_features or weights.lora_b.shape[0] != out_features:
            raise ValueError(
                f"Adapter {slot_adapters[slot].key} has LoRA shapes "
                f"{tuple(weights.lora_a.shape)} / {tuple(weights.lora_b.shape)} "
                f"on {module_path}, which do not match "
                f"in_features={in_features}, out_features={out_features} of the other adapters"
            )
        rank = weights.rank
        slot_a[slot, :rank] = weights.lora_a.to(device=device, dtype=dtype)  # [rank, in]
        slot_b[slot, :, :rank] = weights.lora_b.to(device=device, dtype=dtype)  # [out, rank]
        slot_scale[slot] = weights.scale
        targeting_slots.add(slot)

    module_row_slots = [slot if slot in targeting_slots else -1 for slot in row_slot_list]
    row_slots = torch.tensor(module_row_slots, dtype=torch.long, device=device)
    rows = torch.nonzero(row_slots >= 0).flatten()  # [n]
    gathered_slots = row_slots[rows]  # [n]

    return ModulePlan(
        max_rank=max_rank,
        slot_a=slot_a,
        slot_b=slot_b,
        slot_scale=slot_scale,
        row_slots=row_slots,
        rows=rows,
        row_a_t=slot_a[gathered_slots].transpose(1, 2).contiguous(),  # [n, in, max_rank]
        row_b_t=slot_b[gathered_slots].transpose(1, 2).contiguous(),  # [n, max_rank, out]
        row_scale=slot_scale[gathered_slots].view(-1, 1, 1),  # [n, 1, 1]
    )


def lora_delta(x: torch.Tensor, plan: ModulePlan) -> torch.Tensor:
    """Return scale * (x @ A.T) @ B.T for the plan's rows, shape [n, seq, out_features]."""
    x_rows = x.index_select(0, plan.rows)  # [n, seq, in]
    hidden = torch.bmm(x_rows, plan.row_a_t)  # [n, seq, max_rank]
    return torch.bmm(hidden, plan.row_b_t) * plan.row_scale  # [n, seq, out]


class MultiLoraHooks:
    """Forward hooks on every targetable Conv1D of a GPT-2, applying the active BatchPlan.

    Plans are activated per thread with `activate`, so a forward pass in another thread, or
    outside any plan, runs the base model unchanged.
    """

    def __init__(
        self, model: torch.nn.Module, module_names: Sequence[str] = TARGETABLE_MODULES
    ) -> None:
        from transformers.pytorch_utils import Conv1D

        self._local = threading.local()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        paths: list[str] = []
        for path, module in model.named_modules():
            if isinstance(module, Conv1D) and path.rsplit(".", 1)[-1] in module_names:
                self._handles.append(module.register_forward_hook(self._make_hook(path)))
                paths.append(path)
        if not paths:
            raise ValueError(f"The model has no Conv1D modules named {list(module_names)} to hook")
        self.module_paths: tuple[str, ...] = tuple(paths)
        logger.debug("Installed multi-LoRA hooks on %d modules", len(paths))

    @property
    def active_plan(self) -> BatchPlan | None:
        return getattr(self._local, "plan", None)

    @contextmanager
    def activate(self, plan: BatchPlan) -> Iterator[BatchPlan]:
        """Apply `plan` to forward passes made by this thread inside the `with` block."""
        if not self._handles:
            raise RuntimeError("The multi-LoRA hooks were removed, so create a new MultiLoraHooks")
        missing = sorted(set(plan.modules) - set(self.module_paths))
        if missing:
            raise ValueError(f"The plan has LoRA weights for modules without a hook: {missing[:3]}")

        previous = self.active_plan
        self._local.plan = plan
        try:
            yield plan
        finally:
            self._local.plan = previous

    def remove(self) -> None:
        """Remove every hook, leaving the model exactly as it was before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _make_hook(self, path: str) -> Callable[..., torch.Tensor | None]:
        def apply_lora(
            module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor
        ) -> torch.Tensor | None:
            plan = self.active_plan
            if plan is None:
                return None
            module_plan = plan.modules.get(path)
            if module_plan is None or module_plan.rows.numel() == 0:
                return None

            x = args[0]  # [batch, seq, in]
            if x.shape[0] != plan.batch_size:
                raise RuntimeError(
                    f"{path} received a batch of {x.shape[0]} rows, but the active LoRA plan is "
                    f"for {plan.batch_size} rows"
                )
            delta = lora_delta(x, module_plan)  # [n, seq, out]

            # Out of place, so rows without LoRA keep the base output bit for bit.
            return output.index_add(0, module_plan.rows, delta.to(output.dtype))

        return apply_lora
