"""Cancelling a running job through the API stops the real worker within seconds."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from django.conf import settings

from adapters_app.models import AdapterVersion
from training_app import demo_data
from training_app.models import TrainingJob

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_cancel_running_job(celery_worker_process, api_client, tmp_path):
    files = demo_data.write_demo_datasets(tmp_path)
    api_client.post("/api/v1/tasks", {"slug": "cancel-me", "name": "Cancel me"}, content_type="application/json")
    with files["spell_digits_A1"].open("rb") as handle:
        dataset_id = api_client.post("/api/v1/tasks/cancel-me/datasets", {"file": handle}).json()["id"]

    # Far more steps than the test waits for, so only the cancel can end the job early.
    body = {"dataset_ids": [dataset_id], "hyperparameters": {"epochs": 200, "batch_size": 4, "max_length": 32}}
    job_id = api_client.post("/api/v1/tasks/cancel-me/versions", body, content_type="application/json").json()["job_id"]

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = api_client.get(f"/api/v1/jobs/{job_id}").json()
        if job["state"] == "running" and job["step"] > 0:
            break
        time.sleep(0.2)
    assert job["state"] == "running", job

    asked = time.monotonic()
    response = api_client.post(f"/api/v1/jobs/{job_id}/cancel")
    assert response.status_code == 200
    assert response.json()["cancel_requested"] is True
    while time.monotonic() - asked < 30:
        job = api_client.get(f"/api/v1/jobs/{job_id}").json()
        if job["state"] != "running":
            break
        time.sleep(0.2)

    assert job["state"] == "cancelled", job
    assert time.monotonic() - asked < 10, "the loop checks the cancel flag between steps"
    assert job["step"] < job["total_steps"]
    version = AdapterVersion.objects.get(training_job__pk=job_id)
    assert version.status == AdapterVersion.Status.CANCELLED
    assert not list((Path(settings.LORAWEB_ADAPTER_ROOT) / "cancel-me").glob("*")), "no version files are kept"
    assert TrainingJob.objects.get(pk=job_id).finished_at is not None
