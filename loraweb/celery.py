"""Celery application; tasks are discovered in each Django app's `tasks` module."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "loraweb.settings")

app = Celery("loraweb")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
