"""Celery application; tasks are discovered in each Django app's `tasks` module."""

import logging.config
import os

from celery import Celery
from celery.signals import setup_logging

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "loraweb.settings")

app = Celery("loraweb")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@setup_logging.connect
def configure_worker_logging(**_kwargs: object) -> None:
    """Log from the worker through Django's LOGGING, so its lines have the web server's format.

    With a receiver connected, Celery leaves the root logger alone; its `--loglevel` option is
    then ignored in favour of LORAWEB_LOG_LEVEL.
    """
    from django.conf import settings

    logging.config.dictConfig(settings.LOGGING)
