"""Activation and rollback services: the audit trail and the no-op case."""

from __future__ import annotations

import pytest

from adapters_app.models import ActivationEvent, AdapterVersion
from adapters_app.roles import SYSTEM
from adapters_app.services import ServiceError, task_rollback, version_activate, version_allocate

pytestmark = pytest.mark.django_db


def ready_version(task) -> AdapterVersion:
    version = version_allocate(task, parent=None, hyperparameters={})
    version.status = AdapterVersion.Status.READY
    version.save(update_fields=["status"])
    return version


def test_version_numbers_increase_per_task(task):
    from adapters_app.services import task_create

    other = task_create(slug="other", name="Other", user=SYSTEM)
    numbers = [version_allocate(task, parent=None, hyperparameters={}).number for _ in range(3)]
    assert numbers == [1, 2, 3]
    assert version_allocate(other, parent=None, hyperparameters={}).number == 1


def test_activate_records_event(task, user):
    v1, v2 = ready_version(task), ready_version(task)
    version_activate(v1, reason="first", user=user)
    result = version_activate(v2, reason="better", user=user)

    task.refresh_from_db()
    assert task.active_version_id == v2.pk
    assert result.changed is True
    assert result.previous == v1
    event = ActivationEvent.objects.get(pk=result.event.pk)
    assert (event.from_version, event.to_version, event.actor, event.reason) == (v1, v2, user, "better")


def test_activating_active_version_is_noop(task, user):
    v1 = ready_version(task)
    version_activate(v1, reason="first", user=user)
    result = version_activate(v1, reason="again", user=user)

    assert result.changed is False
    assert "already the active version" in result.message
    assert ActivationEvent.objects.filter(task=task).count() == 1


def test_rollback_kind_and_reason_required(task, user):
    v1, v2 = ready_version(task), ready_version(task)
    version_activate(v2, reason="new", user=user)

    with pytest.raises(ServiceError) as error:
        task_rollback(v1, reason="   ", user=user)
    assert error.value.code == "reason_required"

    result = task_rollback(v1, reason="v2 is worse", user=user)
    assert result.event.kind == ActivationEvent.Kind.ROLLBACK


def test_only_ready_versions_activate(task, user):
    training = version_allocate(task, parent=None, hyperparameters={})
    with pytest.raises(ServiceError) as error:
        version_activate(training, reason="too early", user=user)
    assert error.value.code == "version_not_ready"
    assert error.value.status_code == 409
