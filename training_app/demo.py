"""The demo scenario: two small tasks, a retrain from the active version, and the checks.

`demo_load_data` only creates the tasks and uploads their generated datasets (the
dashboard's "load demo" button). `demo_run` trains through the real worker and measures
what the product promises: each adapter beats the base, retraining task A leaves task B's
answers unchanged, and the base weights stay identical.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from django.db import transaction
from django.utils.translation import gettext_lazy as _

from adapters_app.models import AdapterVersion, Task
from adapters_app.roles import Actor
from adapters_app.services import task_create

from . import demo_data
from .models import Dataset, TrainingJob
from .services import dataset_upload, training_start

logger = logging.getLogger(__name__)

TASK_A = "spell-digits"
TASK_B = "reverse-words"
# Names and descriptions are stored in the language of whoever loads the demo.
TASKS = {
    TASK_A: (_("Spell out digits"), _("Turn a digit string such as 407 into words: four zero seven.")),
    TASK_B: (_("Reverse word lists"), _("Repeat a list of words in reverse order.")),
}
DATASET_FILES = {
    TASK_A: ("spell_digits_A1", "spell_digits_A2"),
    TASK_B: ("reverse_words_B1",),
}
HELDOUT = {TASK_A: "spell-digits", TASK_B: "reverse-words"}


def demo_load_data(*, user: Actor) -> list[Task]:
    """Create the demo tasks and upload their datasets; running it twice changes nothing.

    Needs the trainer role, which task_create and dataset_upload check.
    """
    tasks = []
    with tempfile.TemporaryDirectory(prefix="loraweb-demo-") as folder:
        paths = demo_data.write_demo_datasets(Path(folder))
        for slug, (name, description) in TASKS.items():
            with transaction.atomic():
                task = Task.objects.filter(slug=slug).first()
            if task is None:
                task = task_create(slug=slug, name=str(name), description=str(description), user=user)
            for key in DATASET_FILES[slug]:
                path = paths[key]
                with path.open("rb") as handle:
                    dataset_upload(task, handle, original_name=path.name, user=user)
            tasks.append(task)
    return tasks


def demo_dataset(task: Task, key: str) -> Dataset:
    return task.datasets.filter(original_name__startswith=key).order_by("pk").first()


def demo_hyperparameters(is_tiny: bool) -> dict:
    # The tiny random base needs a larger step size than the real GPT-2 to move in a few epochs.
    return {
        "rank": 8,
        "alpha": 16,
        "learning_rate": 3e-3 if is_tiny else 5e-4,
        "epochs": 4 if is_tiny else 3,
        "batch_size": 16,
        "max_length": 64,
    }


class DemoError(RuntimeError):
    pass


def wait_for_job(job: TrainingJob, *, timeout: float, report: Callable[[str], None]) -> TrainingJob:
    """Poll a job until it is final; complain early when no worker picks it up."""
    started = time.monotonic()
    warned = False
    last_step = -1
    while True:
        job.refresh_from_db()
        if job.is_final:
            return job
        waited = time.monotonic() - started
        if job.state == TrainingJob.State.QUEUED and waited > 30 and not warned:
            report("  still queued after 30 s: is the Celery worker running? (make run starts it)")
            warned = True
        if job.step != last_step and job.total_steps:
            report(f"  {job.task.slug} v{job.version.number}: step {job.step}/{job.total_steps}, loss {job.last_loss or 0:.3f}")
            last_step = job.step
        if waited > timeout:
            raise DemoError(f"job {job.pk} did not finish within {timeout:.0f} s (state {job.state})")
        time.sleep(1.0)


@dataclass
class DemoReport:
    base_hash_before: str
    base_hash_after: str = ""
    versions: list[AdapterVersion] = field(default_factory=list)
    accuracy: dict[int, float] = field(default_factory=dict)
    b_answers_before: list[str] = field(default_factory=list)
    b_answers_after: list[str] = field(default_factory=list)

    @property
    def b_unchanged(self) -> bool:
        return self.b_answers_before == self.b_answers_after


def exact_match(model: str, pairs: list[tuple[str, str]]) -> tuple[float, list[str]]:
    """Greedy answers for held-out prompts and the share that equal the expected text."""
    from adapters_app.inference import SamplingParams, complete

    answers = []
    for prompt, _expected in pairs:
        completion = complete(model, prompt, SamplingParams(max_tokens=24, temperature=0.0))
        answers.append(completion.result.text.strip())
    hits = sum(answer == expected for answer, (_prompt, expected) in zip(answers, pairs))
    return hits / max(len(pairs), 1), answers


def demo_run(*, user: Actor, report: Callable[[str], None], timeout: float = 1800) -> DemoReport:
    from adapters_app.inference import get_engine
    from adapters_app.serving.base import state_dict_hash

    tasks = {task.slug: task for task in demo_load_data(user=user)}
    task_a, task_b = tasks[TASK_A], tasks[TASK_B]
    engine = get_engine()
    result = DemoReport(base_hash_before=state_dict_hash(engine.base.model))
    hyperparameters = demo_hyperparameters(engine.base.is_tiny)
    heldout = {slug: demo_data.heldout_prompts(HELDOUT[slug], count=20) for slug in TASKS}

    def train(task: Task, key: str, warm_start: bool) -> AdapterVersion:
        dataset = demo_dataset(task, key)
        job = training_start(
            task, dataset_ids=[dataset.pk], warm_start=warm_start, hyperparameters=hyperparameters, user=user
        )
        report(f"Training {task.slug} v{job.version.number} on {dataset.original_name} ({'warm start' if warm_start else 'fresh'})")
        job = wait_for_job(job, timeout=timeout, report=report)
        if job.state != TrainingJob.State.SUCCEEDED:
            raise DemoError(f"job {job.pk} ended {job.state}: {job.error}")
        version = AdapterVersion.objects.get(pk=job.version_id)
        result.versions.append(version)
        accuracy, _answers = exact_match(f"{task.slug}@v{version.number}", heldout[task.slug])
        result.accuracy[version.pk] = accuracy
        return version

    train(task_a, "spell_digits_A1", warm_start=False)
    train(task_b, "reverse_words_B1", warm_start=False)
    _accuracy, result.b_answers_before = exact_match(TASK_B, heldout[TASK_B])
    train(task_a, "spell_digits_A2", warm_start=True)
    _accuracy, result.b_answers_after = exact_match(TASK_B, heldout[TASK_B])
    result.base_hash_after = state_dict_hash(engine.base.model)
    return result


def format_report(result: DemoReport) -> str:
    """Render the demo outcome as a plain-text table."""
    names = {dataset.eval_key: dataset.original_name for dataset in Dataset.objects.all()}
    keys = sorted({key for version in result.versions for key in version.eval_loss()})
    header = ["version", "parent", "active"] + [f"loss {names.get(key, key)}" for key in keys] + ["exact match"]
    rows = [header]

    base_losses: dict[str, float] = {}
    for version in result.versions:
        base_losses.update(version.metrics.get("base_eval_loss", {}))
    rows.append(["base (no adapter)", "", ""] + [_fmt(base_losses.get(key)) for key in keys] + [""])

    for version in result.versions:
        version.refresh_from_db()
        version.task.refresh_from_db()
        losses = version.eval_loss()
        rows.append(
            [
                str(version),
                version.parent.label if version.parent else "fresh",
                "yes" if version.is_active else "no",
            ]
            + [_fmt(losses.get(key)) for key in keys]
            + [f"{result.accuracy.get(version.pk, 0.0):.0%}"]
        )

    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.append("")
    for version in result.versions:
        lines.append(f"{version}: {version.promotion_note}")
    lines.append("")
    lines.append(f"{TASK_B} answers unchanged after retraining {TASK_A}: {'yes' if result.b_unchanged else 'NO'}")
    same = result.base_hash_before == result.base_hash_after
    lines.append(f"base weights sha256 before: {result.base_hash_before}")
    lines.append(f"base weights sha256 after:  {result.base_hash_after} ({'identical' if same else 'CHANGED'})")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
