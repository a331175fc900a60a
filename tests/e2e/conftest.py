"""Real components for browser tests: uvicorn, a Celery worker and Debian's headless Chromium.

The browser tests of one module share a server, a worker and the database rows they create,
so a later flow reuses the versions an earlier one trained. The rows are flushed when the
module ends.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings

from tests.integration.conftest import REPO_ROOT, Worker, _redis_available, _worker_environment

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT_DIR = REPO_ROOT / "docs" / "screenshots"
LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 375, "height": 740}
PASSWORD = "pw-for-tests-only"

# The configured database, read before pytest-django points the connection at the test one.
CONFIGURED_DATABASE_NAME = settings.DATABASES["default"]["NAME"]

# Flags that turn off Chromium's own background requests (updates, sync, default apps).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--no-first-run",
    "--no-default-browser-check",
    "--metrics-recording-only",
]


def _child_environment() -> dict[str, str]:
    """Environment of the server and worker processes, which must keep Django's async checks."""
    from django.db import connection

    env = _worker_environment(connection.settings_dict)
    env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    return env


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _status(port: int, path: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    finally:
        connection.close()


@pytest.fixture(scope="module")
def e2e_db(django_db_setup, django_db_blocker) -> Iterator[None]:
    """Open the test database to this module for its whole run, then flush what it wrote.

    The server and the worker are other processes, so every row must be committed, as in
    transactional tests. Unlike there, rows stay between the tests of the module.
    """
    from django.core.management import call_command
    from django.db import DEFAULT_DB_ALIAS, connection
    from django.test.utils import setup_databases, teardown_databases

    with django_db_blocker.unblock():
        created = None
        if connection.settings_dict["NAME"] == CONFIGURED_DATABASE_NAME:
            # pytest-django creates the test database only when a test of the run is marked
            # django_db or uses `db`. These tests use neither, because both flush or roll back
            # the rows after each test.
            created = setup_databases(verbosity=0, interactive=False, aliases={DEFAULT_DB_ALIAS})
        assert connection.settings_dict["NAME"] != CONFIGURED_DATABASE_NAME, "not on the test database"
        try:
            yield
        finally:
            call_command("flush", interactive=False, verbosity=0)
            if created is not None:
                teardown_databases(created, verbosity=0)


@pytest.fixture(autouse=True)
def _e2e_db_access(e2e_db, django_db_blocker) -> Iterator[None]:
    with django_db_blocker.unblock():
        yield


@pytest.fixture(scope="module")
def superuser(e2e_db):
    """A superuser, who has every role, for logging in through the login page."""
    from django.contrib.auth import get_user_model

    return get_user_model().objects.create_superuser("e2e-admin", "", PASSWORD)


@pytest.fixture(scope="module")
def e2e_worker(e2e_db, tiny_base_dir, tmp_path_factory) -> Iterator[Worker]:
    """A Celery worker process for this module's training jobs."""
    if not _redis_available(settings.LORAWEB_REDIS_URL):
        pytest.fail(f"Redis does not answer on {settings.LORAWEB_REDIS_URL}; `make test` starts one.")

    import redis

    redis.Redis.from_url(settings.LORAWEB_REDIS_URL).delete(settings.CELERY_TASK_DEFAULT_QUEUE)
    log_path = tmp_path_factory.mktemp("e2e-worker") / "celery.log"
    worker = Worker(_child_environment(), log_path)
    worker.start()
    yield worker
    worker.stop()
    print(f"\nCelery worker log: {log_path}")


@pytest.fixture(scope="module")
def server_url(e2e_db, tiny_base_dir, tmp_path_factory) -> Iterator[str]:
    """Base URL of uvicorn serving loraweb on 127.0.0.1, on the test database and files."""
    env = _child_environment()
    port = _free_port()
    log_path = tmp_path_factory.mktemp("e2e-server") / "uvicorn.log"
    command = [sys.executable, "-m", "uvicorn", "loraweb.asgi:application", "--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while True:
                if process.poll() is not None:
                    pytest.fail(f"uvicorn exited with {process.returncode}: {log_path.read_text()[-2000:]}")
                try:
                    if _status(port, "/healthz") == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"uvicorn /healthz did not return 200 within 60 s: {log_path.read_text()[-2000:]}")
                time.sleep(0.2)
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(timeout=30)
    print(f"\nuvicorn log: {log_path}")


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless, driven by Playwright."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"Browser tests need Debian's Chromium at {CHROMIUM}; install it with "
            "`apt-get install -y chromium` (`make test` does so when it runs as root)."
        )
    from playwright.sync_api import sync_playwright

    # Playwright's sync API runs an event loop in this thread, so Django rejects ORM calls
    # made from it. The tests' own queries are plain blocking code, which is safe here.
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            yield chromium
            chromium.close()
    finally:
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.call_report = report
    return report


@pytest.fixture
def new_page(request, browser, server_url, tmp_path):
    """Open pages in fresh browser contexts (own cookies and locale) that close after the test.

    When the test fails, the last page of each context is saved under the test's tmp_path.
    """
    contexts = []

    def open_page(locale: str = "en-US", viewport: dict | None = None):
        context = browser.new_context(base_url=server_url, locale=locale, viewport=viewport or LAPTOP)
        context.set_default_timeout(30_000)
        contexts.append(context)
        return context.new_page()

    yield open_page
    report = getattr(request.node, "call_report", None)
    for index, context in enumerate(contexts):
        if report is not None and report.failed and context.pages:
            path = tmp_path / f"failure-{index}.png"
            context.pages[-1].screenshot(path=str(path), full_page=True)
            print(f"\nPage at failure ({context.pages[-1].url}): {path}")
        context.close()


def screenshot(page, name: str) -> Path:
    """Save a full-page screenshot for the docs as docs/screenshots/NAME."""
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOT_DIR / name
    page.screenshot(path=str(path), full_page=True)
    return path


def log_in(page, username: str, password: str = PASSWORD) -> None:
    page.goto("/accounts/login/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("main button[type=submit]")
    page.wait_for_url("**/")
