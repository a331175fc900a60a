"""The account page: the user's role and API tokens, creating and revoking tokens."""

from __future__ import annotations

import logging

from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils.translation import gettext as _
from django.views.decorators.http import require_http_methods

from .access import role_required
from .forms import ApiTokenForm
from .roles import Role, has_role, user_role
from .services import (
    NotFound,
    ServiceError,
    api_token_create,
    api_token_expiry,
    api_token_get,
    api_token_list,
    api_token_revoke,
)

logger = logging.getLogger(__name__)


@role_required(Role.VIEWER)
@require_http_methods(["GET", "POST"])
def account(request: HttpRequest) -> HttpResponse:
    """Show the user's tokens (every user's for maintainers) and create a token on POST."""
    form = ApiTokenForm(request.POST or None)
    new_token = None
    new_secret = ""

    if request.method == "POST" and form.is_valid():
        try:
            new_token, new_secret = api_token_create(
                request.user,
                name=form.cleaned_data["name"],
                user=request.user,
                expires_at=api_token_expiry(form.lifetime_days()),
            )
        except ServiceError as error:
            form.add_error(None, error.message)
        else:
            # The secret is rendered in this response only, never put in a message or the session.
            form = ApiTokenForm()

    is_maintainer = has_role(request.user, Role.MAINTAINER)
    context = {
        "role": user_role(request.user),
        "form": form,
        "new_token": new_token,
        "new_secret": new_secret,
        "tokens": api_token_list(user=request.user),
        "all_tokens": api_token_list(user=request.user, everyone=True) if is_maintainer else None,
    }
    response = render(request, "adapters_app/account.html", context)
    # A page that shows a secret must not be kept by the browser or a proxy.
    response["Cache-Control"] = "no-store"
    return response


@role_required(Role.VIEWER)
@require_http_methods(["GET", "POST"])
def api_token_revoke_view(request: HttpRequest, pk: int) -> HttpResponse:
    """Ask for confirmation (GET), then revoke the token (POST)."""
    try:
        token = api_token_get(pk, user=request.user)
    except NotFound as error:
        raise Http404(error.message) from None

    if request.method == "POST":
        if api_token_revoke(token, user=request.user):
            messages.success(
                request,
                _("Token “%(name)s” (%(prefix)s…) revoked; requests with it now get 401.")
                % {"name": token.name, "prefix": token.prefix},
            )
        else:
            messages.info(request, _("Token “%(name)s” was already revoked; nothing changed.") % {"name": token.name})
        return redirect("adapters_app:account")

    return render(request, "adapters_app/account_token_revoke.html", {"token": token})
