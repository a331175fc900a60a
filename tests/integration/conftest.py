"""Real components for integration tests: Redis, a Celery worker process, an API client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings

REPO_ROOT = Path(__file__).resolve().parents[2]


def _redis_available(url: str) -> bool:
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.RedisError:
        return False
    return True


def _worker_environment(database: dict) -> dict[str, str]:
    """Environment that points a worker process at the test database, files and queue."""
    env = dict(os.environ)
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "loraweb.test_settings",
            "LORAWEB_MEDIA_ROOT": str(settings.MEDIA_ROOT),
            "LORAWEB_ADAPTER_ROOT": str(settings.LORAWEB_ADAPTER_ROOT),
            "LORAWEB_BASE_MODEL": str(settings.LORAWEB_BASE_MODEL),
            "LORAWEB_TEST_REDIS_URL": settings.LORAWEB_REDIS_URL,
            "LORAWEB_CELERY_QUEUE": settings.CELERY_TASK_DEFAULT_QUEUE,
            "LORAWEB_JOB_HEARTBEAT_TIMEOUT": str(settings.LORAWEB_JOB_HEARTBEAT_TIMEOUT),
            "PYTHONUNBUFFERED": "1",
        }
    )
    if database["ENGINE"].endswith("sqlite3"):
        env["LORAWEB_SQLITE_PATH"] = str(database["NAME"])
        env.pop("DATABASE_URL", None)
    else:
        env["DATABASE_URL"] = (
            f"postgres://{database['USER']}:{database.get('PASSWORD') or ''}@{database['HOST'] or '127.0.0.1'}:"
            f"{database['PORT'] or 5432}/{database['NAME']}"
        )
    return env


class Worker:
    """A `celery worker` subprocess consuming the test queue."""

    def __init__(self, env: dict[str, str], log_path: Path, extra_args: tuple[str, ...] = ()):
        self.env = env
        self.log_path = log_path
        self.extra_args = extra_args
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.log = self.log_path.open("ab")
        command = [
            sys.executable, "-m", "celery", "-A", "loraweb", "worker",
            "--loglevel=INFO", "--concurrency=1", "--pool=prefork",
            f"--queues={self.env['LORAWEB_CELERY_QUEUE']}",
            f"--hostname=test-{os.getpid()}@%h",
            *self.extra_args,
        ]
        self.process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Celery worker exited with {self.process.returncode}; see {self.log_path}")
            if b" ready." in self.log_path.read_bytes():
                return
            time.sleep(0.2)
        raise RuntimeError(f"Celery worker not ready after {timeout} s; see {self.log_path}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.log.close()


@pytest.fixture(scope="session")
def celery_worker_process(django_db_setup, django_db_blocker, tiny_base_dir, tmp_path_factory):
    """One real Celery worker for the whole session, on the test database."""
    if not _redis_available(settings.LORAWEB_REDIS_URL):
        pytest.fail(f"Redis does not answer on {settings.LORAWEB_REDIS_URL}; `make test` starts one.")

    import redis

    # Leftover messages from an aborted run would be picked up as jobs of this run.
    redis.Redis.from_url(settings.LORAWEB_REDIS_URL).delete(settings.CELERY_TASK_DEFAULT_QUEUE)

    from django.db import connection

    log_path = tmp_path_factory.mktemp("worker") / "celery.log"
    worker = Worker(_worker_environment(connection.settings_dict), log_path)
    worker.start()
    yield worker
    worker.stop()
    print(f"\nCelery worker log: {log_path}")


@pytest.fixture
def user(maintainer_user):
    """The user of tests that exercise a feature rather than access: a maintainer may do everything."""
    return maintainer_user


@pytest.fixture
def admin_user_with_password(django_user_model):
    return django_user_model.objects.create_superuser("boss", "", "pw-for-tests-only")


@pytest.fixture
def api_client(user):
    """Django test client that sends a bearer token, as scripts do."""
    from django.test import Client

    from adapters_app.services import api_token_create

    _token, secret = api_token_create(user, name="tests", user=user)
    return Client(HTTP_AUTHORIZATION=f"Bearer {secret}")
