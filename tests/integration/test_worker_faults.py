"""Training jobs survive faults of real processes: a killed worker, repeated messages, a Redis restart.

Every test here runs its own `redis-server` on a free port, which keeps nothing on disk: the
worst case for queued messages. Its Celery workers use short heartbeat and sweep periods.
The system Redis and the session's worker are left alone.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from adapters_app.models import AdapterVersion
from adapters_app.roles import SYSTEM
from adapters_app.services import task_create
from training_app import demo_data, services
from training_app.models import TrainingJob

from .conftest import Worker, _worker_environment

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

HEARTBEAT_TIMEOUT = 3
SWEEP_INTERVAL = 1
REQUEUE_AFTER = 2
# Far more steps than any test waits for: only a kill or the end of the test stops such a job.
ENDLESS = {"epochs": 200, "batch_size": 4, "max_length": 32, "eval_every": 0}
SHORT = {"epochs": 1, "max_steps": 4, "batch_size": 4, "max_length": 32, "eval_every": 0}


class PrivateRedis:
    """A `redis-server` on a free 127.0.0.1 port that keeps nothing on disk."""

    def __init__(self, folder: Path):
        self.folder = folder
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(self.folder)],
            stdout=(self.folder / "redis.log").open("ab"), stderr=subprocess.STDOUT,
        )
        import redis

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                redis.Redis.from_url(self.url, socket_connect_timeout=0.5).ping()
                return
            except redis.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@pytest.fixture
def private_redis(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed; these tests restart a Redis of their own")
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


@contextmanager
def publishing_to(url: str):
    """Send this process's Celery messages to `url` (the broker a test's own workers read)."""
    from loraweb.celery import app

    def switch(broker_url: str) -> None:
        # The connection and producer pools hold connections to the previous URL.
        if app._pool is not None:
            app._pool.force_close_all()
        app._pool = None
        app.amqp._producer_pool = None
        app.conf.broker_url = broker_url

    previous = app.conf.broker_url
    switch(url)
    try:
        yield
    finally:
        switch(previous)


@pytest.fixture
def start_worker(private_redis, tmp_path, tiny_base_dir):
    """Start Celery workers on the private Redis; stop whatever is left at the end."""
    started: list[Worker] = []
    env = _worker_environment(connection.settings_dict)
    env.update(
        {
            "LORAWEB_TEST_REDIS_URL": private_redis.url,
            "LORAWEB_JOB_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
            "LORAWEB_JOB_SWEEP_INTERVAL": str(SWEEP_INTERVAL),
            "LORAWEB_JOB_REQUEUE_AFTER": str(REQUEUE_AFTER),
        }
    )

    def start(*extra: str) -> Worker:
        name = f"faults{len(started)}"
        worker = Worker(env, tmp_path / f"{name}.log", (f"--hostname={name}-{os.getpid()}@%h", *extra))
        worker.start()
        started.append(worker)
        return worker

    with publishing_to(private_redis.url):
        yield start
    for worker in started:
        worker.stop()


def with_beat(tmp_path: Path) -> tuple[str, ...]:
    """Worker options that run the sweeper, with its schedule file kept out of the checkout."""
    return ("--beat", f"--schedule={tmp_path / 'beat-schedule'}")


@pytest.fixture
def dataset_task(tmp_path):
    def make(slug: str):
        files = demo_data.write_demo_datasets(tmp_path / slug)
        task = task_create(slug=slug, name=slug, user=SYSTEM)
        with files["spell_digits_A1"].open("rb") as handle:
            dataset = services.dataset_upload(task, handle, original_name="a1.jsonl", user=SYSTEM).dataset
        return task, dataset

    return make


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def job_state(job_id: int) -> TrainingJob:
    return TrainingJob.objects.select_related("version").get(pk=job_id)


def wait_until_training(job_id: int) -> None:
    wait_for(lambda: job_state(job_id).step > 0, 120, f"job {job_id} to report progress")


def wait_until_final(job_id: int, timeout: float = 120) -> TrainingJob:
    return wait_for(lambda: (job := job_state(job_id)).is_final and job, timeout, f"job {job_id} to end")


def log_codes(job: TrainingJob) -> list[str]:
    return [entry["code"] for entry in job.log]


def version_files(task_slug: str, number: int) -> list[Path]:
    folder = Path(settings.LORAWEB_ADAPTER_ROOT) / task_slug
    return [*folder.glob(f"v{number}-*"), *folder.glob(f".v{number}-*")]


def resend(job_id: int) -> None:
    """Deliver the job's message once more, as the broker does after a lost acknowledgement."""
    from training_app.tasks import train_adapter

    train_adapter.apply_async(args=[job_id])


