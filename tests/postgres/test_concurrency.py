"""Requests for one task that arrive together: version numbers and activations stay consistent."""

from __future__ import annotations

import threading
from typing import Callable

import pytest
from django.conf import settings
from django.db import connection, transaction
from django.test import Client

from adapters_app.models import ActivationEvent, AdapterVersion, Task
from adapters_app.roles import SYSTEM
from adapters_app.services import task_create, version_allocate
from training_app import demo_data, services

pytestmark = pytest.mark.django_db(transaction=True)

REQUESTS = 4


def together(count: int, action: Callable[[int], object]) -> list[object]:
    """Run `action(i)` in `count` threads released at the same moment; return results or exceptions."""
    barrier = threading.Barrier(count)
    results: list[object] = [None] * count

    def run(index: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[index] = action(index)
        except Exception as error:  # noqa: BLE001 - reported by the test's assertions
            results[index] = error
        finally:
            # Each thread has its own connection; an open one would block dropping the test database.
            connection.close()

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


@pytest.fixture
def admin_client_factory(django_user_model):
    admin = django_user_model.objects.create_superuser("root-of-tests", "", "pw-for-tests-only")

    def make() -> Client:
        client = Client()
        client.force_login(admin)
        return client

    return make


@pytest.fixture
def drop_queue():
    """The train requests queue messages that no worker reads here; remove them afterwards."""
    yield
    import redis

    try:
        redis.Redis.from_url(settings.LORAWEB_REDIS_URL, socket_connect_timeout=1).delete(
            settings.CELERY_TASK_DEFAULT_QUEUE
        )
    except redis.RedisError:
        pass


def test_train_requests_together_get_consecutive_versions(admin_client_factory, drop_queue, tmp_path):
    task = task_create(slug="together", name="Together", user=SYSTEM)
    files = demo_data.write_demo_datasets(tmp_path)
    with files["spell_digits_A1"].open("rb") as handle:
        dataset = services.dataset_upload(task, handle, original_name="a1.jsonl", user=SYSTEM).dataset
    clients = [admin_client_factory() for _ in range(REQUESTS)]
    body = {"dataset_ids": [dataset.pk], "hyperparameters": {"epochs": 1}}

    responses = together(
        REQUESTS,
        lambda index: clients[index].post(f"/api/v1/tasks/{task.slug}/versions", body, content_type="application/json"),
    )

    statuses = [getattr(response, "status_code", response) for response in responses]
    assert statuses == [202] * REQUESTS, [getattr(r, "content", r) for r in responses]
    numbers = sorted(response.json()["version"] for response in responses)
    assert numbers == list(range(1, REQUESTS + 1))
    assert sorted(AdapterVersion.objects.filter(task=task).values_list("number", flat=True)) == numbers
    assert len({response.json()["job_id"] for response in responses}) == REQUESTS


def test_activations_together_leave_one_consistent_history(admin_client_factory):
    task = task_create(slug="switch", name="Switch", user=SYSTEM)
    versions = []
    for _ in range(REQUESTS):
        with transaction.atomic():
            version = version_allocate(task, parent=None, hyperparameters={})
        AdapterVersion.objects.filter(pk=version.pk).update(status=AdapterVersion.Status.READY)
        versions.append(version)
    clients = [admin_client_factory() for _ in range(REQUESTS)]

    responses = together(
        REQUESTS,
        lambda index: clients[index].post(
            f"/api/v1/tasks/{task.slug}/activate",
            {"version": versions[index].number, "reason": f"request {index}"},
            content_type="application/json",
        ),
    )

    statuses = [getattr(response, "status_code", response) for response in responses]
    assert statuses == [200] * REQUESTS, [getattr(r, "content", r) for r in responses]
    events = list(ActivationEvent.objects.filter(task=task).order_by("pk"))
    assert len(events) == REQUESTS, "every activation changed the active version and is audited"
    # The events form one chain: each starts where the one before ended.
    assert events[0].from_version_id is None
    for before, after in zip(events, events[1:]):
        assert after.from_version_id == before.to_version_id
        assert after.created_at >= before.created_at
    assert {event.to_version_id for event in events} == {version.pk for version in versions}
    assert Task.objects.get(pk=task.pk).active_version_id == events[-1].to_version_id
