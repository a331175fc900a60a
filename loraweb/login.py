"""Login forms and view that count attempts per client address and per user name (see ratelimit)."""

from __future__ import annotations

from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth import views as auth_views
from django.contrib.auth.forms import AuthenticationForm
from django.http import HttpResponse

from .ratelimit import client_ip, mark_rate_limited, rate_limit_form, username_identity


class LoginRateLimitMixin:
    """Check the login rate limit before the password, so a blocked client cannot keep guessing."""

    def clean(self):
        identities = [f"ip:{client_ip(self.request)}"]
        username = self.cleaned_data.get("username")
        if username:
            identities.append(username_identity(username))
        if rate_limit_form(self, "login", identities):
            return self.cleaned_data
        return super().clean()


class RateLimitedAuthenticationForm(LoginRateLimitMixin, AuthenticationForm):
    pass


class RateLimitedAdminAuthenticationForm(LoginRateLimitMixin, AdminAuthenticationForm):
    pass


class LoginView(auth_views.LoginView):
    """Django's login page; a rate-limited attempt gets the form back with status 429 and Retry-After."""

    form_class = RateLimitedAuthenticationForm

    def form_invalid(self, form: AuthenticationForm) -> HttpResponse:
        return mark_rate_limited(super().form_invalid(form), form)
