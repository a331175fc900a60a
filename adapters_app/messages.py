"""Messages stored as a code and parameters, translated when they are shown.

Notes written by the worker would otherwise be frozen in the worker's language; storing
the code lets every viewer read them in their own.
"""

from __future__ import annotations

import logging

from django.utils.translation import gettext, gettext_noop

logger = logging.getLogger(__name__)

PROMOTION_MESSAGES: dict[str, str] = {
    "first_version": gettext_noop("First ready version of the task; activated automatically."),
    "beats_active": gettext_noop(
        "Eval loss on the new data %(new)s beats %(label)s's %(active)s; activated automatically."
    ),
    "not_better": gettext_noop(
        "Eval loss on the new data %(new)s does not beat %(label)s's %(active)s; kept as a candidate."
    ),
    "forgets": gettext_noop(
        "Eval loss on the earlier dataset %(dataset)s rose from %(active)s (%(label)s) to %(new)s, more than "
        "the allowed %(tolerance)s; kept as a candidate."
    ),
    "auto_activation_off": gettext_noop("Automatic activation is off for this task; activate the version by hand."),
    "imported": gettext_noop("Imported from an uploaded PEFT adapter; activate it by hand after checking it."),
}


def render_message(templates: dict[str, str], code: str, params: dict, *, translate: bool = True) -> str:
    """Fill the template of `code` with `params`, in the active language unless `translate` is off."""
    template = templates.get(code)
    if template is None:
        logger.warning("Unknown message code %r", code)
        return code
    text = gettext(template) if translate else template
    try:
        return text % params
    except (KeyError, TypeError, ValueError):
        logger.warning("Message %r does not accept the parameters %r", code, params)
        return template
