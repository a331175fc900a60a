"""Dataset uploads, reading and deletion: every state change of a Dataset.

services.py re-exports these functions, so views, the API and the demo call them through it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import unicodedata
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path, PurePath
from typing import IO, TYPE_CHECKING

from django.conf import settings
from django.db import transaction
from django.utils.translation import gettext as _

from adapters_app.models import AdapterVersion, Task
from adapters_app.roles import Actor, Role, actor_user, require_role
from adapters_app.services import ServiceError

from .ingest import (
    FORMAT_CSV,
    FORMAT_JSONL,
    FORMAT_TEXT,
    FORMAT_TSV,
    GZIP_SUFFIX,
    MAX_EXAMPLE_TOKENS,
    ON_TOO_LONG_REJECT,
    ON_TOO_LONG_TRUNCATE,
    SHAPE_CHAT,
    SHAPE_PAIRS,
    SHAPE_TEXT,
    DatasetInvalid,
    Example,
    IngestOptions,
    IngestReport,
    Problem,
    check_file_name,
    ingest_dataset,
    parse_dataset,
    read_prepared_examples,
    split_examples,
)
from .ingest_reader import UTF16, UTF32
from .messages import problem_message
from .models import Dataset

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SPLIT_SEED = 0
PREVIEW_ROWS = 10
# Smallest maximum length a user may choose, the same as training's smallest max_length.
MIN_MAX_LENGTH = 8
# Maximum length of the displayed file name, as Dataset.original_name allows.
MAX_DISPLAY_NAME = 255
COPY_CHUNK_BYTES = 1 << 20


class DatasetRejected(ServiceError):
    """An upload failed validation; nothing was stored."""

    def __init__(self, problems: list[Problem], total: int):
        self.problems = problems
        self.total = total
        super().__init__(
            _("The dataset has %(count)s problem(s); fix them and upload again.") % {"count": total},
            code="invalid_dataset",
        )

    def as_list(self) -> list[dict]:
        return [
            {
                "line": problem.line,
                "column": problem.column,
                "field": problem.field,
                "code": problem.code,
                "message": problem_message(problem),
            }
            for problem in self.problems
        ]


@dataclass(frozen=True)
class UploadOutcome:
    dataset: Dataset
    created: bool


def dataset_directory() -> Path:
    return Path(settings.MEDIA_ROOT) / "datasets"


def dataset_path(dataset: Dataset) -> Path:
    """Path of the file as uploaded."""
    return dataset_directory() / dataset.stored_name


def prepared_path(dataset: Dataset) -> Path | None:
    """Path of the examples as training reads them, or None for datasets stored without it."""
    return dataset_directory() / dataset.prepared_name if dataset.prepared_name else None


def upload_too_large_error() -> ServiceError:
    limit = settings.LORAWEB_MAX_UPLOAD_BYTES
    return ServiceError(
        _(
            "The file is larger than the upload limit of %(limit)s bytes; split it into smaller "
            "files, compress it with gzip, or ask the operator to raise LORAWEB_MAX_UPLOAD_BYTES."
        )
        % {"limit": limit},
        code="file_too_large",
        status_code=413,
    )


def upload_options(
    *,
    max_length: int = MAX_EXAMPLE_TOKENS,
    on_too_long: str = ON_TOO_LONG_REJECT,
    drop_duplicates: bool = False,
    prompt_column: str = "",
    completion_column: str = "",
) -> IngestOptions:
    """Check the user's upload choices and return them as IngestOptions, or raise ServiceError."""
    if not MIN_MAX_LENGTH <= max_length <= MAX_EXAMPLE_TOKENS:
        raise ServiceError(
            _("The maximum length must be %(minimum)s to %(maximum)s GPT-2 tokens, not %(value)s.")
            % {"minimum": MIN_MAX_LENGTH, "maximum": MAX_EXAMPLE_TOKENS, "value": max_length},
            code="invalid_option",
        )
    if on_too_long not in (ON_TOO_LONG_REJECT, ON_TOO_LONG_TRUNCATE):
        raise ServiceError(
            _("on_too_long must be “reject” or “truncate”, not “%(value)s”.") % {"value": on_too_long},
            code="invalid_option",
        )

    prompt_column = prompt_column.strip()
    completion_column = completion_column.strip()
    if prompt_column and not completion_column:
        raise ServiceError(
            _("Name the completion column too; with a prompt column alone there is nothing to learn."),
            code="invalid_option",
        )
    if prompt_column and prompt_column.lower() == completion_column.lower():
        raise ServiceError(
            _("The prompt and completion columns must differ; both are “%(name)s”.") % {"name": prompt_column},
            code="invalid_option",
        )

    return IngestOptions(
        max_length=max_length,
        on_too_long=on_too_long,
        drop_duplicates=drop_duplicates,
        prompt_column=prompt_column,
        completion_column=completion_column,
    )


