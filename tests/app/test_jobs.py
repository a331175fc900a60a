"""Job state changes that need no worker: queueing, cancelling, the stale-job sweeper."""

from __future__ import annotations

import pytest
from django.utils import timezone

from adapters_app.models import AdapterVersion
from adapters_app.roles import SYSTEM
from training_app import services
from training_app.models import TrainingJob

pytestmark = pytest.mark.django_db


@pytest.fixture
def dataset(task, jsonl_file, good_rows):
    with jsonl_file(good_rows).open("rb") as handle:
        return services.dataset_upload(task, handle, original_name="data.jsonl", user=SYSTEM).dataset


@pytest.fixture
def queued_job(task, dataset, monkeypatch):
    # Keep the job queued: no broker message is sent in these tests.
    monkeypatch.setattr(services, "_enqueue", lambda job_id: None)
    return services.training_start(task, dataset_ids=[dataset.pk], user=SYSTEM)


def test_training_start_allocates_version_and_job(queued_job):
    assert queued_job.state == TrainingJob.State.QUEUED
    assert queued_job.version.number == 1
    assert queued_job.version.status == AdapterVersion.Status.TRAINING
    assert queued_job.warm_start_from is None
    assert queued_job.hyperparameters["target_modules"] == ["c_attn", "c_proj", "c_fc"]


def test_cancel_queued_job_is_immediate(queued_job):
    job = services.job_cancel(queued_job, user=SYSTEM)
    assert job.state == TrainingJob.State.CANCELLED
    job.version.refresh_from_db()
    assert job.version.status == AdapterVersion.Status.CANCELLED


def test_cancelled_job_is_not_claimed(queued_job):
    services.job_cancel(queued_job, user=SYSTEM)
    services.training_run(queued_job.pk)
    queued_job.refresh_from_db()
    assert queued_job.state == TrainingJob.State.CANCELLED


def test_redelivered_job_runs_once(queued_job):
    assert services._claim(queued_job.pk) is True
    assert services._claim(queued_job.pk) is False


def test_sweeper_fails_jobs_without_heartbeat(queued_job, settings):
    stale = timezone.now() - timezone.timedelta(seconds=settings.LORAWEB_JOB_HEARTBEAT_TIMEOUT + 5)
    TrainingJob.objects.filter(pk=queued_job.pk).update(state=TrainingJob.State.RUNNING, heartbeat_at=stale)

    assert services.sweep_stale_jobs() == 1
    queued_job.refresh_from_db()
    assert queued_job.state == TrainingJob.State.FAILED
    assert "stopped reporting" in queued_job.error
    queued_job.version.refresh_from_db()
    assert queued_job.version.status == AdapterVersion.Status.FAILED
