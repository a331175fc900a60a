"""Rate limits counted in Redis, so that every web process enforces the same budget.

Each limit is a sliding window. A Redis sorted set per scope and identity (a user, a client
address or a user name) stores the times of the requests inside the window, and a request passes
while the set has fewer entries than the limit. Rejected requests are not recorded, so a client that keeps
retrying passes again as soon as its oldest recorded request leaves the window.

When Redis fails or times out, requests pass (fail open) and a warning is logged, because a
Redis outage should not take the playground, the API and the login page down with it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
import uuid

import redis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import ValidationError
from django.forms import Form
from django.http import HttpRequest, HttpResponse
from django.utils.translation import gettext as _
from django.utils.translation import ngettext

from adapters_app.services import ServiceError

from .env import parse_rate

logger = logging.getLogger(__name__)

# Scope -> name of the setting that contains its rate, such as "60/minute".
RATE_SETTINGS = {
    "completions": "LORAWEB_RATE_LIMIT_COMPLETIONS",
    "playground": "LORAWEB_RATE_LIMIT_PLAYGROUND",
    "login": "LORAWEB_RATE_LIMIT_LOGIN",
}

# KEYS[1] is the window's sorted set, and ARGV is the window in ms, the limit and a unique member.
# Returns {1, 0} when the request passes and {0, ms until the oldest request leaves the window}
# when it does not. The time comes from the Redis server, so processes whose clocks differ agree.
_SLIDING_WINDOW_SCRIPT = """
local server_time = redis.call('TIME')
local now = tonumber(server_time[1]) * 1000 + math.floor(tonumber(server_time[2]) / 1000)
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window)
  return {1, 0}
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, tonumber(oldest[2]) + window - now}
"""

# A rate limit check must not hold a request up for long when Redis is slow or gone.
REDIS_TIMEOUT_S = 0.5
# Seconds between two fail-open warnings of one process.
WARNING_INTERVAL_S = 60.0

_clients: dict[str, tuple[redis.Redis, object]] = {}
_clients_lock = threading.Lock()
_warning_state = {"last_logged": 0.0, "suppressed": 0}


class RateLimited(ServiceError):
    """A client sent more requests than its limit allows; it may retry after `retry_after_s` seconds."""

    status_code = 429

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message, code="rate_limit_exceeded")
        self.retry_after_s = retry_after_s


def _script():
    """Return the sliding window script bound to a client of LORAWEB_REDIS_URL, made once per URL."""
    url = settings.LORAWEB_REDIS_URL
    with _clients_lock:
        if url not in _clients:
            client = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S)
            _clients[url] = (client, client.register_script(_SLIDING_WINDOW_SCRIPT))
        return _clients[url][1]


def _warn_redis_down(scope: str, error: redis.RedisError) -> None:
    now = time.monotonic()
    if now - _warning_state["last_logged"] < WARNING_INTERVAL_S:
        _warning_state["suppressed"] += 1
        return
    logger.warning(
        "Rate limit %s not checked, so the request passes: Redis at %s failed: %s (%d more such requests since the last warning)",
        scope, settings.LORAWEB_REDIS_URL.split("@")[-1], error, _warning_state["suppressed"],
    )
    _warning_state["last_logged"] = now
    _warning_state["suppressed"] = 0


def rate_limit_hit(scope: str, identity: str) -> int | None:
    """Count one request of `identity` against `scope`'s limit.

    Returns None when the request passes, or the seconds until it would pass when it does not.
    """
    rate = parse_rate(getattr(settings, RATE_SETTINGS[scope]))
    if rate is None:
        return None
    limit, window_s = rate

    key = f"{settings.LORAWEB_RATE_LIMIT_PREFIX}{scope}:{identity}"
    try:
        passed, wait_ms = _script()(keys=[key], args=[window_s * 1000, limit, uuid.uuid4().hex])
    except redis.RedisError as error:
        _warn_redis_down(scope, error)
        return None

    if passed:
        return None
    return max(1, math.ceil(int(wait_ms) / 1000))


def _message(scope: str, limit: int, window_s: int, retry_after_s: int) -> str:
    values = {"limit": limit, "window": window_s, "seconds": retry_after_s}
    if scope == "completions":
        return ngettext(
            "Rate limit exceeded: the completions API accepts %(limit)s request per %(window)s s from each user. "
            "Retry in %(seconds)s s.",
            "Rate limit exceeded: the completions API accepts %(limit)s requests per %(window)s s from each user. "
            "Retry in %(seconds)s s.",
            limit,
        ) % values
    if scope == "playground":
        return ngettext(
            "Rate limit exceeded: the playground accepts %(limit)s request per %(window)s s from each user. "
            "Retry in %(seconds)s s.",
            "Rate limit exceeded: the playground accepts %(limit)s requests per %(window)s s from each user. "
            "Retry in %(seconds)s s.",
            limit,
        ) % values
    return _(
        "Too many login attempts from this address or for this user name: at most %(limit)s per %(window)s s. "
        "Retry in %(seconds)s s."
    ) % values


def rate_limit_check(scope: str, identity: str) -> None:
    """Count one request of `identity` against `scope`'s limit; raise RateLimited when it is over."""
    retry_after_s = rate_limit_hit(scope, identity)
    if retry_after_s is None:
        return

    limit, window_s = parse_rate(getattr(settings, RATE_SETTINGS[scope]))
    logger.info("Rate limit %s reached by %s; retry in %d s", scope, identity, retry_after_s)
    raise RateLimited(_message(scope, limit, window_s, retry_after_s), retry_after_s=retry_after_s)


