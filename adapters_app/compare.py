"""Compare versions of a task: eval losses, answers to the same prompts, per-layer updates."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from .inference import Admission, SamplingParams, generate
from .models import AdapterVersion, Task

logger = logging.getLogger(__name__)

LAYER_PATTERN = re.compile(r"transformer\.h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)$")
MODULE_KINDS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


@dataclass
class Column:
    """One compared model: a version, or the bare base when `version` is None."""

    label: str
    version: AdapterVersion | None
    answers: list[str] = field(default_factory=list)
    # {(layer, kind): norm} of scale·B·A, and of its change from the parent version.
    update_norms: dict[tuple[int, str], float] = field(default_factory=dict)
    parent_shift: dict[tuple[int, str], float] = field(default_factory=dict)


@dataclass
class Comparison:
    task: Task
    columns: list[Column]
    # Rows of (dataset name, [loss per column or None]).
    losses: list[tuple[str, list[float | None]]]
    prompts: list[str]
    layers: int


def _module_norms(adapter) -> dict[tuple[int, str], float]:
    from .serving.inspect import update_norms

    norms = {}
    for path, norm in update_norms(adapter).items():
        match = LAYER_PATTERN.search(path)
        if match:
            norms[(int(match[1]), match[2])] = norm
    return norms


def _shift_from_parent(adapter, parent) -> dict[tuple[int, str], float]:
    """Frobenius norm of the change in scale·B·A from the parent, per module."""
    import torch

    shifts = {}
    for path, weights in adapter.modules.items():
        match = LAYER_PATTERN.search(path)
        if not match:
            continue
        update = weights.scale * (weights.lora_b.float() @ weights.lora_a.float())
        before = parent.modules.get(path)
        if before is not None:
            update = update - before.scale * (before.lora_b.float() @ before.lora_a.float())
        shifts[(int(match[1]), match[2])] = float(torch.linalg.matrix_norm(update).item())
    return shifts


def compare_versions(
    task: Task,
    versions: list[AdapterVersion],
    *,
    include_base: bool,
    prompts: list[str],
    max_tokens: int = 32,
) -> Comparison:
    """Build the comparison of `versions` (and the bare base) of one task.

    Generation is greedy, so differences between columns come from the adapters alone.
    """
    from .inference import get_engine, version_key
    from .serving.adapters import read_adapter

    engine = get_engine()
    columns = [Column(label=version.label, version=version) for version in versions]
    if include_base:
        columns.insert(0, Column(label="base", version=None))

    names = _dataset_names(task)
    keys = sorted({key for version in versions for key in version.eval_loss()})
    # The base's loss on a split is the same whichever version's run measured it.
    base_losses: dict[str, float] = {}
    for version in versions:
        base_losses.update(version.metrics.get("base_eval_loss", {}))
    losses = []
    for key in keys:
        row = [base_losses.get(key) if column.version is None else column.version.eval_loss().get(key) for column in columns]
        losses.append((names.get(key, key), row))

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    for column in columns:
        admission = Admission(model=column.label, task=task, version=column.version, params=params)
        column.answers = [generate(admission, prompt).result.text for prompt in prompts]
        if column.version is None:
            continue
        adapter = read_adapter(column.version.adapter_dir(), engine.base, key=version_key(column.version))
        column.update_norms = _module_norms(adapter)
        parent = column.version.parent
        if parent is not None and parent.is_ready:
            parent_adapter = read_adapter(parent.adapter_dir(), engine.base, key=version_key(parent))
            column.parent_shift = _shift_from_parent(adapter, parent_adapter)

    return Comparison(
        task=task,
        columns=columns,
        losses=losses,
        prompts=prompts,
        layers=int(engine.base.model.config.n_layer),
    )


def _dataset_names(task: Task) -> dict[str, str]:
    return {f"dataset-{pk}": name for pk, name in task.datasets.values_list("pk", "original_name")}


def layer_map_svg(norms: dict[tuple[int, str], float], layers: int, scale_max: float, title: str) -> str:
    """Render per-layer norms as an SVG grid: one row per layer, one column per module kind."""
    from django.utils.html import escape

    cell_w, cell_h, left, top = 46, 14, 34, 18
    width = left + cell_w * len(MODULE_KINDS) + 4
    height = top + cell_h * layers + 4
    parts = [
        f'<svg class="layer-map" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(title)}">'
    ]
    for column, kind in enumerate(MODULE_KINDS):
        short = kind.replace("attn.", "a.").replace("mlp.", "m.")
        parts.append(f'<text x="{left + column * cell_w + 2}" y="12" font-size="9" fill="#5b6474">{short}</text>')
    for layer in range(layers):
        y = top + layer * cell_h
        parts.append(f'<text x="2" y="{y + 10}" font-size="9" fill="#5b6474">h.{layer}</text>')
        for column, kind in enumerate(MODULE_KINDS):
            value = norms.get((layer, kind))
            x = left + column * cell_w
            if value is None:
                parts.append(f'<rect x="{x}" y="{y}" width="{cell_w - 2}" height="{cell_h - 2}" fill="#f0f1f4"/>')
                continue
            # Darker blue for larger updates, relative to the largest in the comparison.
            strength = 0.0 if scale_max <= 0 else min(value / scale_max, 1.0)
            lightness = 95 - int(strength * 60)
            parts.append(
                f'<rect x="{x}" y="{y}" width="{cell_w - 2}" height="{cell_h - 2}" fill="hsl(222, 65%, {lightness}%)">'
                f"<title>h.{layer} {kind}: {value:.4g}</title></rect>"
            )
    parts.append("</svg>")
    return "".join(parts)
