"""Batched multi-LoRA on a frozen GPT-2 through forward hooks.

Every row of a batch may use a different adapter, or none. For each targeted Conv1D the hook
adds `scale * (x @ A.T) @ B.T` to the base output in place, with one `bmm` and one `baddbmm_`
over groups of rows. Rows that share an adapter and sit next to each other in equal-sized runs
form one group, which reads the adapter's factors once. This is the segmented scheme of
Punica's SGMV, restricted to equal segment sizes so that it stays two batched matmuls. Any
other layout uses one group per row with gathered factors. Ranks that differ are zero-padded to the largest, and rows
without LoRA on a module get all-zero factors, which add only exact zeros. The base modules and
their weights are never modified, so the base state dict keeps its hash, and a hook does nothing
unless a plan is active in the calling thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .adapters import LoadedAdapter, LoraModuleWeights
from .base import TARGETABLE_MODULES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModulePlan:
    """The LoRA work for one Conv1D in one batch.

    The batch is split into `groups` consecutive runs of `group_rows` rows each, and group g
    applies `alpha * (x @ a_t[g]) @ b_t[g]`. `alpha` is the LoRA scale when every group shares
    one, and 1.0 when each group's scale is already folded into its `b_t`.
    """

    groups: int
    group_rows: int
    max_rank: int
    a_t: torch.Tensor  # [groups, in_features, max_rank], A transposed for x @ A.T
    b_t: torch.Tensor  # [groups, max_rank, out_features], B transposed for h @ B.T
    alpha: float
    group_slots: tuple[int, ...]  # group -> adapter slot, -1 where the group has no LoRA here

    @property
    def row_slots(self) -> list[int]:
        """Return each batch row's adapter slot on this module, -1 for no LoRA."""
        return [slot for slot in self.group_slots for _ in range(self.group_rows)]


@dataclass(frozen=True)
class BatchPlan:
    """The adapter of each batch row, with the per-module stacked weights the hooks apply."""

    batch_size: int
    adapter_keys: tuple[str, ...]  # slot index -> adapter key
    row_adapter_keys: tuple[str | None, ...]  # batch row -> adapter key, None for the bare base
    modules: dict[str, ModulePlan]

    @property
    def grouped(self) -> bool:
        """Return whether rows that share an adapter also share its factors in one group."""
        return any(module.group_rows > 1 for module in self.modules.values())


def row_groups(row_keys: Sequence[str | None]) -> tuple[int, int]:
    """Return (groups, rows per group) for the layout of `row_keys`.

    Consecutive rows with the same key form a run. When all runs have the same length L, each
    run is one group of L rows. Otherwise every row is a group of its own.
    """
    runs: list[int] = []
    for index, key in enumerate(row_keys):
        if index > 0 and key == row_keys[index - 1]:
            runs[-1] += 1
        else:
            runs.append(1)
    if len(set(runs)) == 1:
        return len(runs), runs[0]
    return len(row_keys), 1


def build_batch_plan(
    row_adapters: Sequence[LoadedAdapter | None],
    *,
    device: torch.device | str,
    dtype: torch.dtype,
) -> BatchPlan:
    """Build the plan for a batch whose row i uses `row_adapters[i]` (None: base only).

    Rows without an adapter, or whose adapter does not target a module, get zero factors on
    that module and so exactly the base output. Putting rows that share an adapter next to each
    other in runs of equal length lets the plan read each adapter's factors once per module.
    """
    if not row_adapters:
        raise ValueError("A batch plan needs at least one row")

    # Distinct adapters get slots in order of first appearance.
    slot_of_key: dict[str, int] = {}
    slot_adapters: list[LoadedAdapter] = []
    for adapter in row_adapters:
        if adapter is not None and adapter.key not in slot_of_key:
            slot_of_key[adapter.key] = len(slot_adapters)
            slot_adapters.append(adapter)

    row_keys = [adapter.key if adapter is not None else None for adapter in row_adapters]
    groups, group_rows = row_groups(row_keys)
    group_adapters = [row_adapters[group * group_rows] for group in range(groups)]

    module_paths = sorted({path for adapter in slot_adapters for path in adapter.modules})
    modules = {
        path: build_module_plan(
            path, group_adapters, group_rows, slot_of_key, device=device, dtype=dtype
        )
        for path in module_paths
    }

    return BatchPlan(
        batch_size=len(row_adapters),
        adapter_keys=tuple(adapter.key for adapter in slot_adapters),
        row_adapter_keys=tuple(row_keys),
        modules=modules,
    )


