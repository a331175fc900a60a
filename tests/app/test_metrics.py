"""/metrics: who may read it, and what it reports after requests, completions and training jobs."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from tests.app.test_serving_app import adapter_sources, fresh_engine, ready_version  # noqa: F401 - fixtures

pytestmark = pytest.mark.django_db


def bearer_client(user) -> Client:
    from adapters_app.roles import SYSTEM
    from adapters_app.services import api_token_create

    return Client(HTTP_AUTHORIZATION=f"Bearer {api_token_create(user, name='metrics', user=SYSTEM)[1]}")


@pytest.fixture
def scraper(viewer_user) -> Client:
    return bearer_client(viewer_user)


def scrape(client: Client) -> dict[tuple[str, frozenset], float]:
    """Return every sample of /metrics as {(name, labels): value}."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_without_credentials_is_401(client):
    response = client.get("/metrics")

    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert b"loraweb_" not in response.content


def test_metrics_with_unknown_token_is_401(viewer_user):
    client = Client(HTTP_AUTHORIZATION="Bearer lw_not-a-real-token")
    client.force_login(viewer_user)

    assert client.get("/metrics").status_code == 401


def test_metrics_for_user_without_role_is_403(roleless_user):
    assert bearer_client(roleless_user).get("/metrics").status_code == 403


def test_metrics_with_viewer_token_or_session(client, scraper, viewer_user):
    assert scraper.get("/metrics").status_code == 200

    client.force_login(viewer_user)
    assert client.get("/metrics").status_code == 200


def test_http_requests_counted_by_route_name(scraper, client):
    before = scrape(scraper)

    client.get("/healthz")
    client.get("/healthz")
    client.get("/no/such/page-7319")
    after = scrape(scraper)

    healthz = {"method": "GET", "route": "healthz", "status": "200"}
    assert value(after, "loraweb_http_requests_total", **healthz) - value(before, "loraweb_http_requests_total", **healthz) == 2
    assert value(after, "loraweb_http_request_duration_seconds_count", **healthz) - value(
        before, "loraweb_http_request_duration_seconds_count", **healthz
    ) == 2
    unmatched = {"method": "GET", "route": "unmatched", "status": "404"}
    assert value(after, "loraweb_http_requests_total", **unmatched) - value(before, "loraweb_http_requests_total", **unmatched) == 1
    routes = {dict(labels).get("route") for name, labels in after if name == "loraweb_http_requests_total"}
    assert not any(route.startswith("/") or "page-7319" in route for route in routes)


def test_completion_updates_serving_metrics(scraper, api_client, task, settings, adapter_sources):  # noqa: F811
    version = ready_version(task, adapter_sources[0], settings)
    before = scrape(scraper)

    body = {"model": f"poetry@v{version.number}", "prompt": "Roses are red", "max_tokens": 6, "temperature": 0}
    first = api_client.post("/v1/completions", body, content_type="application/json")
    second = api_client.post("/v1/completions", body, content_type="application/json")
    after = scrape(scraper)

    assert first.status_code == 200, first.content
    assert second.status_code == 200, second.content
    tokens = first.json()["usage"]["completion_tokens"] + second.json()["usage"]["completion_tokens"]

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("loraweb_completions_total", task="poetry", status="ok") == 2
    assert delta("loraweb_completion_duration_seconds_count", task="poetry") == 2
    assert delta("loraweb_adapter_cache_misses_total") == 1
    assert delta("loraweb_adapter_cache_loads_total") == 1
    assert delta("loraweb_adapter_cache_hits_total") == 1
    assert ("loraweb_adapter_cache_evictions_total", frozenset()) in after
    assert delta("loraweb_generated_tokens_total") == tokens
    # The two requests ran one after the other: one prefill each, then one decode step per further token.
    assert delta("loraweb_batch_rows_count", phase="prefill") == 2
    assert delta("loraweb_batch_rows_count", phase="decode") == tokens - 2
    assert delta("loraweb_batch_rows_bucket", phase="decode", le="1.0") == tokens - 2
    assert value(after, "loraweb_scheduler_queue_depth") == 0
    assert value(after, "loraweb_base_model_loaded") == 1
    route = {"method": "POST", "route": "openai_v1:create_completion", "status": "200"}
    assert delta("loraweb_http_requests_total", **route) == 2


def test_failed_completion_counted_by_code(scraper, api_client, task, settings, fresh_engine):  # noqa: F811
    settings.LORAWEB_MAX_QUEUE = 0
    before = scrape(scraper)

    response = api_client.post("/v1/completions", {"model": "poetry", "prompt": "x", "max_tokens": 2}, content_type="application/json")
    after = scrape(scraper)

    assert response.status_code == 429
    failed = {"task": "poetry", "status": "queue_full"}
    assert value(after, "loraweb_completions_total", **failed) - value(before, "loraweb_completions_total", **failed) == 1


def test_training_jobs_read_from_database(scraper, task):
    from adapters_app.services import version_allocate
    from training_app.models import TrainingJob

    now = timezone.now()
    jobs = [
        (TrainingJob.State.QUEUED, None),
        (TrainingJob.State.RUNNING, None),
        (TrainingJob.State.SUCCEEDED, timedelta(seconds=45)),
        (TrainingJob.State.SUCCEEDED, timedelta(seconds=400)),
        (TrainingJob.State.FAILED, timedelta(seconds=5)),
    ]
    for state, duration in jobs:
        version = version_allocate(task, parent=None, hyperparameters={})
        TrainingJob.objects.create(
            task=task,
            version=version,
            state=state,
            started_at=now - duration if duration else None,
            finished_at=now if duration else None,
        )

    samples = scrape(scraper)

    assert value(samples, "loraweb_training_jobs", state="queued") == 1
    assert value(samples, "loraweb_training_jobs", state="running") == 1
    assert value(samples, "loraweb_training_jobs", state="succeeded") == 2
    assert value(samples, "loraweb_training_jobs", state="cancelled") == 0
    succeeded = "loraweb_training_job_duration_seconds"
    assert value(samples, f"{succeeded}_count", state="succeeded") == 2
    assert value(samples, f"{succeeded}_bucket", state="succeeded", le="30.0") == 0
    assert value(samples, f"{succeeded}_bucket", state="succeeded", le="60.0") == 1
    assert value(samples, f"{succeeded}_bucket", state="succeeded", le="600.0") == 2
    assert value(samples, f"{succeeded}_sum", state="succeeded") == pytest.approx(445, abs=0.01)
    assert value(samples, f"{succeeded}_bucket", state="failed", le="10.0") == 1
