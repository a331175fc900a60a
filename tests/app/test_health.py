"""/healthz and /readyz: open to everyone, and saying nothing but the outcome of each check."""

from __future__ import annotations

import socket

import pytest

pytestmark = pytest.mark.django_db


@pytest.fixture
def closed_port() -> int:
    """A local port that nothing listens on: bound once to pick it, then released."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_healthz_without_login(client):
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_ok(client):
    response = client.get("/readyz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_fails_when_redis_is_down(client, settings, closed_port, caplog):
    settings.LORAWEB_REDIS_URL = f"redis://127.0.0.1:{closed_port}/0"

    response = client.get("/readyz")

    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "checks": {"database": "ok", "redis": "failed"}}
    assert str(closed_port) not in response.content.decode()
    assert any("redis" in record.getMessage() and record.levelname == "WARNING" for record in caplog.records)


def test_readyz_on_inference_server_waits_for_model(client, settings, tiny_base_dir):
    from adapters_app.inference import load_engine_in_background, reset_engine

    settings.LORAWEB_ROLE = "inference"
    reset_engine()
    try:
        before = client.get("/readyz")
        load_engine_in_background().join(timeout=120)
        after = client.get("/readyz")
    finally:
        reset_engine()

    assert before.status_code == 503
    assert before.json() == {"status": "unavailable", "checks": {"database": "ok", "redis": "ok", "model": "not_loaded"}}
    assert after.status_code == 200
    assert after.json() == {"status": "ok"}


def test_readyz_never_loads_model(client, settings):
    from adapters_app.inference import engine_state, reset_engine

    settings.LORAWEB_ROLE = "inference"
    reset_engine()

    client.get("/readyz")
    client.get("/metrics")

    assert engine_state() == "not_loaded"