def build_module_plan(
    module_path: str,
    group_adapters: Sequence[LoadedAdapter | None],
    group_rows: int,
    slot_of_key: dict[str, int],
    *,
    device: torch.device | str,
    dtype: torch.dtype,
) -> ModulePlan:
    """Stack the factors that each group of rows applies to `module_path`."""
    group_weights: list[LoraModuleWeights | None] = [
        adapter.modules.get(module_path) if adapter is not None else None
        for adapter in group_adapters
    ]
    present = [weights for weights in group_weights if weights is not None]
    first = present[0]
    in_features, out_features = first.in_features, first.out_features
    for adapter, weights in zip(group_adapters, group_weights):
        if weights is not None and (
            weights.in_features != in_features or weights.out_features != out_features
        ):
            raise ValueError(
                f"Adapter {adapter.key} has LoRA shapes {tuple(weights.lora_a.shape)} / "
                f"{tuple(weights.lora_b.shape)} on {module_path}, which do not match "
                f"in_features={in_features}, out_features={out_features} of the other adapters"
            )
    group_slots = tuple(
        slot_of_key[adapter.key] if weights is not None else -1
        for adapter, weights in zip(group_adapters, group_weights)
    )
    max_rank = max(weights.rank for weights in present)
    scales = {weights.scale for weights in present}
    uniform = len(present) == len(group_weights) and all(w.rank == max_rank for w in present)

    # Fast path: one group needs no copy at all, so switching a single stream to another cached
    # adapter costs no weight traffic.
    if uniform and len(scales) == 1 and same_device(first.a_t.device, device):
        if len(present) == 1:
            a_t = first.a_t.to(dtype=dtype).unsqueeze(0)  # [1, in, r], a view when dtypes match
            b_t = first.b_t.to(dtype=dtype).unsqueeze(0)  # [1, r, out]
        else:
            a_t = torch.stack([w.a_t for w in present]).to(dtype=dtype)  # [groups, in, r]
            b_t = torch.stack([w.b_t for w in present]).to(dtype=dtype)  # [groups, r, out]
        return ModulePlan(
            groups=len(group_weights),
            group_rows=group_rows,
            max_rank=max_rank,
            a_t=a_t,
            b_t=b_t,
            alpha=float(first.scale),
            group_slots=group_slots,
        )

    # General case: zero-pad ranks, zero factors for groups without LoRA here, and each
    # group's scale folded into its B.
    groups = len(group_weights)
    a_t = torch.zeros(groups, in_features, max_rank, device=device, dtype=dtype)
    b_t = torch.zeros(groups, max_rank, out_features, device=device, dtype=dtype)
    for group, weights in enumerate(group_weights):
        if weights is None:
            continue
        rank = weights.rank
        a_t[group, :, :rank] = weights.a_t.to(device=device, dtype=dtype)  # [in, rank]
        b_t[group, :rank, :] = weights.b_t.to(device=device, dtype=dtype) * weights.scale
    return ModulePlan(
        groups=groups,
        group_rows=group_rows,
        max_rank=max_rank,
        a_t=a_t,
        b_t=b_t,
        alpha=1.0,
        group_slots=group_slots,
    )


def apply_module_plan(x: torch.Tensor, output: torch.Tensor, plan: ModulePlan) -> None:
    """Add the plan's LoRA term to `output` [batch, seq, out] in place, for input x [batch, seq, in]."""
    tokens = plan.group_rows * x.shape[1]
    grouped_x = x.reshape(plan.groups, tokens, x.shape[-1])  # [groups, rows * seq, in]
    hidden = torch.bmm(grouped_x, plan.a_t)  # [groups, rows * seq, max_rank]
    grouped_output = output.view(plan.groups, tokens, output.shape[-1])  # [groups, rows * seq, out]
    grouped_output.baddbmm_(hidden, plan.b_t, alpha=plan.alpha)


def same_device(tensor_device: torch.device, device: torch.device | str) -> bool:
    """Return whether a tensor on `tensor_device` is already on `device` ("cuda" means "cuda:0")."""
    wanted = torch.device(device)
    if wanted.type != tensor_device.type:
        return False
    return wanted.index is None or wanted.index == (tensor_device.index or 0)


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
            if module_plan is None:
                return None

            x = args[0]  # [batch, seq, in]
            if x.shape[0] != plan.batch_size:
                raise RuntimeError(
                    f"{path} received a batch of {x.shape[0]} rows, but the active LoRA plan is "
                    f"for {plan.batch_size} rows"
                )

            # Conv1D returns a fresh contiguous tensor, so adding in place changes nothing else
            # and saves a copy of the output per module.
            if not output.is_contiguous():
                output = output.contiguous()
            apply_module_plan(x, output, module_plan)
            return output

        return apply_lora
