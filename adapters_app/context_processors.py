"""Template context shared by every page."""

from __future__ import annotations

from django.http import HttpRequest

from .base_model import BaseModelUnavailable, current_base_choice


def base_model(request: HttpRequest) -> dict[str, object]:
    """Tell every page which base model serves requests, so the tiny one is never mistaken."""
    try:
        choice = current_base_choice()
    except BaseModelUnavailable as error:
        return {"base_choice": None, "base_error": str(error)}
    return {"base_choice": choice, "base_error": ""}


def roles(request: HttpRequest) -> dict[str, object]:
    """Tell templates the user's role, so they hide the buttons of actions the user may not take."""
    from .roles import Role, user_role

    role = user_role(getattr(request, "user", None))
    return {
        "user_role": role,
        "can_train": role is not None and role >= Role.TRAINER,
        "can_maintain": role is not None and role >= Role.MAINTAINER,
    }
