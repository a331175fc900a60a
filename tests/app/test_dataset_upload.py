"""The dataset upload service: rejection stores nothing, real files, options, names, deletion."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest

from adapters_app.roles import SYSTEM
from adapters_app.services import ServiceError
from tests.ingest_cases import INVALID_CASES, Case, jsonl
from tests.unit.test_ingest import REAL_DATASETS
from training_app import services
from training_app.ingest import IngestOptions
from training_app.models import Dataset

pytestmark = pytest.mark.django_db


def stored_files(settings) -> list[Path]:
    return sorted(path for path in Path(settings.MEDIA_ROOT).rglob("*") if path.is_file())


def upload_bytes(task, content: bytes, name: str = "data.jsonl", **options) -> services.UploadOutcome:
    return services.dataset_upload(
        task,
        io.BytesIO(content),
        original_name=name,
        options=IngestOptions(**options) if options else None,
        user=SYSTEM,
    )


def pair_content(count: int, prefix: str = "") -> bytes:
    rows = [json.dumps({"prompt": f"{prefix}Say {i}", "completion": f"number {i}"}) for i in range(count)]
    return jsonl(*rows).encode()


@pytest.mark.parametrize("case", INVALID_CASES, ids=[case.id for case in INVALID_CASES])
def test_rejected_upload_stores_nothing(task, settings, case: Case) -> None:
    options = dict(case.options)
    limit = options.pop("max_decompressed_bytes", None)
    if limit is not None:
        settings.LORAWEB_MAX_DECOMPRESSED_BYTES = limit

    with pytest.raises(services.DatasetRejected) as raised:
        upload_bytes(task, case.data(), case.name, **options)

    first = raised.value.problems[0]
    assert first.code == case.code
    assert first.line == case.line
    assert Dataset.objects.count() == 0
    assert stored_files(settings) == []


@pytest.mark.parametrize("name", sorted(REAL_DATASETS))
def test_real_dataset_upload_counts(task, shared_datasets: Path, name: str) -> None:
    expected_format, expected_count, expected_duplicates = REAL_DATASETS[name]
    path = shared_datasets / name

    with path.open("rb") as handle:
        dataset = services.dataset_upload(task, handle, original_name=name, user=SYSTEM).dataset

    assert dataset.format == expected_format
    assert dataset.num_examples == expected_count
    assert dataset.num_duplicates == expected_duplicates
    assert dataset.num_train + dataset.num_validation == expected_count
    assert dataset.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert dataset.encoding == "utf-8"
    assert 0 < dataset.token_max <= 1024
    assert dataset.token_total > dataset.token_p95 >= dataset.token_mean > 0
    assert sum(dataset.length_histogram["counts"]) == expected_count

    train, validation = services.dataset_split(dataset)
    assert (len(train), len(validation)) == (dataset.num_train, dataset.num_validation)
    assert not set(train) & set(validation), "copies of one example must stay on one side"


def test_real_speech_lengths_include_eos(task, shared_datasets: Path) -> None:
    # The speech with the most tokens has 858 GPT-2 tokens, and training appends EOS.
    with (shared_datasets / "tinyshakespeare.txt").open("rb") as handle:
        dataset = services.dataset_upload(task, handle, original_name="tinyshakespeare.txt", user=SYSTEM).dataset

    assert dataset.token_max == 859


def test_upload_stores_original_and_prepared(task, settings) -> None:
    content = pair_content(20)

    dataset = upload_bytes(task, content).dataset

    assert services.dataset_path(dataset).read_bytes() == content
    assert services.prepared_path(dataset).is_file()
    assert len(stored_files(settings)) == 2
    assert dataset.shape == "prompt_completion"
    assert dataset.max_length == 1024
    assert dataset.on_too_long == "reject"
    assert len(dataset.preview) == 10
    assert dataset.preview[0]["prompt"] == "Say 0"
    assert dataset.preview[0]["tokens"] > 0


def test_same_file_returns_existing_dataset(task, settings) -> None:
    content = pair_content(20)
    first = upload_bytes(task, content)

    second = upload_bytes(task, content, name="again.jsonl", drop_duplicates=True)

    assert first.created
    assert not second.created
    assert second.dataset.pk == first.dataset.pk
    assert not second.dataset.drop_duplicates
    assert Dataset.objects.count() == 1
    assert len(stored_files(settings)) == 2


def test_same_file_other_task_is_new(task, settings) -> None:
    from adapters_app.services import task_create

    other = task_create(slug="prose", name="Prose", user=SYSTEM)
    content = pair_content(20)
    upload_bytes(task, content)

    outcome = upload_bytes(other, content)

    assert outcome.created
    assert Dataset.objects.count() == 2


def test_truncate_option_stored(task) -> None:
    rows = [json.dumps({"prompt": f"Item {i}", "completion": "many words here " * 20}) for i in range(12)]

    dataset = upload_bytes(task, jsonl(*rows).encode(), max_length=32, on_too_long="truncate").dataset

    assert dataset.num_truncated == 12
    assert dataset.token_max == 32
    assert dataset.on_too_long == "truncate"
    assert dataset.preview[0]["truncated"] is True
    assert all(example.truncated for example in services.dataset_examples(dataset))


def test_drop_duplicates_option_stored(task) -> None:
    content = pair_content(12) + pair_content(3)

    dataset = upload_bytes(task, content, drop_duplicates=True).dataset

    assert dataset.num_duplicates == 3
    assert dataset.num_examples == 12
    assert len(services.dataset_examples(dataset)) == 12


def test_legacy_dataset_read_from_original(task) -> None:
    dataset = upload_bytes(task, pair_content(30)).dataset
    expected = services.dataset_split(dataset)
    services.prepared_path(dataset).unlink()
    Dataset.objects.filter(pk=dataset.pk).update(prepared_name="", preview=[])
    dataset.refresh_from_db()

    assert services.dataset_split(dataset) == expected
    assert services.dataset_preview(dataset)[0]["prompt"] == "Say 0"
    assert not dataset.has_statistics


@pytest.mark.parametrize(
    ("client_name", "shown"),
    [
        ("../../x.jsonl", "x.jsonl"),
        ("/etc/passwd.jsonl", "passwd.jsonl"),
        ("C:\\Users\\me\\data.jsonl", "data.jsonl"),
        ("bad\x00na\x1bme\u202e.jsonl", "badname.jsonl"),
        ("tab\there\r\n.csv", "tabhere.csv"),
    ],
)
def test_client_name_only_displayed(task, client_name: str, shown: str) -> None:
    content = pair_content(12) if shown.endswith(".jsonl") else b"prompt,completion\n" + b"a,b\n" * 12

    dataset = upload_bytes(task, content, client_name).dataset

    assert dataset.original_name == shown
    assert "/" not in dataset.stored_name
    assert dataset.stored_name.startswith(f"{task.pk}-")


def test_long_client_name_keeps_extensions(task) -> None:
    import gzip

    name = "n" * 400 + ".jsonl.gz"

    dataset = upload_bytes(task, gzip.compress(pair_content(12)), name).dataset

    assert len(dataset.original_name) == 255
    assert dataset.original_name.endswith("….jsonl.gz")
    assert dataset.stored_name.endswith(".jsonl.gz")
    assert dataset.compression == "gzip"


def test_upload_over_limit_is_413(task, settings) -> None:
    settings.LORAWEB_MAX_UPLOAD_BYTES = 100

    with pytest.raises(ServiceError) as raised:
        upload_bytes(task, pair_content(20))

    assert raised.value.status_code == 413
    assert "100" in raised.value.message
    assert stored_files(settings) == []


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"max_length": 4}, "8 to 1024"),
        ({"max_length": 2048}, "2048"),
        ({"on_too_long": "shorten"}, "shorten"),
        ({"prompt_column": "question"}, "completion column"),
        ({"prompt_column": "Text", "completion_column": " text "}, "must differ"),
    ],
)
def test_invalid_upload_options(options: dict, fragment: str) -> None:
    with pytest.raises(ServiceError) as raised:
        services.upload_options(**options)

    assert raised.value.code == "invalid_option"
    assert fragment in raised.value.message


def test_delete_unused_dataset_removes_files(task, settings, django_capture_on_commit_callbacks) -> None:
    dataset = upload_bytes(task, pair_content(20)).dataset

    with django_capture_on_commit_callbacks(execute=True):
        services.dataset_delete(dataset, user=SYSTEM)

    assert Dataset.objects.count() == 0
    assert stored_files(settings) == []


def test_delete_used_dataset_refused(task, settings, monkeypatch) -> None:
    dataset = upload_bytes(task, pair_content(20)).dataset
    monkeypatch.setattr(services, "_enqueue", lambda job_id: None)
    job = services.training_start(task, dataset_ids=[dataset.pk], user=SYSTEM)

    with pytest.raises(ServiceError) as raised:
        services.dataset_delete(dataset, user=SYSTEM)

    assert raised.value.status_code == 409
    assert raised.value.code == "dataset_in_use"
    assert job.version.label in raised.value.message
    assert Dataset.objects.filter(pk=dataset.pk).exists()
    assert len(stored_files(settings)) == 2
    assert [version.pk for version in services.dataset_versions(dataset)] == [job.version.pk]
