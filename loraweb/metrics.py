"""The `/metrics` endpoint: this process's metrics in the Prometheus text format.

Uvicorn runs one process per server, so the default registry of the process covers that whole
server. Every replica is scraped on its own.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.utils.translation import gettext as _
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from adapters_app import metrics as serving_metrics  # noqa: F401 - registers the serving collector
from adapters_app.roles import Role, has_role
from adapters_app.services import api_token_authenticate
from training_app.metrics import TrainingJobCollector

logger = logging.getLogger(__name__)

# Inference replicas skip the training job metrics: every process reads the same rows, and the
# dashboard servers already report them.
if settings.LORAWEB_ROLE != "inference":
    REGISTRY.register(TrainingJobCollector())


def metrics_user(request: HttpRequest):  # noqa: ANN201 - a user or None
    """Return the user of the request's bearer token, else of its session, or None.

    A request that sends an Authorization header is judged by it alone, so a wrong token
    is rejected even in a browser that is logged in.
    """
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _separator, secret = header.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            return None
        token = api_token_authenticate(secret.strip())
        return token.user if token is not None else None
    if request.user.is_authenticated:
        return request.user
    return None


def metrics(request: HttpRequest) -> HttpResponse:
    """Return every metric of this process to a user with any role, else 401 (or 403 without a role)."""
    user = metrics_user(request)
    if user is None:
        response = HttpResponse(
            _("Authentication required: send an API token as “Authorization: Bearer TOKEN” or log in."),
            status=401,
            content_type="text/plain; charset=utf-8",
        )
        response["WWW-Authenticate"] = 'Bearer realm="loraweb"'
        return response
    if not has_role(user, Role.VIEWER):
        logger.info("Rejected /metrics for user %s: no role", user.pk)
        return HttpResponse(
            _("This needs the viewer role or higher; ask a maintainer to add you to the “viewer” group."),
            status=403,
            content_type="text/plain; charset=utf-8",
        )

    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)
