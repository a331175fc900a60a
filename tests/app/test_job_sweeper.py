"""The sweeper's clean-up of a job whose worker died, and the rule that a failed job stays failed."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.utils import timezone

from adapters_app.models import AdapterVersion
from adapters_app.roles import SYSTEM
from training_app import services
from training_app.messages import job_log_lines
from training_app.models import TrainingJob

pytestmark = pytest.mark.django_db


@pytest.fixture
def stale_job(task, jsonl_file, good_rows, settings):
    with jsonl_file(good_rows).open("rb") as handle:
        dataset = services.dataset_upload(task, handle, original_name="data.jsonl", user=SYSTEM).dataset
    job = services.training_start(task, dataset_ids=[dataset.pk], user=SYSTEM, enqueue=False)
    assert services._claim(job.pk)
    stale = timezone.now() - timezone.timedelta(seconds=settings.LORAWEB_JOB_HEARTBEAT_TIMEOUT + 5)
    TrainingJob.objects.filter(pk=job.pk).update(heartbeat_at=stale)
    return job


def test_sweeper_removes_dead_workers_files(stale_job, settings):
    folder = Path(settings.LORAWEB_ADAPTER_ROOT) / stale_job.task.slug
    number = stale_job.version.number
    left_over = [folder / f"v{number}-0a1b2c3d", folder / f".v{number}-0a1b2c3d.partial-4e5f6a7b"]
    other_version = folder / f"v{number}0-99999999"
    for path in [*left_over, other_version]:
        path.mkdir(parents=True)
        (path / "adapter_model.safetensors").write_bytes(b"partial")

    assert services.sweep_stale_jobs() == 1

    assert [path for path in left_over if path.exists()] == []
    assert other_version.is_dir(), "another version's folder with a longer number stays"
    job = TrainingJob.objects.get(pk=stale_job.pk)
    assert job.state == TrainingJob.State.FAILED
    assert job.version.status == AdapterVersion.Status.FAILED
    assert job.log[-1]["code"] == "worker_lost"
    assert "stopped reporting" in job_log_lines(job.log)[-1]


def test_failed_job_is_not_run_again(stale_job):
    services.sweep_stale_jobs()
    failed = TrainingJob.objects.get(pk=stale_job.pk)

    services.training_run(stale_job.pk)

    after = TrainingJob.objects.get(pk=stale_job.pk)
    assert after.state == TrainingJob.State.FAILED
    assert after.finished_at == failed.finished_at
    assert after.log == failed.log