def display_name(original_name: str) -> str:
    """Return the client's file name made safe to display and to read the format from.

    Folders, control and formatting characters (such as right-to-left overrides) are
    removed, and a name over MAX_DISPLAY_NAME characters is shortened in the middle so it
    keeps its extensions. The name is never used as a path.
    """
    name = original_name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(char for char in name if unicodedata.category(char)[0] != "C").strip()
    if not name:
        return "dataset"
    if len(name) <= MAX_DISPLAY_NAME:
        return name

    suffix = _format_suffix(name)
    return name[: MAX_DISPLAY_NAME - len(suffix) - 1] + "…" + suffix


def _format_suffix(name: str) -> str:
    """Return ".jsonl", ".csv.gz" and the like, or "" when the last suffixes are not short."""
    suffixes = PurePath(name).suffixes
    count = 2 if name.lower().endswith(GZIP_SUFFIX) else 1
    suffix = "".join(suffixes[-count:])
    return suffix if len(suffix) <= 16 else ""


class _TokenizerPool:
    """GPT-2 tokenizers for concurrent uploads, each used by one thread at a time.

    transformers sets padding and truncation on the Rust tokenizer at every call, so one
    tokenizer shared by threads can fail with "Already borrowed". A tokenizer takes about
    two seconds to build, so idle ones are kept for the next upload.
    """

    def __init__(self) -> None:
        self._idle: list[PreTrainedTokenizerBase] = []
        self._lock = threading.Lock()

    @contextmanager
    def borrow(self) -> Iterator[PreTrainedTokenizerBase]:
        with self._lock:
            tokenizer = self._idle.pop() if self._idle else None
        if tokenizer is None:
            from adapters_app.serving.base import build_gpt2_tokenizer

            tokenizer = build_gpt2_tokenizer()

        try:
            yield tokenizer
        finally:
            with self._lock:
                self._idle.append(tokenizer)


_tokenizers = _TokenizerPool()


def _copy_upload(source: IO[bytes] | Iterable[bytes], destination: Path) -> str:
    """Stream an upload to disk and return its sha256, stopping as soon as it exceeds the size limit."""
    limit = settings.LORAWEB_MAX_UPLOAD_BYTES
    digest = hashlib.sha256()
    written = 0
    chunks = (
        source.chunks(COPY_CHUNK_BYTES)
        if hasattr(source, "chunks")
        else iter(lambda: source.read(COPY_CHUNK_BYTES), b"")
    )
    with destination.open("wb") as out:
        for chunk in chunks:
            written += len(chunk)
            if written > limit:
                raise upload_too_large_error()
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def _temporary_path(directory: Path, prefix: str) -> Path:
    handle, name = tempfile.mkstemp(dir=directory, prefix=prefix)
    os.close(handle)
    return Path(name)


