"""Dataset endpoints of the JSON API: upload options, problems, size limit, reading and deletion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from adapters_app.roles import SYSTEM
from tests.ingest_cases import jsonl
from training_app import services
from training_app.models import Dataset
from training_app.uploads import upload_over_limit

pytestmark = pytest.mark.django_db

UPLOAD_URL = "/api/v1/tasks/poetry/datasets"


def pair_content(count: int, words: int = 1) -> bytes:
    rows = [json.dumps({"prompt": f"Say {i}", "completion": " ".join(["number"] * words) + f" {i}"}) for i in range(count)]
    return jsonl(*rows).encode()


def stored_files(settings) -> list[Path]:
    return sorted(path for path in Path(settings.MEDIA_ROOT).rglob("*") if path.is_file())


def test_upload_with_options(api_client, task) -> None:
    data = {
        "file": SimpleUploadedFile("words.jsonl", pair_content(15, words=40)),
        "max_length": "20",
        "on_too_long": "truncate",
        "drop_duplicates": "true",
    }

    response = api_client.post(UPLOAD_URL, data)

    assert response.status_code == 201, response.content
    body = response.json()
    assert body["num_examples"] == 15
    assert body["num_truncated"] == 15
    assert body["max_length"] == 20
    assert body["on_too_long"] == "truncate"
    assert body["drop_duplicates"] is True
    assert body["tokens"]["max"] == 20
    assert sum(body["tokens"]["histogram"]) == 15
    assert body["shape"] == "prompt_completion"
    assert body["used_by_versions"] == []


def test_column_options_on_text_rejected(api_client, task) -> None:
    data = {"file": SimpleUploadedFile("notes.txt", b"a\n\nb\n"), "completion_column": "body"}

    response = api_client.post(UPLOAD_URL, data)

    assert response.status_code == 400
    assert response.json()["errors"][0]["code"] == "columns_not_applicable"


@pytest.mark.parametrize(
    "fields",
    [{"max_length": "4096"}, {"on_too_long": "shorten"}, {"prompt_column": "question"}],
)
def test_invalid_upload_option(api_client, task, fields: dict) -> None:
    response = api_client.post(UPLOAD_URL, {"file": SimpleUploadedFile("d.jsonl", pair_content(12)), **fields})

    assert response.status_code == 400
    assert response.json()["errors"][0]["code"] == "invalid_option"
    assert Dataset.objects.count() == 0


def test_non_integer_max_length(api_client, task) -> None:
    response = api_client.post(
        UPLOAD_URL, {"file": SimpleUploadedFile("d.jsonl", pair_content(12)), "max_length": "long"}
    )

    assert response.status_code == 400
    assert "max_length" in response.json()["errors"][0]["message"]


def test_problems_name_column_and_field(api_client, task) -> None:
    content = pair_content(12) + b'{"prompt": "x", "completion": 5}\n' + "caf\xe9 ol\xe9\n".encode("latin-1")
    content = "naïve\n".encode() + content[content.index(b"\n") + 1 :]

    response = api_client.post(UPLOAD_URL, {"file": SimpleUploadedFile("d.jsonl", content)})

    errors = response.json()["errors"]
    assert response.status_code == 400
    assert errors[0] == {
        "line": 1,
        "column": 1,
        "field": None,
        "code": "invalid_json",
        "message": errors[0]["message"],
    }
    assert (errors[1]["line"], errors[1]["field"], errors[1]["code"]) == (13, "completion", "non_string_value")
    assert (errors[2]["line"], errors[2]["column"], errors[2]["code"]) == (14, 4, "invalid_encoding")
    assert response.json()["total"] == 3


def test_upload_over_limit_is_413(api_client, task, settings) -> None:
    settings.LORAWEB_MAX_UPLOAD_BYTES = 500

    response = api_client.post(UPLOAD_URL, {"file": SimpleUploadedFile("d.jsonl", pair_content(100))})

    assert response.status_code == 413
    assert upload_over_limit(response.wsgi_request), "the upload handler, not the copy, must stop it"
    error = response.json()["errors"][0]
    assert error["code"] == "file_too_large"
    assert "500 bytes" in error["message"]
    assert stored_files(settings) == []


def test_upload_without_file(api_client, task) -> None:
    response = api_client.post(UPLOAD_URL, {"max_length": "100"})

    assert response.status_code == 400
    assert response.json()["errors"][0]["code"] == "missing_file"


def test_read_and_delete_dataset(api_client, task, settings, django_capture_on_commit_callbacks) -> None:
    dataset_id = api_client.post(UPLOAD_URL, {"file": SimpleUploadedFile("d.jsonl", pair_content(12))}).json()["id"]

    read = api_client.get(f"/api/v1/datasets/{dataset_id}")
    with django_capture_on_commit_callbacks(execute=True):
        deleted = api_client.delete(f"/api/v1/datasets/{dataset_id}")
    again = api_client.delete(f"/api/v1/datasets/{dataset_id}")

    assert read.status_code == 200
    assert read.json()["file_name"] == "d.jsonl"
    assert deleted.status_code == 204
    assert again.status_code == 404
    assert again.json()["errors"][0]["code"] == "dataset_not_found"
    assert stored_files(settings) == []


def test_delete_used_dataset_is_409(api_client, task, settings, monkeypatch) -> None:
    dataset_id = api_client.post(UPLOAD_URL, {"file": SimpleUploadedFile("d.jsonl", pair_content(12))}).json()["id"]
    monkeypatch.setattr(services, "_enqueue", lambda job_id: None)
    job = services.training_start(task, dataset_ids=[dataset_id], user=SYSTEM)

    response = api_client.delete(f"/api/v1/datasets/{dataset_id}")

    assert response.status_code == 409
    assert response.json()["errors"][0]["code"] == "dataset_in_use"
    assert job.version.label in response.json()["errors"][0]["message"]
    listed = api_client.get("/api/v1/tasks/poetry/datasets").json()
    assert listed[0]["used_by_versions"] == [job.version.number]
    assert len(stored_files(settings)) == 2
