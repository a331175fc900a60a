"""Roles as Django groups: viewer, trainer and maintainer, each including the one before.

Services call `require_role` before they change anything, so a view, the API, the admin or a
management command cannot skip the check by forgetting it in a template or a decorator.
A superuser has every role. A user in no group has no role and gets "Access denied" on every page.

Management commands that act for the installation itself (`demo`, `train`, `create_api_token`)
pass `SYSTEM` as the user. Web callers always pass `request.user`, so a missing user (None)
is rejected like an anonymous one instead of skipping the check.
"""

from __future__ import annotations

import enum
import logging

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.utils.translation import gettext as _

logger = logging.getLogger(__name__)


class SystemActor:
    """The installation itself, acting from a management command or a worker; has every role.

    Services record no user for it (`created_by`, `actor` stay empty), which pages show as "loraweb".
    """

    is_authenticated = True
    is_active = True
    is_superuser = True
    pk = None

    def __repr__(self) -> str:
        return "SYSTEM"


SYSTEM = SystemActor()

Actor = AbstractBaseUser | AnonymousUser | SystemActor | None


def actor_user(user: Actor) -> AbstractBaseUser | None:
    """Return the user to record as the author of a change, or None for SYSTEM and anonymous users."""
    if user is None or user is SYSTEM or not user.is_authenticated:
        return None
    return user


class Role(enum.IntEnum):
    """A role; a higher value includes every lower one."""

    VIEWER = 1
    TRAINER = 2
    MAINTAINER = 3

    @property
    def group_name(self) -> str:
        return self.name.lower()

    @property
    def label(self) -> str:
        return {
            Role.VIEWER: _("viewer"),
            Role.TRAINER: _("trainer"),
            Role.MAINTAINER: _("maintainer"),
        }[self]


ROLE_GROUP_NAMES = tuple(role.group_name for role in Role)


def user_role(user: Actor) -> Role | None:
    """Return the highest role that `user` has, or None for anonymous users and users in no role group."""
    if user is None or not user.is_authenticated or not user.is_active:
        return None
    if user.is_superuser:
        return Role.MAINTAINER
    cached = getattr(user, "_loraweb_role", False)
    if cached is not False:
        return cached
    names = set(user.groups.filter(name__in=ROLE_GROUP_NAMES).values_list("name", flat=True))
    role = max((role for role in Role if role.group_name in names), default=None)
    user._loraweb_role = role
    return role


def has_role(user: Actor, role: Role) -> bool:
    current = user_role(user)
    return current is not None and current >= role


def require_role(user: Actor, role: Role) -> None:
    """Raise a 401 ServiceError for anonymous users and a 403 one for users below `role`."""
    from .services import ServiceError

    if user is None or not user.is_authenticated:
        raise ServiceError(_("Log in first."), code="login_required", status_code=401)
    if not has_role(user, role):
        logger.info("Rejected user %s: the action needs role %s", user.pk, role.group_name)
        raise ServiceError(
            _("This needs the %(role)s role; ask a maintainer to add you to the “%(group)s” group.")
            % {"role": role.label, "group": role.group_name},
            code="forbidden",
            status_code=403,
        )