def dataset_upload(
    task: Task,
    upload: IO[bytes] | Iterable[bytes],
    *,
    original_name: str,
    options: IngestOptions | None = None,
    user: Actor,
) -> UploadOutcome:
    """Validate an uploaded file completely, then store it and its prepared examples.

    Needs the trainer role. Nothing is stored when validation fails (DatasetRejected) or the file exceeds
    LORAWEB_MAX_UPLOAD_BYTES (ServiceError, status 413). A file with the same sha256 as a
    dataset of the task returns that dataset, whatever the options, and stores no copy.
    """
    require_role(user, Role.TRAINER)
    name = display_name(original_name)
    try:
        check_file_name(name)
    except DatasetInvalid as invalid:
        raise DatasetRejected(invalid.problems, invalid.total_problems) from None

    options = options or IngestOptions()
    if options.max_decompressed_bytes is None:
        options = replace(options, max_decompressed_bytes=settings.LORAWEB_MAX_DECOMPRESSED_BYTES)

    directory = dataset_directory()
    directory.mkdir(parents=True, exist_ok=True)
    upload_path = _temporary_path(directory, ".upload-")
    examples_path = _temporary_path(directory, ".prepared-")
    try:
        sha256 = _copy_upload(upload, upload_path)

        # Checked before validation, which takes far longer than copying.
        existing = task.datasets.filter(sha256=sha256).order_by("pk").first()
        if existing is not None:
            logger.info("Upload %r for task %s repeats dataset %s", name, task.slug, existing.pk)
            return UploadOutcome(dataset=existing, created=False)

        try:
            with _tokenizers.borrow() as tokenizer:
                report = ingest_dataset(
                    upload_path,
                    name,
                    examples_path,
                    tokenizer=tokenizer,
                    options=options,
                    split_seed=SPLIT_SEED,
                    preview_rows=PREVIEW_ROWS,
                )
        except DatasetInvalid as invalid:
            logger.info("Rejected upload %r for task %s: %d problems", name, task.slug, invalid.total_problems)
            raise DatasetRejected(invalid.problems, invalid.total_problems) from None

        dataset = _store(task, name, upload_path, examples_path, report, options, user)
    finally:
        upload_path.unlink(missing_ok=True)
        examples_path.unlink(missing_ok=True)

    logger.info("Stored dataset %s for task %s: %d examples", dataset.pk, task.slug, dataset.num_examples)
    return UploadOutcome(dataset=dataset, created=True)


def _store(
    task: Task,
    name: str,
    upload_path: Path,
    examples_path: Path,
    report: IngestReport,
    options: IngestOptions,
    user: Actor,
) -> Dataset:
    """Move both files into place under generated names and create the row."""
    base = f"{task.pk}-{uuid.uuid4().hex}"
    stored_name = base + _format_suffix(name).lower()
    prepared_name = base + ".examples.jsonl"
    directory = dataset_directory()
    final_paths = [directory / stored_name, directory / prepared_name]
    os.replace(upload_path, final_paths[0])
    os.replace(examples_path, final_paths[1])

    try:
        return Dataset.objects.create(
            task=task,
            original_name=name,
            stored_name=stored_name,
            prepared_name=prepared_name,
            format=report.format,
            shape=report.shape,
            compression=report.compression,
            delimiter=report.delimiter,
            encoding=report.encoding,
            encoding_detected=report.encoding_detected,
            sha256=report.sha256,
            size_bytes=report.size_bytes,
            num_examples=report.num_examples,
            num_train=report.num_train,
            num_validation=report.num_validation,
            num_duplicates=report.num_duplicates,
            num_truncated=report.num_truncated,
            split_seed=SPLIT_SEED,
            max_length=options.max_length,
            on_too_long=options.on_too_long,
            drop_duplicates=options.drop_duplicates,
            prompt_column=options.prompt_column,
            completion_column=options.completion_column,
            token_total=report.tokens.total,
            token_mean=report.tokens.mean,
            token_p95=report.tokens.p95,
            token_max=report.tokens.max,
            length_histogram={"bin_width": report.tokens.bin_width, "counts": report.tokens.histogram},
            preview=[
                {"prompt": row.prompt, "completion": row.completion, "tokens": row.tokens, "truncated": row.truncated}
                for row in report.preview
            ],
            created_by=actor_user(user),
        )
    except Exception:
        for path in final_paths:
            path.unlink(missing_ok=True)
        raise


def dataset_examples(dataset: Dataset) -> list[Example]:
    """Return the stored examples of a dataset in file order, as training reads them."""
    path = prepared_path(dataset)
    if path is not None:
        return read_prepared_examples(path)
    return parse_dataset(dataset_path(dataset), dataset.original_name).examples


def dataset_split(dataset: Dataset) -> tuple[list[Example], list[Example]]:
    """Return the train and validation examples of a stored dataset (deterministic)."""
    return split_examples(dataset_examples(dataset), seed=dataset.split_seed)


def dataset_preview(dataset: Dataset) -> list[dict]:
    """Return the first examples as upload stored them: prompt, completion, tokens, truncated.

    Datasets stored before previews existed are read again, without token counts.
    """
    if dataset.preview:
        return dataset.preview
    examples = dataset_examples(dataset)[:PREVIEW_ROWS]
    return [
        {"prompt": example.prompt, "completion": example.completion, "tokens": None, "truncated": False}
        for example in examples
    ]


