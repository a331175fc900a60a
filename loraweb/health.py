"""The readiness probe `/readyz` for load balancers and orchestrators; it needs no login.

`/healthz` (in loraweb.urls) reports that the process is up. `/readyz` reports whether it can
serve: the database and Redis respond and, on an inference server, the base model is loaded.
The body names only the checks and their outcomes; the causes of failures go to the log.
"""

from __future__ import annotations

import logging

import redis
from django.conf import settings
from django.db import DatabaseError, connection
from django.http import HttpRequest, JsonResponse

logger = logging.getLogger(__name__)

# Seconds a Redis connection and its ping may take before Redis counts as unavailable.
REDIS_TIMEOUT_S = 1.0
# Outcome of each check at the previous probe. Probes come every few seconds, so a failure is
# logged when it starts and when it ends, not at every probe.
_last_outcomes: dict[str, str] = {}


def check_database() -> str:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except DatabaseError as error:
        return _outcome("database", "failed", error)
    return _outcome("database", "ok")


def check_redis() -> str:
    client = redis.Redis.from_url(
        settings.LORAWEB_REDIS_URL, socket_connect_timeout=REDIS_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S
    )
    try:
        client.ping()
    except (redis.RedisError, OSError) as error:
        return _outcome("redis", "failed", error)
    finally:
        client.close()
    return _outcome("redis", "ok")


def check_model() -> str:
    """Return "ok" once the base model is loaded, else "loading", "failed" or "not_loaded"; never loads it."""
    from adapters_app.inference import engine_state

    state = engine_state()
    return _outcome("model", "ok" if state == "ready" else state)


def _outcome(check: str, outcome: str, error: BaseException | None = None) -> str:
    """Return `outcome`, logging it when it differs from the previous probe's."""
    previous = _last_outcomes.get(check)
    _last_outcomes[check] = outcome
    if outcome != previous:
        if error is not None:
            logger.warning("Readiness check %s is %s: %s", check, outcome, error)
        elif outcome == "loading":
            logger.info("Readiness check %s is %s", check, outcome)
        elif outcome != "ok":
            logger.warning("Readiness check %s is %s", check, outcome)
        elif previous is not None:
            logger.info("Readiness check %s is ok again", check)
    return outcome


def readiness_checks() -> dict[str, str]:
    checks = {"database": check_database(), "redis": check_redis()}
    if settings.LORAWEB_ROLE == "inference":
        checks["model"] = check_model()
    return checks


def readyz(request: HttpRequest) -> JsonResponse:
    """Return 200 and {"status": "ok"} when every check passes, else 503 with each check's outcome."""
    checks = readiness_checks()
    if all(outcome == "ok" for outcome in checks.values()):
        return JsonResponse({"status": "ok"})

    response = JsonResponse({"status": "unavailable", "checks": checks}, status=503)
    # NOTE: a private flag of django.utils.log.log_response (Django 5.2). It stops Django from
    # logging an error for every probe of an unavailable server; `_outcome` logged the change.
    response._has_been_logged = True
    return response