# Each call runs in a thread of its own, so waiting on Redis blocks neither the event loop nor
# Django's single thread for synchronous code.
arate_limit_check = sync_to_async(rate_limit_check, thread_sensitive=False)


def user_identity(user) -> str:
    return f"user:{user.pk}"


def client_ip(request: HttpRequest) -> str:
    """Return the client's address, read from X-Forwarded-For behind LORAWEB_TRUSTED_PROXIES proxies.

    Each trusted proxy appends the address it received the request from, so the client's address
    is the LORAWEB_TRUSTED_PROXIES-th entry from the right. Entries further left may be forged.
    """
    trusted = settings.LORAWEB_TRUSTED_PROXIES
    if trusted:
        forwarded = [part.strip() for part in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if part.strip()]
        if len(forwarded) >= trusted:
            return forwarded[-trusted]
    return request.META.get("REMOTE_ADDR") or "unknown"


def username_identity(username: str) -> str:
    # Hashed, so that Redis never stores the names people type into the login form.
    digest = hashlib.sha256(username.strip().casefold().encode()).hexdigest()[:32]
    return f"username:{digest}"


def rate_limit_form(form: Form, scope: str, identities: list[str]) -> bool:
    """Count one request per identity; when one is over its limit, add a `rate_limited` error to `form`.

    Returns whether the request was rejected. The error carries `retry_after_s` in its params,
    which mark_rate_limited reads.
    """
    for identity in identities:
        try:
            rate_limit_check(scope, identity)
        except RateLimited as error:
            form.add_error(None, rate_limited_error(error))
            return True
    return False


def rate_limited_error(error: RateLimited) -> ValidationError:
    # The message is already formatted, and Django formats a message that has params once more.
    message = error.message.replace("%", "%%")
    return ValidationError(message, code="rate_limited", params={"retry_after_s": error.retry_after_s})


def mark_rate_limited(response: HttpResponse, form: Form) -> HttpResponse:
    """Turn `response` into a 429 with Retry-After when `form` was rejected by a rate limit."""
    for error in form.non_field_errors().as_data():
        if error.code == "rate_limited":
            response.status_code = 429
            response["Retry-After"] = str(error.params["retry_after_s"])
            break
    return response
