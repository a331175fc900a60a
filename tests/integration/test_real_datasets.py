"""Train versions on real public datasets through the worker (skipped when they are absent)."""

from __future__ import annotations

import time

import pytest

from adapters_app.models import AdapterVersion
from adapters_app.roles import SYSTEM
from adapters_app.services import task_create
from training_app import services
from training_app.models import TrainingJob

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

# A few steps are enough to show that real files flow through upload, training and scoring.
HYPERPARAMETERS = {"rank": 4, "alpha": 8, "learning_rate": 3e-3, "epochs": 1, "max_steps": 12, "batch_size": 8, "max_length": 96}


def train_and_wait(task, dataset_ids: list[int], warm_start: bool) -> TrainingJob:
    job = services.training_start(task, dataset_ids=dataset_ids, warm_start=warm_start, hyperparameters=HYPERPARAMETERS, user=SYSTEM)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job.refresh_from_db()
        if job.is_final:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job.pk} still {job.state}")


@pytest.mark.parametrize(
    ("first", "second"),
    [("poems_A1.jsonl", "poems_A2.jsonl"), ("translate_B1.csv", None), ("tang_poems.jsonl", None)],
)
def test_train_on_real_files(celery_worker_process, shared_datasets, first, second):
    task = task_create(slug=first.split(".")[0].replace("_", "-").lower(), name=first, user=SYSTEM)
    with (shared_datasets / first).open("rb") as handle:
        dataset = services.dataset_upload(task, handle, original_name=first, user=SYSTEM).dataset

    job = train_and_wait(task, [dataset.pk], warm_start=False)
    assert job.state == TrainingJob.State.SUCCEEDED, job.error
    version = AdapterVersion.objects.get(pk=job.version_id)
    key = dataset.eval_key
    assert version.metrics["eval_loss"][key] < version.metrics["base_eval_loss"][key]
    assert version.is_active

    if second is None:
        return
    with (shared_datasets / second).open("rb") as handle:
        newer = services.dataset_upload(task, handle, original_name=second, user=SYSTEM).dataset
    job = train_and_wait(task, [newer.pk], warm_start=True)
    assert job.state == TrainingJob.State.SUCCEEDED, job.error
    retrained = AdapterVersion.objects.get(pk=job.version_id)
    assert retrained.parent_id == version.pk
    assert set(retrained.metrics["eval_loss"]) == {key, newer.eval_key}
    assert retrained.metrics["eval_loss"][newer.eval_key] < retrained.metrics["initial_eval_loss"][newer.eval_key]