def test_killed_worker_fails_its_job(start_worker, dataset_task, tmp_path):
    task, dataset = dataset_task("killed-worker")
    doomed = start_worker()
    job = services.training_start(task, dataset_ids=[dataset.pk], hyperparameters=ENDLESS, user=SYSTEM)
    wait_until_training(job.pk)

    # The whole worker, parent and child, as a machine that loses power or an OOM kill of the group.
    os.killpg(doomed.process.pid, signal.SIGKILL)
    doomed.process.wait()
    assert job_state(job.pk).state == TrainingJob.State.RUNNING, "nothing sweeps while no worker runs"

    fresh = start_worker(*with_beat(tmp_path))
    fresh_ready = time.time()
    failed = wait_until_final(job.pk, timeout=60)

    assert failed.state == TrainingJob.State.FAILED
    assert "stopped reporting for more than 3 seconds" in failed.error
    assert log_codes(failed)[-1] == "worker_lost"
    # The bound docs/operations.md promises once a worker is there to run the sweeper.
    due = max(failed.heartbeat_at.timestamp() + HEARTBEAT_TIMEOUT, fresh_ready)
    assert failed.finished_at.timestamp() <= due + SWEEP_INTERVAL + 5
    assert failed.version.status == AdapterVersion.Status.FAILED
    assert version_files(task.slug, failed.version.number) == []

    # A late redelivery of the failed job's message must not start it again.
    resend(job.pk)
    wait_for(
        lambda: f"Job {job.pk} not run again: it already ended failed" in fresh.log_path.read_text(),
        60,
        "the worker to log the repeated delivery",
    )
    after = job_state(job.pk)
    assert (after.state, after.finished_at, after.log) == (failed.state, failed.finished_at, failed.log)

    next_job = services.training_start(task, dataset_ids=[dataset.pk], hyperparameters=SHORT, warm_start=False, user=SYSTEM)
    done = wait_until_final(next_job.pk)
    assert done.state == TrainingJob.State.SUCCEEDED, done.error
    assert done.version.status == AdapterVersion.Status.READY
    assert done.version.adapter_dir().is_dir()


def test_job_delivered_twice_trains_once(start_worker, dataset_task):
    task, dataset = dataset_task("twice")
    # Two pool processes, so the second delivery runs while the first is training.
    worker = start_worker("--concurrency=2")
    job = services.training_start(task, dataset_ids=[dataset.pk], hyperparameters=ENDLESS, user=SYSTEM)
    wait_until_training(job.pk)

    resend(job.pk)
    wait_for(
        lambda: f"Job {job.pk} not run again: it is already running" in worker.log_path.read_text(),
        60,
        "the second delivery to be refused",
    )
    assert job_state(job.pk).state == TrainingJob.State.RUNNING
    services.job_cancel(job, user=SYSTEM)
    ended = wait_until_final(job.pk)
    assert ended.state == TrainingJob.State.CANCELLED

    resend(job.pk)
    wait_for(
        lambda: f"Job {job.pk} not run again: it already ended cancelled" in worker.log_path.read_text(),
        60,
        "the delivery after the end to be refused",
    )
    after = job_state(job.pk)
    assert log_codes(after).count("started") == 1
    assert (after.state, after.finished_at, after.log) == (ended.state, ended.finished_at, ended.log)
    assert version_files(task.slug, after.version.number) == []


def test_redis_restart_loses_no_job(start_worker, private_redis, dataset_task, tmp_path):
    task, dataset = dataset_task("redis-restart")
    start_worker(*with_beat(tmp_path))
    fresh = {"dataset_ids": [dataset.pk], "warm_start": False, "user": SYSTEM}
    running = services.training_start(task, hyperparameters=ENDLESS, **fresh)
    queued = services.training_start(task, hyperparameters=SHORT, **fresh)
    wait_until_training(running.pk)
    assert job_state(queued.pk).state == TrainingJob.State.QUEUED

    # The queue and the unacknowledged messages vanish with the server's memory.
    private_redis.stop()
    sent_while_down = services.training_start(task, hyperparameters=SHORT, **fresh)
    assert job_state(sent_while_down.pk).state == TrainingJob.State.QUEUED
    private_redis.start()

    # The running job carries on through the restart; a cancel then ends it.
    step = job_state(running.pk).step
    wait_for(lambda: job_state(running.pk).step > step, 60, "the running job to keep training")
    services.job_cancel(running, user=SYSTEM)

    ended = {job.pk: wait_until_final(job.pk, timeout=180) for job in (running, queued, sent_while_down)}
    assert ended[running.pk].state == TrainingJob.State.CANCELLED
    for job in (queued, sent_while_down):
        assert ended[job.pk].state == TrainingJob.State.SUCCEEDED, (job.pk, ended[job.pk].error, ended[job.pk].log)
        assert log_codes(ended[job.pk]).count("requeued") == 1
    assert "queue_unreachable" in log_codes(ended[sent_while_down.pk])
    for job in ended.values():
        assert log_codes(job).count("started") == 1
    assert "requeued" not in log_codes(ended[running.pk])
