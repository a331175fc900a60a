"""Decide whether a freshly trained version becomes active: the task's promotion policy.

A version is activated automatically only when two things hold. Its validation loss on the
data it was just trained on beats the active version's by the task's minimum improvement.
No dataset the task trained on before got worse by more than the task's forgetting
tolerance. Otherwise it stays a candidate with the reason stored on it, and a maintainer can
still activate it by hand.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Sequence

from django.conf import settings

from adapters_app.messages import PROMOTION_MESSAGES, render_message
from adapters_app.models import ActivationEvent, AdapterVersion, Task
from adapters_app.roles import SYSTEM
from adapters_app.services import version_activate

from .models import Dataset, TrainingJob

if TYPE_CHECKING:
    from .trainer import TrainingResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    activate: bool
    code: str
    params: dict = field(default_factory=dict)


def decide_promotion(
    *,
    has_active: bool,
    auto_activate: bool,
    new_scores: Mapping[str, float],
    active_scores: Mapping[str, float],
    new_keys: Sequence[str],
    names: Mapping[str, str],
    active_label: str = "",
    min_improvement: float = 0.0,
    forgetting_tolerance: float = 0.1,
) -> Decision:
    """Apply the promotion policy to eval losses keyed by dataset (`dataset-<id>`).

    `new_keys` are the datasets of this training job; every other key present in both score
    maps is an older dataset, checked for forgetting.
    """
    if not auto_activate:
        return Decision(False, "auto_activation_off")
    if not has_active:
        return Decision(True, "first_version")

    compared = [key for key in new_keys if key in new_scores and key in active_scores]
    new_loss = _mean([new_scores[key] for key in compared])
    active_loss = _mean([active_scores[key] for key in compared])
    params = {"new": f"{new_loss:.4f}", "active": f"{active_loss:.4f}", "label": active_label}
    if not compared or not new_loss < active_loss - min_improvement:
        return Decision(False, "not_better", params)

    for key in sorted(set(new_scores) & set(active_scores) - set(new_keys)):
        if new_scores[key] - active_scores[key] > forgetting_tolerance:
            forgetting = {
                "dataset": names.get(key, key),
                "new": f"{new_scores[key]:.4f}",
                "active": f"{active_scores[key]:.4f}",
                "label": active_label,
                "tolerance": f"{forgetting_tolerance:g}",
            }
            return Decision(False, "forgets", forgetting)

    return Decision(True, "beats_active", params)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("inf")


def promote_version(job: TrainingJob, version: AdapterVersion, result: TrainingResult) -> Decision:
    """Apply the task's policy to a version that just finished training, and record why."""
    task = Task.objects.select_related("active_version").get(pk=job.task_id)
    active = task.active_version
    new_keys = [dataset.eval_key for dataset in job.datasets.all()]
    active_scores = _active_scores(job, active, result) if active is not None else {}
    names = {dataset.eval_key: dataset.original_name for dataset in task.datasets.all()}

    decision = decide_promotion(
        has_active=active is not None,
        auto_activate=task.auto_activate,
        new_scores=result.eval_loss,
        active_scores=active_scores,
        new_keys=new_keys,
        names=names,
        active_label=active.label if active is not None else "",
        min_improvement=task.min_improvement,
        forgetting_tolerance=task.forgetting_tolerance,
    )

    note = render_message(PROMOTION_MESSAGES, decision.code, decision.params, translate=False)
    promotion = {"code": decision.code, "params": decision.params, "active_scores": active_scores}
    AdapterVersion.objects.filter(pk=version.pk).update(promotion_note=note, promotion=promotion)
    if decision.activate:
        version_activate(version, reason=note, user=SYSTEM, kind=ActivationEvent.Kind.AUTO)
    logger.info("Promotion of %s: %s", version, note)
    return decision


def _active_scores(job: TrainingJob, active: AdapterVersion, result: TrainingResult) -> dict[str, float]:
    """Eval losses of the active version on every dataset the new version was scored on."""
    # Warm-started from the active version: the trainer scored it on every split before training.
    if job.warm_start_from_id == active.pk and result.initial_eval_loss is not None:
        return dict(result.initial_eval_loss)

    scores = {key: loss for key, loss in active.eval_loss().items() if key in result.eval_loss}
    missing = [key for key in result.eval_loss if key not in scores]
    if missing:
        scores.update(_evaluate_active(job, active, missing))
    return scores


def _evaluate_active(job: TrainingJob, active: AdapterVersion, keys: list[str]) -> dict[str, float]:
    from adapters_app.base_model import current_base_choice

    from .services import dataset_split
    from .trainer import evaluate_adapter

    datasets = Dataset.objects.filter(pk__in=[int(key.removeprefix("dataset-")) for key in keys])
    eval_sets = {dataset.eval_key: dataset_split(dataset)[1] for dataset in datasets}
    return evaluate_adapter(
        current_base_choice().path,
        active.adapter_dir(),
        eval_sets,
        max_length=int(job.hyperparameters.get("max_length", 256)),
        device=settings.LORAWEB_DEVICE,
    )
