"""The two JSON APIs: loraweb's own under /api/v1/ and the OpenAI-compatible one under /v1/."""

from __future__ import annotations

import logging

from django.http import HttpRequest, HttpResponse
from django.utils.translation import gettext as _
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, ValidationError

from adapters_app.api import router as adapters_router
from adapters_app.openai_api import router as openai_router
from adapters_app.services import ServiceError
from training_app.api import router as training_router
from training_app.services import DatasetRejected

from .api_auth import API_AUTH, schema_auth

logger = logging.getLogger(__name__)

def _api_error(request: HttpRequest, exc: ServiceError) -> HttpResponse:
    return api.create_response(
        request, {"errors": [{"line": None, "code": exc.code, "message": exc.message}]}, status=exc.status_code
    )


def _openai_schema_error(request: HttpRequest, exc: ServiceError) -> HttpResponse:
    kind = "authentication_error" if exc.status_code == 401 else "permission_error"
    return _openai_error(request, exc.message, exc.code, exc.status_code, kind)


api = NinjaAPI(
    title="loraweb API",
    version="1",
    urls_namespace="api_v1",
    auth=API_AUTH,
    docs_url=None,
    # The OpenAPI schema lists every endpoint, so it needs a token or a session like them.
    docs_decorator=schema_auth(lambda request, exc: _api_error(request, exc)),
)
api.add_router("/", adapters_router)
api.add_router("/", training_router)


def _validation_errors(exc: ValidationError) -> list[dict]:
    errors = []
    for error in exc.errors:
        location = ".".join(str(part) for part in error.get("loc", ()) if part not in ("body", "payload"))
        errors.append({"line": None, "code": error.get("type", "invalid"), "message": f"{location}: {error.get('msg')}"})
    return errors


@api.exception_handler(DatasetRejected)
def dataset_rejected(request: HttpRequest, exc: DatasetRejected) -> HttpResponse:
    return api.create_response(
        request, {"errors": exc.as_list(), "total": exc.total, "message": exc.message}, status=400
    )


def _with_retry_after(response: HttpResponse, exc: ServiceError) -> HttpResponse:
    # A full generation queue (429) sends the client the seconds to wait before retrying.
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:
        response["Retry-After"] = str(retry_after)
    return response


@api.exception_handler(ServiceError)
def service_error(request: HttpRequest, exc: ServiceError) -> HttpResponse:
    response = api.create_response(
        request, {"errors": [{"line": None, "code": exc.code, "message": exc.message}]}, status=exc.status_code
    )
    return _with_retry_after(response, exc)


@api.exception_handler(ValidationError)
def validation_error(request: HttpRequest, exc: ValidationError) -> HttpResponse:
    return api.create_response(request, {"errors": _validation_errors(exc)}, status=400)


@api.exception_handler(AuthenticationError)
def authentication_error(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
    message = _("Missing or invalid API token; send the header Authorization: Bearer <token>.")
    return api.create_response(
        request, {"errors": [{"line": None, "code": "unauthorized", "message": message}]}, status=401
    )


openai_api = NinjaAPI(
    title="loraweb OpenAI-compatible API",
    version="1",
    urls_namespace="openai_v1",
    auth=API_AUTH,
    docs_url=None,
    docs_decorator=schema_auth(lambda request, exc: _openai_schema_error(request, exc)),
)
openai_api.add_router("/", openai_router)


def _openai_error(request: HttpRequest, message: str, code: str, status: int, kind: str = "invalid_request_error"):
    return openai_api.create_response(
        request, {"error": {"message": message, "type": kind, "param": None, "code": code}}, status=status
    )


# OpenAI's error types for the statuses loraweb answers; every other 4xx is an invalid request.
OPENAI_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


@openai_api.exception_handler(ServiceError)
def openai_service_error(request: HttpRequest, exc: ServiceError) -> HttpResponse:
    if exc.status_code >= 500:
        kind = "server_error"
    else:
        kind = OPENAI_ERROR_TYPES.get(exc.status_code, "invalid_request_error")
    return _with_retry_after(_openai_error(request, exc.message, exc.code, exc.status_code, kind), exc)


@openai_api.exception_handler(ValidationError)
def openai_validation_error(request: HttpRequest, exc: ValidationError) -> HttpResponse:
    message = "; ".join(error["message"] for error in _validation_errors(exc))
    return _openai_error(request, message, "invalid_request", 400)


@openai_api.exception_handler(AuthenticationError)
def openai_auth_error(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
    message = _("Missing or invalid API token; send the header Authorization: Bearer <token>.")
    return _openai_error(request, message, "invalid_api_key", 401, "authentication_error")
