"""Log context and log formats shared by the web server and the Celery worker.

Context variables carry the request id and the ids of the task, version and training job that
the current code works on. `LogContextFilter` copies them onto every log record, so a log line
can be traced back to its request or job without each call repeating the ids. Context variables
follow a request into `sync_to_async` and `asyncio.to_thread`, but not into the scheduler thread.

This module is imported by settings, so it must not import Django.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import datetime, timezone

LOG_FORMATS = ("text", "json")
# Record attributes filled from the context, in the order the text format shows them.
CONTEXT_FIELDS = ("request_id", "task", "version", "job_id")

_request_id: ContextVar[str | None] = ContextVar("loraweb_request_id", default=None)
_ids: ContextVar[dict[str, object]] = ContextVar("loraweb_log_ids", default={})


def current_request_id() -> str | None:
    return _request_id.get()


def set_request_id(request_id: str | None) -> None:
    """Make `request_id` the current request id (None: no request) in this thread or task."""
    _request_id.set(request_id)


@contextlib.contextmanager
def log_context(**ids: object) -> Iterator[None]:
    """Add ids (task, version, job_id) to every log record made inside the block.

    Ids that are None are left out, and the ids of an enclosing block stay unless overridden.
    """
    token = _ids.set({**_ids.get(), **_checked(ids)})
    try:
        yield
    finally:
        _ids.reset(token)


def bind_log_context(**ids: object) -> None:
    """Add ids to the current context until the enclosing `log_context` block ends.

    For code that learns an id halfway through such a block. Outside any block the ids stay
    for the rest of the thread or task.
    """
    _ids.set({**_ids.get(), **_checked(ids)})


def _checked(ids: dict[str, object]) -> dict[str, object]:
    unknown = set(ids) - set(CONTEXT_FIELDS[1:])
    if unknown:
        raise ValueError(f"Unknown log context fields {sorted(unknown)}; use {', '.join(CONTEXT_FIELDS[1:])}")
    return {key: value for key, value in ids.items() if value is not None}


def context_ids() -> dict[str, object]:
    """Return the ids of the current context, request id included, without empty ones."""
    ids = dict(_ids.get())
    request_id = _request_id.get()
    if request_id is not None:
        ids["request_id"] = request_id
    return ids


class LogContextFilter(logging.Filter):
    """Copy the context ids onto each record, and `log_context` as one text field for the text format.

    An id that the log call passed itself (`extra={"job_id": ...}`) wins over the context.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        ids = context_ids()
        for field in CONTEXT_FIELDS:
            if getattr(record, field, None) is None:
                setattr(record, field, ids.get(field))
        present = [f"{field}={getattr(record, field)}" for field in CONTEXT_FIELDS if getattr(record, field) is not None]
        record.log_context = " ".join(present) or "-"
        return True


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object on one line.

    Fields: time (UTC, ISO 8601), level, logger, message, request_id (null outside a request),
    task, version and job_id when set, and exception with the traceback when there is one.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        for field in CONTEXT_FIELDS[1:]:
            value = getattr(record, field, None)
            if value is not None:
                entry[field] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # Newlines in messages and tracebacks are escaped by json.dumps, so each record stays one line.
        return json.dumps(entry, ensure_ascii=False, default=str)


def logging_config(log_format: str, level: str) -> dict:
    """Return the `logging.config.dictConfig` settings for `log_format` ("text" or "json") at `level`."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"LORAWEB_LOG_FORMAT={log_format!r} is invalid; use text or json")
    formatters = {
        "text": {"format": "%(asctime)s %(levelname)s %(name)s [%(log_context)s]: %(message)s"},
        "json": {"()": "loraweb.logs.JsonFormatter"},
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"log_context": {"()": "loraweb.logs.LogContextFilter"}},
        "formatters": {log_format: formatters[log_format]},
        "handlers": {
            "console": {"class": "logging.StreamHandler", "formatter": log_format, "filters": ["log_context"]},
        },
        "root": {"handlers": ["console"], "level": level},
        "loggers": {"django.db.backends": {"level": "WARNING"}},
    }
