"""Liveness checks of training jobs: the worker's heartbeat and a look into the broker's queue.

The sweeper (`services.sweep_stale_jobs`) reads both: a running job whose heartbeat stopped
lost its worker, and a queued job whose message is no longer in the broker was lost with
the broker's memory (a Redis restart without persistence).
"""

from __future__ import annotations

import json
import logging
import threading

from django.conf import settings
from django.db import DatabaseError, connections
from django.utils import timezone

from .models import TrainingJob

logger = logging.getLogger(__name__)

# The heartbeat is written this many times per timeout, so one slow write does not fail a job.
BEATS_PER_TIMEOUT = 5
MAX_BEAT_SECONDS = 30.0


def heartbeat_interval() -> float:
    """Seconds between two heartbeats of a running job."""
    return min(settings.LORAWEB_JOB_HEARTBEAT_TIMEOUT / BEATS_PER_TIMEOUT, MAX_BEAT_SECONDS)


class JobHeartbeat:
    """Write a running job's heartbeat from a thread of the worker process.

    Progress is written only between training steps. Loading a large base or scoring every
    dataset at the end can take longer than the timeout, and the job would then be failed
    while its worker is healthy. So the heartbeat means that the process is alive, and a
    hung job is ended by the job time limit instead.
    """

    def __init__(self, job_id: int, interval: float | None = None):
        self.job_id = job_id
        self.interval = interval if interval is not None else heartbeat_interval()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"job-{job_id}-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                try:
                    # Only a running job: a beat must never bring back a job the sweeper failed.
                    TrainingJob.objects.filter(pk=self.job_id, state=TrainingJob.State.RUNNING).update(
                        heartbeat_at=timezone.now()
                    )
                except DatabaseError:
                    logger.warning("Heartbeat of job %s not written; trying again", self.job_id, exc_info=True)
        finally:
            # Database connections belong to the thread that opened them.
            connections.close_all()


def broker_task_ids(queue: str) -> set[str] | None:
    """Return the ids of the tasks in the broker for `queue`, waiting or delivered and unacknowledged.

    Returns None when the broker cannot be looked into; only the Redis transport can.
    """
    from loraweb.celery import app

    with app.connection_for_read() as connection:
        if connection.transport.driver_type != "redis":
            return None
        channel = connection.default_channel
        client = channel.client
        ids: set[str] = set()
        # Kombu keeps one Redis list per priority step; `_q_for_pri` names them.
        for priority in channel.priority_steps:
            for raw in client.lrange(channel._q_for_pri(queue, priority), 0, -1):
                ids.add(_message_task_id(json.loads(raw)))
        # Delivered, not yet acknowledged: [message, exchange, routing key], for every queue.
        for raw in client.hvals(channel.unacked_key):
            ids.add(_message_task_id(json.loads(raw)[0]))
    ids.discard("")
    return ids


def _message_task_id(message: dict) -> str:
    headers = message.get("headers") or {}
    return str(headers.get("id") or (message.get("properties") or {}).get("correlation_id") or "")
