"""Role checks for pages: anonymous visitors go to the login page, users below the role get a 403 page.

The services check roles themselves (see roles.py). These helpers turn a refusal into the page
response, and let a view refuse a request before it reads a form or the database.
"""

from __future__ import annotations

import logging
from functools import wraps
from inspect import iscoroutinefunction
from typing import Callable

from asgiref.sync import sync_to_async
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse

from .roles import Actor, Role, require_role
from .services import ServiceError

logger = logging.getLogger(__name__)

ACCESS_STATUSES = (401, 403)


def access_error_response(request: HttpRequest, error: ServiceError) -> HttpResponse:
    """Turn a 401 refusal into a redirect to the login page; raise PermissionDenied for a 403 one.

    Django renders PermissionDenied with templates/403.html, which shows the message.
    """
    if error.status_code == 401:
        return redirect_to_login(request.get_full_path())
    raise PermissionDenied(error.message)


def require_page_role(request: HttpRequest, role: Role) -> None:
    """Raise PermissionDenied unless the logged-in user has `role`; for one branch of a view, such as its POST."""
    try:
        require_role(request.user, role)
    except ServiceError as error:
        raise PermissionDenied(error.message) from None


def _refusal(request: HttpRequest, user: Actor, role: Role) -> HttpResponse | None:
    try:
        require_role(user, role)
    except ServiceError as error:
        return access_error_response(request, error)
    return None


def role_required(role: Role) -> Callable:
    """Decorate a page view (sync or async) so that only users with `role` reach it.

    A 401 or 403 ServiceError that a service raises inside the view gets the same response.
    """

    def decorator(view: Callable) -> Callable:
        if iscoroutinefunction(view):

            @wraps(view)
            async def async_wrapper(request: HttpRequest, *args, **kwargs) -> HttpResponse:
                user = await request.auser()
                refusal = await sync_to_async(_refusal)(request, user, role)
                if refusal is not None:
                    return refusal
                try:
                    return await view(request, *args, **kwargs)
                except ServiceError as error:
                    if error.status_code not in ACCESS_STATUSES:
                        raise
                    return access_error_response(request, error)

            return async_wrapper

        @wraps(view)
        def wrapper(request: HttpRequest, *args, **kwargs) -> HttpResponse:
            refusal = _refusal(request, request.user, role)
            if refusal is not None:
                return refusal
            try:
                return view(request, *args, **kwargs)
            except ServiceError as error:
                if error.status_code not in ACCESS_STATUSES:
                    raise
                return access_error_response(request, error)

        return wrapper

    return decorator
