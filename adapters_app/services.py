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
from .roles import Actor, Role, actor_user, has_role, require_role

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


def broken_version_error(version: AdapterVersion, *, active: bool = False) -> ServiceError:
    """Return the refusal for a version whose adapter files are damaged (see adapters_app.integrity).

    The reason, with its server paths, is shown on the task page, not to API clients.
    """
    values = {"task": version.task.slug, "version": version.label}
    if active:
        message = _(
            "Task “%(task)s” serves %(version)s, whose adapter file is missing or damaged, so its requests "
            "fail until a maintainer rolls the task back to a ready version, trains a new version or "
            "imports the adapter again."
        )
    else:
        message = _(
            "%(version)s of task “%(task)s” is broken: its adapter file is missing or damaged. Train a new "
            "version or import the adapter again, or roll back to a ready version."
        )
    return ServiceError(message % values, code="version_broken", status_code=409)


def task_create(*, slug: str, name: str, description: str = "", user: Actor) -> Task:
    """Create a task with the default promotion policy; needs the trainer role."""
    require_role(user, Role.TRAINER)
    task = Task(
        slug=slug.strip(),
        name=name.strip() or slug.strip(),
        description=description.strip(),
        base_model_id=current_base_choice().model_id,
        min_improvement=settings.LORAWEB_DEFAULT_MIN_IMPROVEMENT,
        forgetting_tolerance=settings.LORAWEB_DEFAULT_FORGETTING_TOLERANCE,
        created_by=actor_user(user),
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
    user: Actor,
    kind: str = ActivationEvent.Kind.ACTIVATE,
) -> ActivationResult:
    """Make `version` the active version of its task and record who did it and why.

    Needs the maintainer role; automatic promotion after training passes SYSTEM. Activating
    the version that is already active changes nothing and writes no event.
    """
    require_role(user, Role.MAINTAINER)
    reason = reason.strip()
    if not reason:
        raise ServiceError(_("Give a reason for the activation; it is kept in the audit trail."), code="reason_required")

    with transaction.atomic():
        task = Task.objects.select_for_update().get(pk=version.task_id)
        version = AdapterVersion.objects.select_related("task").get(pk=version.pk)
        if version.is_broken:
            raise broken_version_error(version)
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
            actor=actor_user(user),
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


def task_rollback(version: AdapterVersion, *, reason: str, user: Actor) -> ActivationResult:
    return version_activate(version, reason=reason, user=user, kind=ActivationEvent.Kind.ROLLBACK)


def model_name_resolve(model: str) -> tuple[Task, AdapterVersion | None]:
    """Resolve an API model name (`slug` or `slug@vN`) to a task and the version to serve.

    Without `@vN` the task's active version is read now, at admission, so a rollback
    applies to every request admitted after it. A task with no active version is served
    by the bare base, and the returned version is None. A broken version is refused, never
    replaced by the bare base.
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
        if task.active_version is not None and task.active_version.is_broken:
            raise broken_version_error(task.active_version, active=True)
        return task, task.active_version

    version = version_get(task, int(match["number"]))
    if version.is_broken:
        raise broken_version_error(version)
    if not version.is_ready:
        raise ServiceError(
            _("%(version)s of %(task)s is %(status)s and cannot serve requests.")
            % {"version": version.label, "task": task.slug, "status": version.get_status_display()},
            code="version_not_ready",
            status_code=409,
        )
    return task, version


# Lifetimes offered when a token is created, in days; None means the token never expires.
API_TOKEN_LIFETIMES: tuple[int | None, ...] = (30, 90, 365, None)
API_TOKEN_NAME_MAX = 100


def api_token_expiry(lifetime_days: int | None) -> datetime | None:
    """Return the expiry time of a token created now that lives `lifetime_days` days (None: never)."""
    if lifetime_days is None:
        return None
    if lifetime_days not in API_TOKEN_LIFETIMES:
        choices = ", ".join(str(days) for days in API_TOKEN_LIFETIMES if days is not None)
        raise ServiceError(
            _("A token lifetime of %(days)s days is not offered; choose %(choices)s days or never.")
            % {"days": lifetime_days, "choices": choices},
            code="invalid_token_lifetime",
        )
    return timezone.now() + timezone.timedelta(days=lifetime_days)


def _require_token_access(owner: AbstractBaseUser, user: Actor) -> None:
    """Let users manage their own tokens and maintainers everyone's."""
    require_role(user, Role.VIEWER)
    if actor_user(user) is not None and user.pk != owner.pk:
        require_role(user, Role.MAINTAINER)


