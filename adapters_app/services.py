"""State changes of tasks and versions; views, admin, API and tasks all call these."""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Max
from django.utils import timezone
from django.utils.translation import gettext as _

from .base_model import current_base_choice
from .models import ActivationEvent, AdapterVersion, ApiToken, Task

logger = logging.getLogger(__name__)

MODEL_NAME_PATTERN = re.compile(r"^(?P<slug>[a-z0-9-]+)(?:@v(?P<number>\d+))?$")


class ServiceError(Exception):
    """An operation the user asked for cannot be done; the message is shown to them."""

    status_code = 400

    def __init__(self, message: str, *, code: str = "invalid", status_code: int | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        if status_code is not None:
            self.status_code = status_code


class NotFound(ServiceError):
    status_code = 404


def task_create(*, slug: str, name: str, description: str = "", user: AbstractBaseUser | None = None) -> Task:
    task = Task(
        slug=slug.strip(),
        name=name.strip() or slug.strip(),
        description=description.strip(),
        base_model_id=current_base_choice().model_id,
        min_improvement=settings.LORAWEB_DEFAULT_MIN_IMPROVEMENT,
        forgetting_tolerance=settings.LORAWEB_DEFAULT_FORGETTING_TOLERANCE,
        created_by=user if user is not None and user.is_authenticated else None,
    )
    try:
        task.full_clean(exclude=["active_version"], validate_unique=False)
    except ValidationError as error:
        messages = [f"{field}: {' '.join(errors)}" for field, errors in error.message_dict.items()]
        raise ServiceError("; ".join(messages), code="invalid_task") from error

    try:
        with transaction.atomic():
            task.save()
    except IntegrityError:
        raise ServiceError(
            _("A task with the slug “%(slug)s” already exists; choose another slug.") % {"slug": task.slug},
            code="duplicate_slug",
            status_code=409,
        ) from None

    logger.info("Created task %s", task.slug)
    return task


def task_get(slug: str) -> Task:
    try:
        return Task.objects.select_related("active_version").get(slug=slug)
    except Task.DoesNotExist:
        raise NotFound(_("No task with the slug “%(slug)s”.") % {"slug": slug}, code="task_not_found") from None


def version_allocate(task: Task, *, parent: AdapterVersion | None, hyperparameters: dict) -> AdapterVersion:
    """Create the next version row of a task; call inside a transaction.

    The task row is locked first, so two concurrent calls cannot take the same number
    (on SQLite the write transaction itself serializes them).
    """
    Task.objects.select_for_update().filter(pk=task.pk).first()
    highest = task.versions.aggregate(highest=Max("number"))["highest"] or 0
    return AdapterVersion.objects.create(
        task=task,
        number=highest + 1,
        parent=parent,
        hyperparameters=hyperparameters,
        base_model_id=task.base_model_id,
    )


def version_get(task: Task, number: int) -> AdapterVersion:
    try:
        return task.versions.get(number=number)
    except AdapterVersion.DoesNotExist:
        raise NotFound(
            _("Task “%(slug)s” has no version %(number)s.") % {"slug": task.slug, "number": number},
            code="version_not_found",
        ) from None


@dataclass(frozen=True)
class ActivationResult:
    task: Task
    previous: AdapterVersion | None
    current: AdapterVersion
    changed: bool
    event: ActivationEvent | None

    @property
    def message(self) -> str:
        if not self.changed:
            return _("%(version)s is already the active version of %(task)s; nothing changed.") % {
                "version": self.current.label,
                "task": self.task.slug,
            }
        return _("%(task)s now serves %(version)s (was %(previous)s).") % {
            "task": self.task.slug,
            "version": self.current.label,
            "previous": self.previous.label if self.previous else _("no adapter"),
        }


def version_activate(
    version: AdapterVersion,
    *,
    reason: str,
    user: AbstractBaseUser | None = None,
    kind: str = ActivationEvent.Kind.ACTIVATE,
) -> ActivationResult:
    """Make `version` the active version of its task and record who did it and why.

    Activating the version that is already active changes nothing and writes no event.
    """
    reason = reason.strip()
    if not reason:
        raise ServiceError(_("Give a reason for the activation; it is kept in the audit trail."), code="reason_required")

    with transaction.atomic():
        task = Task.objects.select_for_update().get(pk=version.task_id)
        version = AdapterVersion.objects.select_related("task").get(pk=version.pk)
        if version.status != AdapterVersion.Status.READY:
            raise ServiceError(
                _("%(version)s of %(task)s is %(status)s; only ready versions can be activated.")
                % {"version": version.label, "task": task.slug, "status": version.get_status_display()},
                code="version_not_ready",
                status_code=409,
            )

        previous = task.active_version
        if previous is not None and previous.pk == version.pk:
            return ActivationResult(task=task, previous=previous, current=version, changed=False, event=None)

        Task.objects.filter(pk=task.pk).update(active_version=version)
        task.active_version = version
        event = ActivationEvent.objects.create(
            task=task,
            from_version=previous,
            to_version=version,
            kind=kind,
            actor=user if user is not None and user.is_authenticated else None,
            reason=reason,
        )

    logger.info(
        "Task %s activated %s (was %s, %s): %s",
        task.slug,
        version.label,
        previous.label if previous else "none",
        kind,
        reason,
    )
    return ActivationResult(task=task, previous=previous, current=version, changed=True, event=event)


def task_rollback(version: AdapterVersion, *, reason: str, user: AbstractBaseUser | None = None) -> ActivationResult:
    return version_activate(version, reason=reason, user=user, kind=ActivationEvent.Kind.ROLLBACK)


def model_name_resolve(model: str) -> tuple[Task, AdapterVersion | None]:
    """Resolve an API model name (`slug` or `slug@vN`) to a task and the version to serve.

    Without `@vN` the task's active version is read now, at admission, so a rollback
    applies to every request admitted after it. A task with no active version is served
    by the bare base, and the returned version is None.
    """
    match = MODEL_NAME_PATTERN.match(model.strip())
    if match is None:
        raise NotFound(
            _("Unknown model “%(model)s”; use a task slug, optionally with a version such as “poetry@v2”.")
            % {"model": model},
            code="model_not_found",
        )

    task = task_get(match["slug"])
    if match["number"] is None:
        return task, task.active_version

    version = version_get(task, int(match["number"]))
    if not version.is_ready:
        raise ServiceError(
            _("%(version)s of %(task)s is %(status)s and cannot serve requests.")
            % {"version": version.label, "task": task.slug, "status": version.get_status_display()},
            code="version_not_ready",
            status_code=409,
        )
    return task, version


def api_token_create(user: AbstractBaseUser, *, name: str, expires_at: datetime | None = None) -> tuple[ApiToken, str]:
    """Create a token and return it with its secret, which is never stored and shown only now."""
    secret = "lw_" + secrets.token_urlsafe(32)
    token = ApiToken.objects.create(
        user=user,
        name=name.strip() or "token",
        prefix=secret[:10],
        key_hash=hashlib.sha256(secret.encode()).hexdigest(),
        expires_at=expires_at,
    )
    logger.info("Created API token %s for user %s", token.prefix, user.pk)
    return token, secret


def api_token_authenticate(secret: str) -> ApiToken | None:
    """Return the live token for a secret, or None when it is unknown, revoked or expired."""
    key_hash = hashlib.sha256(secret.encode()).hexdigest()
    token = ApiToken.objects.select_related("user").filter(key_hash=key_hash, revoked_at__isnull=True).first()
    if token is None or not token.user.is_active:
        return None

    now = timezone.now()
    if token.expires_at is not None and token.expires_at <= now:
        return None
    # One write per minute at most keeps hot API clients from writing on every request.
    if token.last_used_at is None or (now - token.last_used_at).total_seconds() > 60:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
    return token
