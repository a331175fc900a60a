"""`manage.py train` runs a job in-process and records it like the worker does."""

from __future__ import annotations

import io

import pytest
from django.core.management import CommandError, call_command

from adapters_app.roles import SYSTEM
from training_app import services
from training_app.models import TrainingJob

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def dataset(task, jsonl_file, good_rows):
    with jsonl_file(good_rows).open("rb") as handle:
        return services.dataset_upload(task, handle, original_name="data.jsonl", user=SYSTEM).dataset


def test_train_command_records_version(task, dataset, capsys):
    from adapters_app.models import GoldenPrompt

    GoldenPrompt.objects.create(task=task, prompt="Say 3", expected="number 3")
    output = io.StringIO()
    call_command(
        "train", "poetry", "--dataset", str(dataset.pk), "--preset", "quick",
        "--set", "max_length=32", "--set", "batch_size=4", stdout=output,
    )

    job = TrainingJob.objects.get()
    assert job.state == TrainingJob.State.SUCCEEDED
    assert job.hyperparameters["rank"] == 4
    assert job.hyperparameters["max_length"] == 32
    assert job.eval_history, "validation points are recorded for the chart"
    assert job.tokens_seen > 0
    job.version.refresh_from_db()
    assert job.version.is_active
    record = job.version.metrics["record"]
    assert record["datasets"] == [
        {"id": dataset.pk, "file_name": "data.jsonl", "sha256": dataset.sha256, "split_seed": 0, "role": "train and validation"}
    ]
    assert record["base_model"]["weight_hash"] == job.version.base_weight_hash
    assert set(record["versions"]) == {"torch", "transformers", "peft"}
    assert record["hyperparameters"]["seed"] == 0
    assert record["steps"] == job.step
    assert record["tokens_seen"] == job.tokens_seen

    golden = job.version.metrics["golden"]
    assert golden["count"] == 1
    assert golden["results"][0]["expected"] == "number 3"
    assert 0.0 <= golden["similarity"] <= 1.0
    assert 0.0 <= golden["base_similarity"] <= 1.0
    assert "v1" in output.getvalue()
    assert "ETA" in capsys.readouterr().out


def test_train_command_rejects_bad_value(task, dataset):
    with pytest.raises(CommandError) as error:
        call_command("train", "poetry", "--dataset", str(dataset.pk), "--set", "rank=0")
    assert "rank" in str(error.value)
    assert TrainingJob.objects.count() == 0
