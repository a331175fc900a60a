"""The real ASGI server (uvicorn) as a subprocess, used through the official `openai` package."""

from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.integration.conftest import REPO_ROOT, _worker_environment

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_status(port: int, path: str, timeout: float = 10) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    connection.request("GET", path)
    status = connection.getresponse().status
    connection.close()
    return status


@pytest.fixture
def asgi_server(tiny_base_dir, tmp_path):
    """uvicorn serving loraweb on a free 127.0.0.1 port, on the test database and files."""
    from django.db import connection

    env = _worker_environment(connection.settings_dict)
    port = free_port()
    log_path = tmp_path / "uvicorn.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "loraweb.asgi:application", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                if process.poll() is not None:
                    pytest.fail(f"uvicorn exited with {process.returncode}: {log_path.read_text()[-2000:]}")
                try:
                    if get_status(port, "/healthz", timeout=2) == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"uvicorn did not answer within 60 s: {log_path.read_text()[-2000:]}")
                time.sleep(0.2)
            yield port
        finally:
            process.terminate()
            process.wait(timeout=30)
    print(f"\nuvicorn log: {log_path}")


@pytest.fixture
def token(user) -> str:
    from adapters_app.services import api_token_create

    return api_token_create(user, name="asgi", user=user)[1]


@pytest.fixture
def task(tiny_base_dir):
    from adapters_app.roles import SYSTEM
    from adapters_app.services import task_create

    return task_create(slug="poetry", name="Poetry", user=SYSTEM)


def test_openai_package_through_uvicorn(asgi_server, token, task):
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{asgi_server}/v1", api_key=token, max_retries=0, timeout=120)

    plain = client.completions.create(model="poetry", prompt="Roses are red", max_tokens=8, temperature=0)
    chunks = list(
        client.completions.create(model="poetry", prompt="Roses are red", max_tokens=8, temperature=0, stream=True)
    )

    assert plain.usage.completion_tokens <= 8
    assert "".join(chunk.choices[0].text for chunk in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert len(chunks) > 2, "the answer did not arrive in pieces"


def test_pages_answer_during_long_stream(asgi_server, token, task):
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{asgi_server}/v1", api_key=token, max_retries=0, timeout=120)
    client.completions.create(model="poetry", prompt="Warm up", max_tokens=1)  # loads the model
    first_piece = threading.Event()
    finished = threading.Event()

    def slow_reader() -> None:
        stream = client.completions.create(
            model="poetry", prompt="A very long story", max_tokens=250, temperature=0, stream=True
        )
        for _chunk in stream:
            first_piece.set()
            time.sleep(0.02)  # a slow client keeps the stream open
        finished.set()

    reader = threading.Thread(target=slow_reader, daemon=True)
    reader.start()
    assert first_piece.wait(timeout=60)

    # Sync Django views share one thread under ASGI. The stream must not hold it.
    started = time.monotonic()
    statuses = [get_status(asgi_server, "/accounts/login/") for _ in range(3)]
    elapsed = time.monotonic() - started

    assert statuses == [200, 200, 200]
    assert not finished.is_set(), "the stream ended before the pages were requested"
    assert elapsed < 5, f"pages took {elapsed:.1f} s while a completion streamed"
    reader.join(timeout=120)
