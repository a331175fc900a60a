"""Authentication shared by the JSON APIs: bearer tokens for scripts, sessions for the browser."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import HttpRequest
from ninja.security import HttpBearer
from ninja.security.session import SessionAuth

from adapters_app.services import api_token_authenticate


class BearerToken(HttpBearer):
    def authenticate(self, request: HttpRequest, token: str):
        api_token = api_token_authenticate(token)
        if api_token is None:
            return None
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
        return super().__call__(request)


API_AUTH = [BearerToken(), BrowserSession()]
