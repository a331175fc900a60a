"""Audit records of changes other than activations: deletions, broken versions, restores."""

from __future__ import annotations

import logging

from .models import AuditEvent
from .roles import Actor, actor_user

logger = logging.getLogger(__name__)


def audit_record(
    action: str,
    object_repr: str,
    *,
    user: Actor = None,
    reason: str = "",
    details: dict | None = None,
) -> AuditEvent:
    """Write one audit row; call inside the transaction of the change, so both commit or neither.

    `action` is a dotted name such as "task.delete". Changes made by the installation itself
    (SYSTEM, a serving process finding a damaged file) record no actor.
    """
    actor = actor_user(user)
    return AuditEvent.objects.create(
        actor=actor,
        actor_username=actor.get_username() if actor is not None else "",
        action=action,
        object_repr=object_repr[:300],
        reason=reason,
        details=details or {},
    )
