"""Request ids on responses and log records, and the text and JSON log formats of web and worker."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from loraweb.logs import LogContextFilter

pytestmark = pytest.mark.django_db

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def records(caplog) -> pytest.LogCaptureFixture:
    """caplog with the project's context filter, as the console handler of LOGGING has it."""
    caplog.handler.addFilter(LogContextFilter())
    caplog.set_level(logging.INFO)
    return caplog


def test_request_id_from_client_echoed(client):
    response = client.get("/healthz", HTTP_X_REQUEST_ID="trace-42.a:b")

    assert response["X-Request-ID"] == "trace-42.a:b"


@pytest.mark.parametrize("given", ["", "has space", "line\nbreak", "x" * 129, "-starts-with-dash", "ümlaut"])
def test_unusable_request_id_replaced(client, given):
    response = client.get("/healthz", HTTP_X_REQUEST_ID=given)

    assert re.fullmatch(r"[0-9a-f]{32}", response["X-Request-ID"])


def test_generated_request_ids_differ(client):
    assert client.get("/healthz")["X-Request-ID"] != client.get("/healthz")["X-Request-ID"]


def test_request_id_on_log_records(client, settings, records):
    settings.LORAWEB_REDIS_URL = "redis://127.0.0.1:1/0"

    client.get("/readyz", HTTP_X_REQUEST_ID="trace-ready")
    client.get("/no/such/page", HTTP_X_REQUEST_ID="trace-missing")
    logging.getLogger("tests.after").info("outside any request")

    by_message = {record.getMessage(): record for record in records.records}
    redis_line = next(record for record in records.records if record.name == "loraweb.health")
    assert redis_line.request_id == "trace-ready"
    # Django logs the 404 after the middleware returned; the id is still set then.
    assert by_message["Not Found: /no/such/page"].request_id == "trace-missing"
    assert by_message["outside any request"].request_id is None


def test_completion_log_has_request_id(api_client, task, records):
    body = {"model": "poetry", "prompt": "Roses are red", "max_tokens": 3, "temperature": 0}

    response = api_client.post("/v1/completions", body, content_type="application/json", HTTP_X_REQUEST_ID="trace-cmpl")

    assert response.status_code == 200, response.content
    completed = [record for record in records.records if record.getMessage().startswith("Completed poetry")]
    assert [record.request_id for record in completed] == ["trace-cmpl"]


def test_job_ids_on_training_log_records(task, records):
    from adapters_app.services import version_allocate
    from training_app import services
    from training_app.models import TrainingJob

    version = version_allocate(task, parent=None, hyperparameters={})
    job = TrainingJob.objects.create(task=task, version=version, state=TrainingJob.State.SUCCEEDED)

    services.training_run(job.pk)

    unclaimed = [record for record in records.records if "not run again" in record.getMessage()]
    assert [record.job_id for record in unclaimed] == [job.pk]


LOGGING_SCRIPT = textwrap.dedent(
    """
    import logging
    import django

    django.setup()
    from loraweb.logs import log_context, set_request_id

    logger = logging.getLogger("adapters_app.example")
    set_request_id("trace-7")
    with log_context(task="poetry", version="v2", job_id=7):
        logger.info("Training %s", "started")
        try:
            raise ValueError("bad value")
        except ValueError:
            logger.exception("Training failed")
    set_request_id(None)
    logger.warning("After the request")
    """
)

WORKER_SCRIPT = textwrap.dedent(
    """
    import logging
    from loraweb.celery import app

    app.log.setup(loglevel="INFO")
    logging.getLogger("celery.worker").info("Worker ready")
    """
)


def run_python(script: str, log_format: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "loraweb.test_settings", "LORAWEB_LOG_LEVEL": "INFO"}
    env.pop("LORAWEB_LOG_FORMAT", None)
    if log_format is not None:
        env["LORAWEB_LOG_FORMAT"] = log_format
    return subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_json_log_lines():
    result = run_python(LOGGING_SCRIPT, "json")

    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    started, failed, after = lines
    assert set(started) == {"time", "level", "logger", "message", "request_id", "task", "version", "job_id"}
    assert started["level"] == "INFO"
    assert started["logger"] == "adapters_app.example"
    assert started["message"] == "Training started"
    assert started["request_id"] == "trace-7"
    assert (started["task"], started["version"], started["job_id"]) == ("poetry", "v2", 7)
    assert started["time"].endswith("+00:00")
    assert "ValueError: bad value" in failed["exception"]
    assert after["request_id"] is None
    assert "job_id" not in after


def test_text_log_lines_show_context():
    result = run_python(LOGGING_SCRIPT, None)

    assert result.returncode == 0, result.stderr
    first, *_rest = result.stderr.splitlines()
    assert "INFO adapters_app.example [request_id=trace-7 task=poetry version=v2 job_id=7]: Training started" in first
    assert "WARNING adapters_app.example [-]: After the request" in result.stderr


def test_celery_worker_uses_json_format():
    result = run_python(WORKER_SCRIPT, "json")

    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert [(line["logger"], line["message"]) for line in lines] == [("celery.worker", "Worker ready")]


def test_unknown_log_format_rejected():
    result = run_python("import django; django.setup()", "xml")

    assert result.returncode != 0
    assert "LORAWEB_LOG_FORMAT='xml' is invalid; use text or json" in result.stderr
