"""The browser flows through Django's test client: upload, train button, playground, admin rollback."""

from __future__ import annotations

import re
import time

import pytest
from django.test import Client
from django.urls import reverse

from adapters_app.models import ActivationEvent, AdapterVersion, Task
from training_app import demo_data
from training_app.models import Dataset, TrainingJob

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

TRAIN_FORM = {
    "preset": "balanced",
    "rank": "4",
    "alpha": "8",
    "target_modules": ["c_attn", "c_proj", "c_fc"],
    "learning_rate": "0.005",
    "epochs": "1",
    "batch_size": "16",
    "max_length": "48",
}


def wait_final(job: TrainingJob, timeout: float = 300) -> TrainingJob:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job.refresh_from_db()
        if job.is_final:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job.pk} still {job.state}")


@pytest.fixture
def browser(admin_user_with_password, tiny_base_dir) -> Client:
    client = Client()
    assert client.login(username="boss", password="pw-for-tests-only")
    return client


def click_train(browser: Client, slug: str, dataset: Dataset, start: str) -> TrainingJob:
    response = browser.post(
        reverse("training_app:training_new", args=[slug]), {**TRAIN_FORM, "datasets": [dataset.pk], "start": start}
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    job_id = int(re.search(r"/jobs/(\d+)/", response["Location"]).group(1))
    return wait_final(TrainingJob.objects.get(pk=job_id))


def test_upload_train_playground_rollback(celery_worker_process, browser, tmp_path):
    files = demo_data.write_demo_datasets(tmp_path)

    response = browser.post(reverse("adapters_app:dashboard"), {"slug": "digits", "name": "Digits"})
    assert response.status_code == 302
    task = Task.objects.get(slug="digits")

    with files["spell_digits_A1"].open("rb") as handle:
        response = browser.post(reverse("training_app:dataset_upload", args=["digits"]), {"file": handle})
    assert response.status_code == 302
    dataset = Dataset.objects.get(task=task)
    page = browser.get(response["Location"]).content.decode()
    assert "300" in page
    assert "spell_digits_A1.jsonl" in page

    task_page = browser.get(reverse("adapters_app:task_detail", args=["digits"])).content.decode()
    assert 'id="train-button"' in task_page
    assert "tiny GPT-2" in task_page, "every page names the base model in use"

    first = click_train(browser, "digits", dataset, "fresh")
    assert first.state == TrainingJob.State.SUCCEEDED, first.error
    job_page = browser.get(reverse("training_app:job_detail", args=[first.pk])).content.decode()
    assert 'data-state="succeeded"' in job_page

    second = click_train(browser, "digits", dataset, "active")
    assert second.state == TrainingJob.State.SUCCEEDED, second.error
    v1 = AdapterVersion.objects.get(task=task, number=1)
    v2 = AdapterVersion.objects.get(task=task, number=2)
    assert v2.parent_id == v1.pk

    # Whichever version the promotion rule left active, roll back to the other one in admin.
    task.refresh_from_db()
    target = v1 if task.active_version_id == v2.pk else v2
    changelist = reverse("admin:adapters_app_adapterversion_changelist")
    confirm = browser.post(changelist, {"action": "rollback_to_version", "_selected_action": [target.pk]})
    assert confirm.status_code == 200
    assert "reason" in confirm.content.decode()
    response = browser.post(
        changelist,
        {"action": "rollback_to_version", "_selected_action": [target.pk], "apply": "1", "reason": "compare in production"},
        follow=True,
    )
    assert response.status_code == 200
    task.refresh_from_db()
    assert task.active_version_id == target.pk
    event = ActivationEvent.objects.filter(task=task).first()
    assert event.kind == "rollback"
    assert event.reason == "compare in production"
    assert event.actor.username == "boss"

    response = browser.post(
        changelist,
        {"action": "rollback_to_version", "_selected_action": [target.pk], "apply": "1", "reason": "again"},
        follow=True,
    )
    assert "already the active version" in response.content.decode()
    assert ActivationEvent.objects.filter(task=task, reason="again").count() == 0

    prompt = demo_data.heldout_prompts("spell-digits", count=1)[0][0]
    form = {"task": "digits", "prompt": prompt, "max_tokens": "8", "temperature": "0", "top_p": "1"}
    page = browser.post(reverse("adapters_app:playground"), form).content.decode()
    assert f"digits {target.label}" in page
    pinned = browser.post(reverse("adapters_app:playground"), {**form, "version": str(target.number)}).content.decode()
    answer = re.search(r'id="answer-text">(.*?)</pre>', page, re.S).group(1)
    assert re.search(r'id="answer-text">(.*?)</pre>', pinned, re.S).group(1) == answer
