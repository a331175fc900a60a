from django.conf import settings
from django.conf.urls.static import static
from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.http import HttpRequest, JsonResponse
from django.urls import include, path

from adapters_app import urls as adapters_urls

from .api import api, openai_api
from .health import readyz
from .login import LoginView, RateLimitedAdminAuthenticationForm
from .metrics import metrics

# The admin's login page counts attempts like the site's own (see loraweb.login).
admin.site.login_form = RateLimitedAdminAuthenticationForm


def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


def urlpatterns_for_role(role: str) -> list:
    """Return the URL patterns that a process with LORAWEB_ROLE=`role` serves.

    "dashboard" serves pages, the admin and /api/v1/, and its generation endpoints answer 503.
    "inference" serves /v1/ and the playground stream only. "all" serves everything.
    """
    pages = [
        path("training/", include("training_app.urls")),
        path("admin/", admin.site.urls),
        path("accounts/login/", LoginView.as_view(), name="login"),
        path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
        path("i18n/", include("django.conf.urls.i18n")),
        path("api/v1/", api.urls),
    ]
    openai = [path("v1/", openai_api.urls)]
    health = [
        path("healthz", healthz, name="healthz"),
        path("readyz", readyz, name="readyz"),
        path("metrics", metrics, name="metrics"),
    ]
    if role == "inference":
        return [path("", include((adapters_urls.inference_urlpatterns, "adapters_app"))), *openai, *health]
    if role == "dashboard":
        return [path("", include("adapters_app.urls")), *pages, *health]
    return [path("", include("adapters_app.urls")), *pages, *openai, *health]


urlpatterns = urlpatterns_for_role(settings.LORAWEB_ROLE)

if settings.DEBUG:
    urlpatterns += static(settings.MEDIA_URL, document_root=settings.MEDIA_ROOT)
