"""Dataset pages in the browser: upload results, problems, size limit, statistics and deletion."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from adapters_app.roles import SYSTEM
from tests.ingest_cases import jsonl
from training_app import services
from training_app.models import Dataset
from training_app.uploads import upload_over_limit

pytestmark = pytest.mark.django_db

FORM_DEFAULTS = {"max_length": "1024", "on_too_long": "reject", "prompt_column": "", "completion_column": ""}


@pytest.fixture
def browser(client, user, task):
    client.force_login(user)
    return client


def stored_files(settings) -> list[Path]:
    return sorted(path for path in Path(settings.MEDIA_ROOT).rglob("*") if path.is_file())


def post_upload(browser, name: str, content: bytes, **fields: str):
    data = {**FORM_DEFAULTS, **fields, "file": SimpleUploadedFile(name, content)}
    return browser.post(reverse("training_app:dataset_upload", args=["poetry"]), data)


def pair_content(count: int) -> bytes:
    rows = [json.dumps({"prompt": f"Say {i}", "completion": f"number {i}"}) for i in range(count)]
    return jsonl(*rows).encode()


def test_uploaded_dataset_page_shows_statistics(browser) -> None:
    response = post_upload(browser, "numbers.jsonl", pair_content(40))

    assert response.status_code == 302
    page = browser.get(response["Location"]).content.decode()
    dataset = Dataset.objects.get()
    assert 'id="num-examples">40<' in page
    assert f'id="split-sizes">{dataset.num_train} / {dataset.num_validation}<' in page
    assert f'id="token-total">{dataset.token_total}<' in page
    assert f'id="token-p95">{dataset.token_p95}<' in page
    assert f'id="token-max">{dataset.token_max}<' in page
    assert '<svg xmlns="http://www.w3.org/2000/svg"' in page
    assert "<script" not in page.split('id="length-histogram"')[1].split("</div>")[0]
    assert "JSONL, prompt/completion pairs" in page
    assert 'id="encoding">utf-8<' in page
    assert page.count("<tr>", page.index('id="preview"')) == 11
    assert "stored with 40 examples" in page


def test_upload_with_file_only_uses_defaults(browser) -> None:
    url = reverse("training_app:dataset_upload", args=["poetry"])

    response = browser.post(url, {"file": SimpleUploadedFile("numbers.jsonl", pair_content(12))})

    assert response.status_code == 302
    dataset = Dataset.objects.get()
    assert dataset.max_length == 1024
    assert dataset.on_too_long == "reject"
    assert not dataset.drop_duplicates


def test_failed_upload_lists_problems_keeps_choices(browser, settings) -> None:
    # The UTF-8 "ü" on the first lines marks the file as UTF-8, so the Latin-1 byte is an error.
    content = (
        jsonl(*[json.dumps({"prompt": f"Grüß {i}", "completion": "hi"}, ensure_ascii=False) for i in range(12)]).encode()
        + b'{"prompt": "x", "completion": 5}\n'
        + "na\xefve\n".encode("latin-1")
    )

    response = post_upload(
        browser,
        "broken.jsonl",
        content,
        max_length="512",
        on_too_long="truncate",
        drop_duplicates="on",
        prompt_column="",
    )

    page = response.content.decode()
    assert response.status_code == 400
    assert "<code>non_string_value</code>" in page
    assert "<td>13</td><td><code>completion</code></td>" in page
    assert "<td>14</td><td>3</td><td><code>invalid_encoding</code>" in page
    assert 'value="512"' in page
    assert re.search(r'<option value="truncate" selected>', page)
    assert re.search(r'name="drop_duplicates"[^>]*checked', page)
    assert Dataset.objects.count() == 0
    assert stored_files(settings) == []


def test_problem_list_capped_with_total(browser) -> None:
    response = post_upload(browser, "many.jsonl", pair_content(20) + b"{bad\n" * 80)

    page = response.content.decode()
    assert response.status_code == 400
    assert "The first 50 of 80 problems" in page
    assert page.count("<code>invalid_json</code>") == 50


def test_same_file_twice_explained(browser) -> None:
    first = post_upload(browser, "numbers.jsonl", pair_content(20))
    dataset = Dataset.objects.get()

    second = post_upload(browser, "copy.jsonl", pair_content(20), drop_duplicates="on")

    assert second["Location"] == first["Location"]
    page = browser.get(second["Location"]).content.decode()
    assert f"identical to “numbers.jsonl” (dataset #{dataset.pk}" in page
    assert "no copy was stored" in page
    assert Dataset.objects.count() == 1


def test_converted_encoding_note_shown(browser) -> None:
    rows = "".join(f"Question {i} : où ?,Réponse {i} : à côté de l’église et près du café.\r\n" for i in range(12))
    content = ("prompt,completion\r\n" + rows).encode("cp1252")

    response = post_upload(browser, "français.csv", content)

    page = browser.get(response["Location"]).content.decode()
    assert 'id="encoding-note"' in page
    assert "Converted to UTF-8 from cp1252" in page
    assert "l’église" in page


def test_truncation_marked_in_preview(browser) -> None:
    rows = [json.dumps({"prompt": f"Item {i}", "completion": "many words here " * 20}) for i in range(12)]

    response = post_upload(browser, "long.jsonl", jsonl(*rows).encode(), max_length="24", on_too_long="truncate")

    page = browser.get(response["Location"]).content.decode()
    assert 'id="num-truncated">12<' in page
    assert page.count("cut to 24 tokens") == 10


def test_upload_over_limit_is_413_page(browser, settings) -> None:
    settings.LORAWEB_MAX_UPLOAD_BYTES = 1000

    response = post_upload(browser, "numbers.jsonl", pair_content(200), max_length="300")

    page = response.content.decode()
    assert response.status_code == 413
    assert upload_over_limit(response.wsgi_request), "the upload handler, not the copy, must stop it"
    assert "upload limit of 1000 bytes" in page
    assert 'value="300"' in page
    assert Dataset.objects.count() == 0
    assert stored_files(settings) == []


def test_thirty_megabyte_upload_accepted(browser, settings) -> None:
    # Only the mapped columns are tokenized, so the padding column keeps the test fast.
    padding = "x" * 3000
    rows = "".join(f"q{i},a{i},{padding}\n" for i in range(10_500))
    content = ("question,answer,notes\n" + rows).encode()
    assert len(content) > 30 * 1024 * 1024
    assert len(content) > settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    assert len(content) > settings.FILE_UPLOAD_MAX_MEMORY_SIZE

    response = post_upload(browser, "big.csv", content, prompt_column="question", completion_column="answer")

    assert response.status_code == 302
    dataset = Dataset.objects.get()
    assert dataset.num_examples == 10_500
    assert dataset.size_bytes == len(content)


def test_task_page_lists_versions_and_delete(browser, task, monkeypatch) -> None:
    used = services.dataset_upload(task, _file(pair_content(20)), original_name="used.jsonl", user=SYSTEM).dataset
    unused = services.dataset_upload(task, _file(pair_content(30)), original_name="unused.jsonl", user=SYSTEM).dataset
    monkeypatch.setattr(services, "_enqueue", lambda job_id: None)
    job = services.training_start(task, dataset_ids=[used.pk], user=SYSTEM)

    page = browser.get(reverse("adapters_app:task_detail", args=["poetry"])).content.decode()

    used_row = page.split(f'id="dataset-{used.pk}"')[1].split("</tr>")[0]
    unused_row = page.split(f'id="dataset-{unused.pk}"')[1].split("</tr>")[0]
    assert job.version.label in used_row
    assert reverse("training_app:dataset_delete", args=[used.pk]) not in used_row
    assert reverse("training_app:dataset_delete", args=[unused.pk]) in unused_row


def test_delete_after_confirmation(browser, task, settings, django_capture_on_commit_callbacks) -> None:
    dataset = services.dataset_upload(task, _file(pair_content(20)), original_name="numbers.jsonl", user=SYSTEM).dataset
    url = reverse("training_app:dataset_delete", args=[dataset.pk])

    confirm = browser.get(url)
    with django_capture_on_commit_callbacks(execute=True):
        response = browser.post(url)

    assert confirm.status_code == 200
    assert 'id="confirm-delete"' in confirm.content.decode()
    assert response.status_code == 302
    assert response["Location"] == reverse("adapters_app:task_detail", args=["poetry"])
    assert not Dataset.objects.exists()
    assert stored_files(settings) == []


def test_delete_used_dataset_refused_page(browser, task, settings, monkeypatch) -> None:
    dataset = services.dataset_upload(task, _file(pair_content(20)), original_name="numbers.jsonl", user=SYSTEM).dataset
    monkeypatch.setattr(services, "_enqueue", lambda job_id: None)
    job = services.training_start(task, dataset_ids=[dataset.pk], user=SYSTEM)
    url = reverse("training_app:dataset_delete", args=[dataset.pk])

    confirm = browser.get(url).content.decode()
    response = browser.post(url)

    assert 'id="confirm-delete"' not in confirm
    assert job.version.label in confirm
    assert response.status_code == 409
    assert "cannot be deleted" in response.content.decode()
    assert Dataset.objects.filter(pk=dataset.pk).exists()
    assert len(stored_files(settings)) == 2


def _file(content: bytes):
    import io

    return io.BytesIO(content)