def api_token_create(
    owner: AbstractBaseUser, *, name: str, user: Actor, expires_at: datetime | None = None
) -> tuple[ApiToken, str]:
    """Create a token for `owner` and return it with its secret, which is never stored and shown only now.

    The token acts with the owner's role. Users create their own tokens; maintainers and SYSTEM
    may create one for anybody.
    """
    _require_token_access(owner, user)
    name = name.strip()
    if not name:
        raise ServiceError(_("Give the token a name, such as the script or machine that will use it."), code="token_name_required")
    if len(name) > API_TOKEN_NAME_MAX:
        raise ServiceError(
            _("The token name has %(length)s characters; use at most %(max)s.") % {"length": len(name), "max": API_TOKEN_NAME_MAX},
            code="token_name_too_long",
        )
    if expires_at is not None and expires_at <= timezone.now():
        raise ServiceError(_("The expiry time of a new token must lie in the future."), code="invalid_token_lifetime")

    secret = "lw_" + secrets.token_urlsafe(32)
    token = ApiToken.objects.create(
        user=owner,
        name=name,
        prefix=secret[:10],
        key_hash=hashlib.sha256(secret.encode()).hexdigest(),
        expires_at=expires_at,
    )
    logger.info("Created API token %s for user %s by %r", token.prefix, owner.pk, getattr(user, "pk", user))
    return token, secret


def api_token_list(*, user: Actor, everyone: bool = False):
    """Return the tokens of `user`, newest first, or with `everyone` (maintainers only) all users' tokens."""
    require_role(user, Role.MAINTAINER if everyone else Role.VIEWER)
    tokens = ApiToken.objects.select_related("user").order_by("-created_at", "-pk")
    if everyone:
        return tokens
    return tokens.filter(user=user)


def api_token_get(pk: int, *, user: Actor) -> ApiToken:
    """Return a token that `user` may manage; other users' tokens are not found unless they are a maintainer."""
    require_role(user, Role.VIEWER)
    token = ApiToken.objects.select_related("user").filter(pk=pk).first()
    if token is None or not (token.user_id == getattr(user, "pk", None) or has_role(user, Role.MAINTAINER)):
        raise NotFound(_("No API token with id %(id)s among yours.") % {"id": pk}, code="token_not_found")
    return token


def api_token_revoke(token: ApiToken, *, user: Actor) -> bool:
    """Revoke a token at once; return False when it was already revoked. Its row stays for the record."""
    _require_token_access(token.user, user)
    revoked = ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    token.refresh_from_db()
    if revoked:
        logger.info("Revoked API token %s of user %s by %r", token.prefix, token.user_id, getattr(user, "pk", user))
    return bool(revoked)


def api_token_authenticate(secret: str) -> ApiToken | None:
    """Return the live token for a secret, or None when the secret is unknown.

    A revoked or expired token, or one whose user is deactivated, raises a 401 ServiceError
    whose message names the reason, so the client knows to get a new token rather than to check for typos.
    """
    key_hash = hashlib.sha256(secret.encode()).hexdigest()
    token = ApiToken.objects.select_related("user").filter(key_hash=key_hash).first()
    if token is None:
        return None

    now = timezone.now()
    if token.revoked_at is not None:
        raise ServiceError(
            _("The API token “%(name)s” (%(prefix)s…) was revoked on %(date)s; create a new one on your account page.")
            % {"name": token.name, "prefix": token.prefix, "date": token.revoked_at.strftime("%Y-%m-%d %H:%M UTC")},
            code="token_revoked",
            status_code=401,
        )
    if token.expires_at is not None and token.expires_at <= now:
        raise ServiceError(
            _("The API token “%(name)s” (%(prefix)s…) expired on %(date)s; create a new one on your account page.")
            % {"name": token.name, "prefix": token.prefix, "date": token.expires_at.strftime("%Y-%m-%d %H:%M UTC")},
            code="token_expired",
            status_code=401,
        )
    if not token.user.is_active:
        raise ServiceError(
            _("The user of the API token “%(name)s” is deactivated; ask a maintainer.") % {"name": token.name},
            code="user_inactive",
            status_code=401,
        )

    # One write per minute at most keeps hot API clients from writing on every request.
    if token.last_used_at is None or (now - token.last_used_at).total_seconds() > 60:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
    return token
