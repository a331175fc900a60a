"""Typed helpers that read settings from the environment and fail loudly on bad values."""

from __future__ import annotations

import os
import re
from pathlib import Path


class ImproperSetting(ValueError):
    pass


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ImproperSetting(f"{name}={raw!r} is not a boolean; use 1/0, true/false, yes/no or on/off")


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperSetting(f"{name}={raw!r} is not an integer") from None
    if minimum is not None and value < minimum:
        raise ImproperSetting(f"{name}={value} is below the minimum of {minimum}")
    return value


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ImproperSetting(f"{name}={raw!r} is not a number") from None


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def env_path(name: str, default: Path) -> Path:
    raw = os.environ.get(name)
    return Path(raw).expanduser().resolve() if raw else default


# Seconds in each unit a rate may name, e.g. "60/minute" or "5/10s".
_RATE_UNITS = {
    "s": 1, "sec": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
}
_RATE_PATTERN = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([a-z]+)\s*$")


def parse_rate(text: str) -> tuple[int, int] | None:
    """Parse a rate such as "60/minute" or "5/10s" into (requests, window in seconds).

    "off" (or "none") turns the limit off and returns None. Raises ImproperSetting on anything else.
    """
    lowered = text.strip().lower()
    if lowered in {"off", "none"}:
        return None
    match = _RATE_PATTERN.match(lowered)
    if match is None or match.group(3) not in _RATE_UNITS:
        raise ImproperSetting(
            f"rate {text!r} is invalid; use REQUESTS/UNIT such as 60/minute or 5/10s "
            "(units: second, minute, hour, day), or off"
        )
    requests = int(match.group(1))
    window_s = int(match.group(2) or 1) * _RATE_UNITS[match.group(3)]
    if requests < 1 or window_s < 1:
        raise ImproperSetting(f"rate {text!r} is invalid; the request count and the window must be at least 1")
    return requests, window_s


def env_rate(name: str, default: str) -> str:
    """Read a rate limit (see parse_rate) and return it as written, after checking that it parses."""
    value = env_str(name, default)
    try:
        parse_rate(value)
    except ImproperSetting as error:
        raise ImproperSetting(f"{name}: {error}") from None
    return value
