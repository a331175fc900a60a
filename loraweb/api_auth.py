"""Authentication shared by the JSON APIs: bearer tokens for scripts, sessions for the browser.

Either way the caller needs at least the viewer role. A token acts with its user's role, and
the services check the higher roles that writes need.
"""

from __future__ import annotations

from functools import wraps
from typing import Any, Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.utils.translation import gettext as _
from ninja.security import HttpBearer
from ninja.security.session import SessionAuth

from adapters_app.roles import Role, require_role
from adapters_app.services import ServiceError, api_token_authenticate


class BearerToken(HttpBearer):
    def authenticate(self, request: HttpRequest, token: str):
        # A revoked or expired token raises a 401 ServiceError that names the reason. The API's
        # exception handlers render it, and the 403 for a user below viewer, in their error shape.
        api_token = api_token_authenticate(token)
        if api_token is None:
            return None
        require_role(api_token.user, Role.VIEWER)
        request.user = api_token.user
        return api_token.user


class BrowserSession(SessionAuth):
    """Session login with its CSRF check, tried only for requests that look like a browser's.

    A script that sends a bearer token, or no credentials at all, must get 401 rather than
    the CSRF failure (403) that the session check would report for its POST.
    """

    def __call__(self, request: HttpRequest) -> Any | None:
        if "HTTP_AUTHORIZATION" in request.META:
            return None
        if settings.SESSION_COOKIE_NAME not in request.COOKIES:
            return None
        user = super().__call__(request)
        if user:
            require_role(user, Role.VIEWER)
        return user


API_AUTH = [BearerToken(), BrowserSession()]


def schema_auth(error_response: Callable[[HttpRequest, ServiceError], HttpResponse]) -> Callable:
    """Return a view decorator that applies API_AUTH, for views that ninja serves outside its operations.

    Ninja's OpenAPI schema view runs no authentication of its own; `error_response` renders a
    refusal in the error shape of the API that the schema describes.
    """

    def decorator(view: Callable) -> Callable:
        @wraps(view)
        def wrapper(request: HttpRequest, *args, **kwargs) -> HttpResponse:
            try:
                for callback in API_AUTH:
                    if callback(request):
                        return view(request, *args, **kwargs)
            except ServiceError as error:
                return error_response(request, error)
            message = _("Missing or invalid API token; send the header Authorization: Bearer <token>.")
            return error_response(request, ServiceError(message, code="unauthorized", status_code=401))

        return wrapper

    return decorator
