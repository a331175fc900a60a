"""Translated wording of dataset problems, keyed by the stable codes that ingest.py reports."""

from __future__ import annotations

from django.utils.translation import gettext

from .ingest import MESSAGE_TEMPLATES, Problem


def problem_message(problem: Problem) -> str:
    """Return the problem's message in the active language.

    The catalog is keyed by ingest's English templates, so a template without a
    translation falls back to English.
    """
    template = MESSAGE_TEMPLATES.get(problem.code)
    if template is None:
        return problem.message
    try:
        return gettext(template) % problem.params
    except (KeyError, TypeError, ValueError):
        return problem.message
