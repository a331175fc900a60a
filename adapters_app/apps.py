from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class AdaptersAppConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "adapters_app"
    verbose_name = _("Adapters")
