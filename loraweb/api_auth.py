"""Authentication shared by the JSON APIs: bearer tokens for scripts, sessions for the browser."""

from __future__ import annotations

from django.http import HttpRequest
from ninja.security import HttpBearer, django_auth

from adapters_app.services import api_token_authenticate


class BearerToken(HttpBearer):
    def authenticate(self, request: HttpRequest, token: str):
        api_token = api_token_authenticate(token)
        if api_token is None:
            return None
        request.user = api_token.user
        return api_token.user


API_AUTH = [BearerToken(), django_auth]
