from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class TrainingAppConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "training_app"
    verbose_name = _("Training")
