"""Celery tasks: thin wrappers that receive ids and call the service layer."""

from __future__ import annotations

import logging

from celery import shared_task

from loraweb.logs import log_context

from . import services

logger = logging.getLogger(__name__)


# Never retried automatically: a training run is expensive, and the service turns every
# failure into a readable job state instead.
@shared_task(name="training_app.tasks.train_adapter", acks_late=True)
def train_adapter(job_id: int) -> None:
    with log_context(job_id=job_id):
        services.training_run(job_id)


@shared_task(name="training_app.tasks.sweep_stale_jobs")
def sweep_stale_jobs() -> int:
    return services.sweep_stale_jobs()
