"""Parse and validate uploaded training datasets: JSONL, CSV, TSV and plain text, each
optionally gzip-compressed.

This module imports nothing from Django, so the upload view, the training worker, the
benchmark and the tests all call it directly. ingest_reader.py turns the file into decoded
lines, the parsers here turn lines into examples, and ingest_stats.py counts tokens,
duplicates and split sizes. Every problem carries a stable code (see ingest_problems.py), so
the web layer can translate its message by code.

Two entry points read a file once, line by line:

- `ingest_dataset` streams the accepted examples to a prepared JSONL file and keeps only
  about 19 bytes per example in memory. Uploads use it.
- `parse_dataset` returns the examples as a list, for small files and tests.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

import numpy as np

from .ingest_formats import (
    CHAT_COMPLETION_ROLE,
    CHAT_ROLE_LABELS,
    FORMAT_CSV,
    FORMAT_JSONL,
    FORMAT_TEXT,
    FORMAT_TSV,
    GZIP_SUFFIX,
    MAX_EXAMPLE_TOKENS,
    MAX_TEXT_EXAMPLE_CHARS,
    ON_TOO_LONG_REJECT,
    ON_TOO_LONG_TRUNCATE,
    PARSERS,
    SHAPE_CHAT,
    SHAPE_PAIRS,
    SHAPE_TEXT,
    Example,
    IngestOptions,
    Layout,
    dataset_format,
    render_chat,
)
from .ingest_problems import MESSAGE_TEMPLATES, DatasetInvalid, Problem, ProblemList
from .ingest_reader import EncodingSwitch, LineReader
from .ingest_stats import ExampleIndex, LengthChecker, TokenStats, split_rank, token_stats

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Names that services, tests and the benchmark import from here, wherever they are defined.
__all__ = [
    "CHAT_COMPLETION_ROLE",
    "CHAT_ROLE_LABELS",
    "FORMAT_CSV",
    "FORMAT_JSONL",
    "FORMAT_TEXT",
    "FORMAT_TSV",
    "GZIP_SUFFIX",
    "MAX_EXAMPLE_TOKENS",
    "MAX_TEXT_EXAMPLE_CHARS",
    "MESSAGE_TEMPLATES",
    "ON_TOO_LONG_REJECT",
    "ON_TOO_LONG_TRUNCATE",
    "SHAPE_CHAT",
    "SHAPE_PAIRS",
    "SHAPE_TEXT",
    "DatasetInvalid",
    "Example",
    "IngestOptions",
    "IngestReport",
    "ParsedDataset",
    "PreviewRow",
    "Problem",
    "check_file_name",
    "dataset_format",
    "ingest_dataset",
    "parse_dataset",
    "read_prepared_examples",
    "render_chat",
    "split_examples",
]

logger = logging.getLogger(__name__)

_GZIP_MAGIC = b"\x1f\x8b"
DEFAULT_MIN_EXAMPLES = 10
DEFAULT_MAX_PROBLEMS = 50
VALIDATION_FRACTION = 0.1

# Examples per tokenizer call. Larger batches gain little speed and cost memory.
TOKEN_BATCH_SIZE = 256


@dataclass
class ParsedDataset:
    """A validated dataset held in memory, with the fingerprint of the uploaded bytes."""

    format: str  # "jsonl", "csv", "tsv" or "text"
    # "utf-8", "utf-8-sig" with a UTF-8 byte order mark, "utf-16" and "utf-32" with theirs,
    # else the Python name of the detected encoding that the file was converted from.
    encoding: str
    examples: list[Example]
    sha256: str  # hex digest of the file as uploaded, compression and BOM included
    size_bytes: int
    duplicates: int  # examples that exactly repeat an earlier one
    shape: str = SHAPE_PAIRS
    compression: str = ""  # "gzip" or ""
    delimiter: str = ""  # CSV and TSV only
    encoding_detected: bool = False
    num_truncated: int = 0


@dataclass(frozen=True)
class PreviewRow:
    """One stored example as training reads it, with its length in tokens."""

    prompt: str
    completion: str
    tokens: int
    truncated: bool


@dataclass(frozen=True)
class IngestReport:
    """Result of `ingest_dataset`: the file's format and the stored examples' counts and statistics."""

    format: str
    shape: str
    compression: str
    delimiter: str
    encoding: str
    encoding_detected: bool
    sha256: str
    size_bytes: int
    num_examples: int  # stored, after dropping duplicates when that was chosen
    num_duplicates: int  # exact repeats found, whether dropped or not
    duplicates_dropped: bool
    num_truncated: int  # stored examples whose completion was cut
    num_train: int
    num_validation: int
    tokens: TokenStats
    preview: list[PreviewRow] = field(default_factory=list)


def check_file_name(name: str) -> None:
    """Raise DatasetInvalid (unsupported_extension) unless the file name has a known format."""
    if dataset_format(name) is None:
        problems = ProblemList(1)
        problems.add("unsupported_extension", None, name=PurePath(name).name)
        raise problems.error()


# --- One read of a file -----------------------------------------------------------------------


class _Pass:
    """One read of a file: lines, then examples, then the length check, in file order.

    Examples wait in a batch for the tokenizer. Before any problem is recorded the batch is
    checked first, so problems of earlier lines come first and the list stays in file order.
    """

    def __init__(
        self,
        path: Path,
        original_name: str,
        options: IngestOptions,
        problems: ProblemList,
        tokenizer: PreTrainedTokenizerBase | None,
        encoding: str | None,
    ) -> None:
        detected = dataset_format(original_name)
        if detected is None:
            problems.add("unsupported_extension", None, name=PurePath(original_name).name)
            raise problems.error()
        self.format, compressed = detected
        # A gzip stream is recognized by its first bytes too, whatever its file name.
        if not compressed:
            with path.open("rb") as handle:
                compressed = handle.read(len(_GZIP_MAGIC)) == _GZIP_MAGIC

        if options.maps_columns and self.format == FORMAT_TEXT:
            problems.add("columns_not_applicable", None, name=PurePath(original_name).name)
            raise problems.error()

        self.options = options
        self.problems = problems
        self.layout = Layout()
        self.reader = LineReader(
            path,
            problems,
            compressed=compressed,
            encoding=encoding,
            max_decompressed_bytes=options.max_decompressed_bytes,
        )
        self.checker = (
            None
            if tokenizer is None
            else LengthChecker(
                tokenizer, options.max_length, truncate=options.on_too_long == ON_TOO_LONG_TRUNCATE
            )
        )
        self.records = 0
        self.num_truncated = 0
        self._batch: list[tuple[int, Example]] = []
        self._flushing = False
        self._accept: Callable[[Example, int], None] = lambda example, tokens: None

    @property
    def compression(self) -> str:
        return "gzip" if self.reader.compressed else ""

    def run(self, accept: Callable[[Example, int], None]) -> None:
        """Read the whole file, calling `accept(example, tokens)` per accepted example in order."""
        self._accept = accept
        self.problems.before_add = self._flush
        lines = iter(self.reader)
        try:
            for number, example in PARSERS[self.format](lines, self.problems, self.options, self.layout):
                self.records += 1
                if example is None:
                    continue
                self._batch.append((number, example))
                if len(self._batch) >= TOKEN_BATCH_SIZE:
                    self._flush()
            self._flush()
        finally:
            # Closes the file at once when a parser stops early, such as on an unknown CSV header.
            lines.close()
            self.problems.before_add = None

        if not self.reader.has_content:
            self.problems.add("empty_file", None)

    def _flush(self) -> None:
        if self._flushing or not self._batch:
            return
        self._flushing = True
        try:
            batch, self._batch = self._batch, []
            self._check_batch(batch)
        finally:
            self._flushing = False

    def _check_batch(self, batch: list[tuple[int, Example]]) -> None:
        if self.checker is None:
            for _, example in batch:
                self._accept(example, 0)
            return

        verdicts = self.checker.check([example for _, example in batch])
        for (number, example), verdict in zip(batch, verdicts):
            if verdict.problem is not None:
                self.problems.add(
                    verdict.problem, number, tokens=verdict.problem_tokens, maximum=self.options.max_length
                )
                continue
            if verdict.truncated:
                self.num_truncated += 1
                example = Example(example.prompt, verdict.completion or "", truncated=True)
            self._accept(example, verdict.tokens)


def _run_pass(
    path: Path,
    original_name: str,
    options: IngestOptions,
    max_problems: int,
    tokenizer: PreTrainedTokenizerBase | None,
    consume: Callable[[_Pass, ProblemList], Any],
) -> Any:
    """Run `consume(pass, problems)`, reading the file again once if its encoding was not UTF-8."""
    if max_problems < 1:
        raise ValueError(f"max_problems must be 1 or more, got {max_problems}")

    encoding: str | None = None
    while True:
        problems = ProblemList(max_problems)
        try:
            return consume(_Pass(path, original_name, options, problems, tokenizer, encoding), problems)
        except EncodingSwitch as switch:
            # Raised only while the encoding is undecided, so this loop runs at most twice.
            encoding = switch.encoding


def _log_rejection(original_name: str, error: DatasetInvalid) -> None:
    first = error.problems[0]
    logger.info(
        "Rejected dataset %r: %d problems, first %s at line %s",
        original_name, error.total_problems, first.code, first.line,
    )


# --- Entry points -----------------------------------------------------------------------------


def parse_dataset(
    path: Path,
    original_name: str,
    *,
    max_problems: int = DEFAULT_MAX_PROBLEMS,
    min_examples: int = DEFAULT_MIN_EXAMPLES,
    options: IngestOptions | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> ParsedDataset:
    """Parse a dataset file into memory and validate every example.

    The format comes from the extension of `original_name` (.jsonl, .csv, .tsv or .txt, in
    any case, optionally followed by .gz). The file is read once, line by line, and its
    sha256 is computed in the same pass. Lengths in tokens are checked only when a tokenizer
    is given. Raises DatasetInvalid with up to `max_problems` problems in file order. The
    file counts as too small when it has fewer than `min_examples` records, whether or not
    they are valid.
    """
    options = options or IngestOptions()

    def consume(current: _Pass, problems: ProblemList) -> ParsedDataset:
        examples: list[Example] = []
        index = ExampleIndex(seed=0)

        def accept(example: Example, tokens: int) -> None:
            examples.append(example)
            index.add(example.prompt, example.completion, tokens)

        current.run(accept)
        _check_record_count(current, problems, min_examples)

        first = index.first_occurrences()
        duplicates = int(len(index) - first.sum())
        if options.drop_duplicates and duplicates:
            examples = [example for example, keep in zip(examples, first) if keep]
            _check_kept_count(len(examples), problems, min_examples)

        return ParsedDataset(
            format=current.format,
            encoding=current.reader.encoding,
            examples=examples,
            sha256=current.reader.sha256,
            size_bytes=current.reader.size_bytes,
            duplicates=duplicates,
            shape=current.layout.shape,
            compression=current.compression,
            delimiter=current.layout.delimiter,
            encoding_detected=current.reader.encoding_detected,
            num_truncated=sum(example.truncated for example in examples),
        )

    try:
        parsed = _run_pass(path, original_name, options, max_problems, tokenizer, consume)
    except DatasetInvalid as error:
        _log_rejection(original_name, error)
        raise

    logger.info(
        "Parsed dataset %r: format %s, %d examples, %d duplicates, %d bytes",
        original_name, parsed.format, len(parsed.examples), parsed.duplicates, parsed.size_bytes,
    )
    return parsed


def ingest_dataset(
    path: Path,
    original_name: str,
    output: Path,
    *,
    tokenizer: PreTrainedTokenizerBase,
    options: IngestOptions | None = None,
    split_seed: int = 0,
    validation_fraction: float = VALIDATION_FRACTION,
    max_problems: int = DEFAULT_MAX_PROBLEMS,
    min_examples: int = DEFAULT_MIN_EXAMPLES,
    preview_rows: int = 10,
) -> IngestReport:
    """Validate a dataset file and write its examples, as training will read them, to `output`.

    Checks the same as `parse_dataset` plus the length of every example in GPT-2 tokens.
    `output` receives one JSON object per example (see `read_prepared_examples`), after
    truncation and after dropping duplicates when the options ask for it. Memory use grows
    with the number of examples (about 19 bytes each), not with their text. Raises
    DatasetInvalid, after which `output` contains an incomplete file that the caller deletes.
    """
    options = options or IngestOptions()

    def consume(current: _Pass, problems: ProblemList) -> IngestReport:
        index = ExampleIndex(seed=split_seed)
        truncated = bytearray()
        with output.open("w", encoding="utf-8", newline="\n") as handle:

            def accept(example: Example, tokens: int) -> None:
                # Once a problem is found the file is rejected, so writing stops.
                if problems.total:
                    return
                index.add(example.prompt, example.completion, tokens)
                truncated.append(example.truncated)
                handle.write(_prepared_line(example))

            current.run(accept)
        _check_record_count(current, problems, min_examples)

        first = index.first_occurrences()
        duplicates = int(len(index) - first.sum())
        keep = first if options.drop_duplicates else np.ones(len(index), dtype=bool)
        if options.drop_duplicates and duplicates:
            _rewrite_kept_lines(output, keep)
        kept = int(keep.sum())
        _check_kept_count(kept, problems, min_examples)

        num_train, num_validation = index.split_sizes(keep, validation_fraction)
        lengths = index.lengths(keep)
        return IngestReport(
            format=current.format,
            shape=current.layout.shape,
            compression=current.compression,
            delimiter=current.layout.delimiter,
            encoding=current.reader.encoding,
            encoding_detected=current.reader.encoding_detected,
            sha256=current.reader.sha256,
            size_bytes=current.reader.size_bytes,
            num_examples=kept,
            num_duplicates=duplicates,
            duplicates_dropped=options.drop_duplicates,
            num_truncated=int(np.frombuffer(truncated, dtype=np.uint8)[keep].sum()) if kept else 0,
            num_train=num_train,
            num_validation=num_validation,
            tokens=token_stats(lengths),
            preview=_read_preview(output, lengths, preview_rows),
        )

    try:
        report = _run_pass(path, original_name, options, max_problems, tokenizer, consume)
    except DatasetInvalid as error:
        _log_rejection(original_name, error)
        raise

    logger.info(
        "Ingested dataset %r: format %s, encoding %s, %d examples, %d duplicates, %d truncated, %d bytes",
        original_name, report.format, report.encoding, report.num_examples,
        report.num_duplicates, report.num_truncated, report.size_bytes,
    )
    return report


def _check_record_count(current: _Pass, problems: ProblemList, min_examples: int) -> None:
    if current.reader.has_content and current.records < min_examples:
        problems.add("too_few_examples", None, count=current.records, minimum=min_examples)
    if problems.total:
        raise problems.error()


def _check_kept_count(kept: int, problems: ProblemList, min_examples: int) -> None:
    if kept < min_examples:
        problems.add("too_few_examples", None, count=kept, minimum=min_examples)
        raise problems.error()


# --- Prepared files: the examples as training reads them ------------------------------------


def _prepared_line(example: Example) -> str:
    record: dict[str, Any] = {"prompt": example.prompt, "completion": example.completion}
    if example.truncated:
        record["truncated"] = True
    return json.dumps(record, ensure_ascii=False) + "\n"


def _rewrite_kept_lines(path: Path, keep: np.ndarray) -> None:
    """Keep only the lines of `path` whose position is True in `keep`, streaming."""
    temporary = path.with_name(path.name + ".kept")
    try:
        with path.open(encoding="utf-8", newline="\n") as source, temporary.open(
            "w", encoding="utf-8", newline="\n"
        ) as target:
            for position, line in enumerate(source):
                if keep[position]:
                    target.write(line)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _read_preview(path: Path, lengths: np.ndarray, rows: int) -> list[PreviewRow]:
    preview: list[PreviewRow] = []
    with path.open(encoding="utf-8", newline="\n") as handle:
        for position, line in enumerate(itertools.islice(handle, rows)):
            record = json.loads(line)
            preview.append(
                PreviewRow(
                    prompt=record["prompt"],
                    completion=record["completion"],
                    tokens=int(lengths[position]),
                    truncated=record.get("truncated", False),
                )
            )
    return preview


def read_prepared_examples(path: Path) -> list[Example]:
    """Read the examples that `ingest_dataset` wrote, in file order."""
    examples: list[Example] = []
    with path.open(encoding="utf-8", newline="\n") as handle:
        for line in handle:
            record = json.loads(line)
            examples.append(
                Example(record["prompt"], record["completion"], truncated=record.get("truncated", False))
            )
    return examples


# --- Train/validation split -------------------------------------------------------------------


def split_examples(
    examples: Sequence[Example], *, seed: int = 0, validation_fraction: float = VALIDATION_FRACTION
) -> tuple[list[Example], list[Example]]:
    """Split examples into (train, validation), each in the original order.

    Distinct examples are ranked by a hash of (seed, prompt, completion), and validation takes
    them from the top of that ranking until it contains `round(len * validation_fraction)`
    examples, at least 1. So the split depends on the examples and the seed, not on file
    order, and copies of one example land on the same side. With 2 or more examples both sides
    are non-empty. `ExampleIndex.split_sizes` computes the same sizes without the texts.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be between 0 and 1, got {validation_fraction}")
    if len(examples) < 2:
        return list(examples), []

    copies = Counter(examples)
    if len(copies) == 1:
        # NOTE: with a single distinct example, the rule that copies stay on one side yields to
        # the non-empty validation set, so the last copy is also used for validation.
        return list(examples[:-1]), [examples[-1]]

    ranked = sorted(copies, key=lambda example: split_rank(seed, example.prompt, example.completion))
    target = max(1, round(len(examples) * validation_fraction))

    # The last ranked example never goes to validation, so train is never empty.
    chosen: set[Example] = set()
    size = 0
    for example in ranked[:-1]:
        if size >= target:
            break
        chosen.add(example)
        size += copies[example]

    train = [example for example in examples if example not in chosen]
    validation = [example for example in examples if example in chosen]
    return train, validation
