"""JSON API contracts that need no worker: auth, validation errors, status codes."""

from __future__ import annotations

import json

import pytest
from django.test import Client
from django.utils import timezone

from adapters_app.models import ApiToken
from training_app.models import Dataset, TrainingJob

pytestmark = pytest.mark.django_db


def test_api_requires_token(tiny_base_dir):
    anonymous = Client().get("/api/v1/tasks")
    assert anonymous.status_code == 401
    assert anonymous.json()["errors"][0]["code"] == "unauthorized"
    assert Client(HTTP_AUTHORIZATION="Bearer wrong").get("/api/v1/tasks").status_code == 401


@pytest.mark.parametrize("headers", [{}, {"HTTP_AUTHORIZATION": "Bearer wrong"}])
def test_post_without_valid_token_is_401_not_csrf(tiny_base_dir, headers):
    client = Client(enforce_csrf_checks=True, **headers)
    response = client.post("/v1/completions", {"model": "x", "prompt": "y"}, content_type="application/json")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"

    response = client.post("/api/v1/tasks", {"slug": "x", "name": "x"}, content_type="application/json")
    assert response.status_code == 401
    assert response.json()["errors"][0]["code"] == "unauthorized"


def test_browser_session_post_needs_csrf(user):
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    response = client.post("/api/v1/tasks", {"slug": "x", "name": "x"}, content_type="application/json")
    assert response.status_code == 403
    assert client.get("/api/v1/tasks").status_code == 200


def test_revoked_and_expired_tokens_rejected(user, token):
    client = Client(HTTP_AUTHORIZATION=f"Bearer {token}")
    assert client.get("/api/v1/tasks").status_code == 200

    ApiToken.objects.update(expires_at=timezone.now() - timezone.timedelta(seconds=1))
    assert client.get("/api/v1/tasks").status_code == 401

    ApiToken.objects.update(expires_at=None, revoked_at=timezone.now())
    assert client.get("/api/v1/tasks").status_code == 401


def test_token_stored_hashed(user, token):
    stored = ApiToken.objects.get(user=user)
    assert token not in (stored.key_hash, stored.prefix)
    assert token.startswith(stored.prefix)


def test_create_and_list_tasks(api_client, tiny_base_dir):
    response = api_client.post("/api/v1/tasks", {"slug": "poetry", "name": "Poetry"}, content_type="application/json")
    assert response.status_code == 201
    assert response.json()["active_version"] is None

    duplicate = api_client.post("/api/v1/tasks", {"slug": "poetry", "name": "again"}, content_type="application/json")
    assert duplicate.status_code == 409
    assert duplicate.json()["errors"][0]["code"] == "duplicate_slug"

    bad = api_client.post("/api/v1/tasks", {"slug": "Bad Slug!", "name": "x"}, content_type="application/json")
    assert bad.status_code == 400
    assert bad.json()["errors"][0]["code"] == "invalid_task"

    assert [task["slug"] for task in api_client.get("/api/v1/tasks").json()] == ["poetry"]


def test_invalid_dataset_lists_problems_and_stores_nothing(api_client, task, jsonl_file, good_rows, settings):
    rows = good_rows[:]
    rows[3] = '{"prompt": "x"'
    rows[7] = '{"prompt": "x", "completion": 5}'
    with jsonl_file(rows).open("rb") as handle:
        response = api_client.post("/api/v1/tasks/poetry/datasets", {"file": handle})

    assert response.status_code == 400
    errors = response.json()["errors"]
    assert [(error["line"], error["code"]) for error in errors] == [(4, "invalid_json"), (8, "non_string_value")]
    assert all(error["message"] for error in errors)
    assert Dataset.objects.count() == 0
    assert not any((settings.MEDIA_ROOT / "datasets").glob("*"))


def test_upload_then_same_file_returns_existing(api_client, task, good_rows):
    from django.core.files.uploadedfile import SimpleUploadedFile

    content = ("\n".join(good_rows) + "\n").encode()
    upload = SimpleUploadedFile("../../etc/evil.jsonl", content)
    first = api_client.post("/api/v1/tasks/poetry/datasets", {"file": upload})
    assert first.status_code == 201
    body = first.json()
    assert body["num_examples"] == 20
    assert body["num_train"] + body["num_validation"] == 20
    dataset = Dataset.objects.get(pk=body["id"])
    assert "/" not in dataset.stored_name
    assert ".." not in dataset.stored_name
    assert dataset.original_name == "evil.jsonl"

    second = api_client.post("/api/v1/tasks/poetry/datasets", {"file": SimpleUploadedFile("copy.jsonl", content)})
    assert second.status_code == 200
    assert second.json()["id"] == body["id"]
    assert Dataset.objects.count() == 1


def test_upload_too_large_is_413(api_client, task, jsonl_file, good_rows, settings):
    settings.LORAWEB_MAX_UPLOAD_BYTES = 100
    with jsonl_file(good_rows).open("rb") as handle:
        response = api_client.post("/api/v1/tasks/poetry/datasets", {"file": handle})
    assert response.status_code == 413
    assert "100" in response.json()["errors"][0]["message"]
    assert Dataset.objects.count() == 0


def test_start_version_validates_hyperparameters(api_client, task, jsonl_file, good_rows):
    with jsonl_file(good_rows).open("rb") as handle:
        dataset_id = api_client.post("/api/v1/tasks/poetry/datasets", {"file": handle}).json()["id"]

    body = {"dataset_ids": [dataset_id], "hyperparameters": {"rank": 0}}
    response = api_client.post("/api/v1/tasks/poetry/versions", body, content_type="application/json")
    assert response.status_code == 400
    assert "0" in response.json()["errors"][0]["message"]

    body = {"dataset_ids": [dataset_id], "hyperparameters": {"max_length": 4096}}
    response = api_client.post("/api/v1/tasks/poetry/versions", body, content_type="application/json")
    assert response.status_code == 400
    assert "4096" in response.json()["errors"][0]["message"]

    body = {"dataset_ids": [dataset_id + 99]}
    response = api_client.post("/api/v1/tasks/poetry/versions", body, content_type="application/json")
    assert response.status_code == 400
    assert response.json()["errors"][0]["code"] == "unknown_dataset"

    body = {"dataset_ids": [dataset_id], "warm_start": True}
    response = api_client.post("/api/v1/tasks/poetry/versions", body, content_type="application/json")
    assert response.status_code == 400
    assert response.json()["errors"][0]["code"] == "no_active_version"
    assert TrainingJob.objects.count() == 0


def test_unknown_model_in_openai_shape(api_client, tiny_base_dir):
    body = {"model": "missing-task", "prompt": "hello"}
    response = api_client.post("/v1/completions", body, content_type="application/json")
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "task_not_found"
    assert "missing-task" in error["message"]


def test_openapi_schema_served(api_client):
    response = api_client.get("/api/v1/openapi.json")
    assert response.status_code == 200
    paths = json.loads(response.content)["paths"]
    assert "/api/v1/tasks/{slug}/versions" in paths
    assert "/api/v1/jobs/{job_id}" in paths


def test_healthz_without_login():
    assert Client().get("/healthz").json() == {"status": "ok"}