def format_description(dataset: Dataset) -> str:
    """Return the detected format in words, such as "CSV, delimiter “;”, gzip-compressed"."""
    formats = {FORMAT_JSONL: "JSONL", FORMAT_CSV: "CSV", FORMAT_TSV: "TSV", FORMAT_TEXT: _("plain text")}
    shapes = {
        SHAPE_PAIRS: _("prompt/completion pairs"),
        SHAPE_TEXT: _("text only"),
        SHAPE_CHAT: _("chat conversations"),
    }
    parts = [formats.get(dataset.format, dataset.format)]
    if dataset.shape in shapes:
        parts.append(shapes[dataset.shape])
    if dataset.delimiter == "\t":
        parts.append(_("delimiter tab"))
    elif dataset.delimiter:
        parts.append(_("delimiter “%(delimiter)s”") % {"delimiter": dataset.delimiter})
    if dataset.compression:
        parts.append(_("gzip-compressed"))
    return ", ".join(str(part) for part in parts)


def encoding_note(dataset: Dataset) -> str:
    """Return the note shown with a dataset whose file was converted to UTF-8, else ""."""
    if dataset.encoding_detected:
        return _(
            "Converted to UTF-8 from %(encoding)s, which was detected automatically; "
            "check the preview for wrong characters."
        ) % {"encoding": dataset.encoding}
    if dataset.encoding in (UTF16, UTF32):
        return _("Converted to UTF-8 from %(encoding)s, as its byte order mark declares.") % {
            "encoding": dataset.encoding.upper()
        }
    return ""


def dataset_versions(dataset: Dataset) -> list[AdapterVersion]:
    """Return the versions whose training used the dataset, oldest first, whatever their status."""
    versions = AdapterVersion.objects.filter(training_job__datasets=dataset).distinct()
    return list(versions.order_by("number"))


def dataset_delete(dataset: Dataset, *, user: Actor, reason: str = "") -> None:
    """Delete an unused dataset and its files, or raise ServiceError (409) when a version used it.

    Needs the maintainer role. A version uses a dataset when its job trained on it or its
    training record scored it. The deletion is kept as an AuditEvent.

    The files are removed after the transaction commits, so a failed delete keeps them.
    """
    from adapters_app.audit import audit_record

    require_role(user, Role.MAINTAINER)
    with transaction.atomic():
        locked = Dataset.objects.select_for_update().select_related("task").get(pk=dataset.pk)
        versions = sorted(
            {*dataset_versions(locked), *_versions_recording(locked)}, key=lambda version: version.number
        )
        if versions:
            raise ServiceError(
                _("“%(name)s” trained %(versions)s, so it cannot be deleted; the versions need it to stay reproducible.")
                % {"name": locked.original_name, "versions": ", ".join(version.label for version in versions)},
                code="dataset_in_use",
                status_code=409,
            )

        paths = [dataset_path(locked)]
        examples = prepared_path(locked)
        if examples is not None:
            paths.append(examples)
        audit_record(
            "dataset.delete",
            f"{locked.task.slug}/{locked.original_name} (#{locked.pk})",
            user=user,
            reason=reason.strip(),
            details={
                "task": locked.task.slug,
                "dataset": locked.pk,
                "file_name": locked.original_name,
                "sha256": locked.sha256,
                "examples": locked.num_examples,
            },
        )
        locked.delete()
        transaction.on_commit(lambda: _remove_files(paths))

    logger.info(
        "Deleted dataset %s (%r) of task %s by user %s",
        dataset.pk, dataset.original_name, locked.task.slug, getattr(user, "pk", None),
    )


def _versions_recording(dataset: Dataset) -> list[AdapterVersion]:
    """Return the task's versions whose training record lists the dataset (trained on or scored)."""
    versions = AdapterVersion.objects.filter(task_id=dataset.task_id).only("pk", "number", "metrics", "task_id")
    return [
        version
        for version in versions
        if any(entry.get("id") == dataset.pk for entry in version.metrics.get("record", {}).get("datasets", []))
    ]


def _remove_files(paths: list[Path]) -> None:
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as error:
            logger.warning("Could not delete dataset file %s: %s", path, error)
