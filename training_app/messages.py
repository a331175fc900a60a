"""Translated wording of dataset problems, keyed by the stable codes that ingest.py reports."""

from __future__ import annotations

import logging

from django.utils.translation import gettext, gettext_noop

from adapters_app.messages import render_message

from .ingest import MESSAGE_TEMPLATES, Problem

logger = logging.getLogger(__name__)

JOB_LOG_MESSAGES: dict[str, str] = {
    "started": gettext_noop("Started on %(host)s."),
    "prepared_fresh": gettext_noop(
        "%(examples)s training examples and %(eval_sets)s validation set(s); training a fresh adapter."
    ),
    "prepared_warm": gettext_noop(
        "%(examples)s training examples and %(eval_sets)s validation set(s); continuing from %(parent)s."
    ),
    "finished": gettext_noop("Finished in %(seconds)s s. Eval loss: %(losses)s."),
    "cancelled": gettext_noop("Cancelled before the next step; no version files were kept."),
    "failed": gettext_noop("Failed: %(error)s"),
    "worker_lost": gettext_noop(
        "The worker stopped reporting for more than %(seconds)s seconds (it was stopped or ran out of "
        "memory); the job was marked failed and no version files were kept. Start a new training run."
    ),
    "queue_unreachable": gettext_noop(
        "The job queue could not be reached; the job stays queued and is sent again automatically."
    ),
    "requeued": gettext_noop("The job queue had lost this job (the broker restarted); it was sent again."),
}


def job_log_lines(log: list) -> list[str]:
    """Render a job's log entries as lines in the active language."""
    lines = []
    for entry in log:
        text = render_message(JOB_LOG_MESSAGES, entry["code"], entry.get("params", {}))
        lines.append(f"{entry['at'][11:19]} {text}")
    return lines


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
    except (KeyError, TypeError, ValueError) as error:
        logger.warning("Translation of problem %s does not accept the parameters %r: %s", problem.code, problem.params, error)
        return problem.message
