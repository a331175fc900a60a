"""Parse and validate uploaded training datasets (JSONL, CSV and plain text).

This module imports nothing from Django, so the upload view, the training worker and the
tests all call it directly. Every problem carries a stable code and the parameters of its
message, so the web layer can translate the message by code.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

logger = logging.getLogger(__name__)


def gettext_noop(message: str) -> str:
    # Only marks the string for the translation catalog, and messages.py translates it at run time.
    return message


# English message templates by problem code. The parameters of each template are exactly the
# keys of `Problem.params` for that code, and the web layer wraps these strings in gettext.
# `line` is a 1-based physical line number. The `error` parameter of `invalid_json` and
# `invalid_csv` is the English text of the Python parser's exception and is not translated.
MESSAGE_TEMPLATES: dict[str, str] = {
    # Whole file.
    "unsupported_extension": gettext_noop(
        'Cannot read "%(name)s": the file name must end in .jsonl, .csv or .txt.'
    ),
    "empty_file": gettext_noop(
        "The file contains no examples; upload a file with at least one non-blank line."
    ),
    "too_few_examples": gettext_noop(
        "The file has too few examples for training (%(count)s, at least %(minimum)s "
        "needed); add more examples."
    ),
    # Bytes and encoding, in every format.
    "utf16_encoding": gettext_noop(
        "Line %(line)s: the file is saved as UTF-16; save it as UTF-8 and upload it again."
    ),
    "invalid_encoding": gettext_noop(
        "Line %(line)s, column %(column)s: the byte %(byte)s is not valid UTF-8; "
        "save the file as UTF-8 and upload it again."
    ),
    "nul_byte": gettext_noop(
        "Line %(line)s contains a NUL byte, so the file looks binary; "
        "upload a text file saved as UTF-8."
    ),
    # JSONL.
    "invalid_json": gettext_noop(
        "Line %(line)s is not valid JSON (%(error)s at column %(column)s); "
        "write each example as one JSON object on a single line."
    ),
    "not_an_object": gettext_noop(
        "Line %(line)s contains a JSON %(type)s, not an object; each line needs an object "
        'such as {"prompt": "...", "completion": "..."}.'
    ),
    "unknown_keys": gettext_noop(
        "Line %(line)s: the object has the keys %(keys)s; "
        'each JSON line needs "prompt" and "completion", or "text".'
    ),
    "missing_key": gettext_noop(
        'Line %(line)s: the key "%(key)s" is missing; '
        'each JSON line needs "prompt" and "completion", or "text".'
    ),
    "conflicting_keys": gettext_noop(
        'Line %(line)s has both "text" and "prompt" or "completion"; '
        'use either "text" alone or "prompt" with "completion".'
    ),
    "mixed_formats": gettext_noop(
        "Line %(line)s uses %(shape)s but line %(first_line)s uses %(first_shape)s; "
        "use the same keys on every line of the file."
    ),
    "non_string_value": gettext_noop(
        'Line %(line)s: the value of "%(key)s" is a JSON %(type)s; '
        "write it as a string in double quotes."
    ),
    # JSONL and CSV.
    "empty_field": gettext_noop(
        'Line %(line)s: "%(field)s" is empty or only whitespace; '
        "fill it in or remove the example."
    ),
    # CSV.
    "unknown_header": gettext_noop(
        'Line %(line)s: the header "%(header)s" is not recognized; the first line must name '
        "the columns prompt,completion or source,target or text."
    ),
    "wrong_field_count": gettext_noop(
        "Line %(line)s: expected %(expected)s fields as in the header, found %(found)s; "
        'put double quotes around any field that contains a comma, for example "a, b".'
    ),
    "unclosed_quote": gettext_noop(
        "Line %(line)s: a quoted field is never closed; add the closing double quote, "
        'and write a double quote inside a quoted field as two ("").'
    ),
    "field_too_large": gettext_noop(
        "Line %(line)s: a field is longer than %(limit)s characters, often because a closing "
        "double quote is missing; check the quotes from this line on."
    ),
    "invalid_csv": gettext_noop(
        "Line %(line)s is not valid CSV (%(error)s); check the double quotes on this line."
    ),
}

_FORMATS_BY_EXTENSION = {".jsonl": "jsonl", ".csv": "csv", ".txt": "text"}

# Accepted CSV headers, as the set of stripped lower-case column names, with the role of each
# column. Columns may come in any order because the header names them.
_CSV_HEADERS: tuple[dict[str, str], ...] = (
    {"prompt": "prompt", "completion": "completion"},
    {"source": "prompt", "target": "completion"},
    {"text": "text"},
)

# Values of the `shape` parameters of `mixed_formats`.
_PAIR_SHAPE = '"prompt" and "completion"'
_TEXT_SHAPE = '"text"'


@dataclass(frozen=True)
class Example:
    """One training example. A text-only example has an empty prompt and its text as completion."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class Problem:
    """One reason why a dataset was rejected.

    `line` is the 1-based physical line (for CSV, the line where the record starts), or None
    for problems with the whole file. `message` is `MESSAGE_TEMPLATES[code] % params`.
    """

    code: str
    line: int | None
    message: str
    params: dict[str, Any]


class DatasetInvalid(Exception):
    """Error raised when a dataset fails validation.

    `problems` contains the first problems found, at most `max_problems` of them, in file
    order, and `total_problems` counts all of them.
    """

    def __init__(self, problems: list[Problem], total_problems: int) -> None:
        self.problems = problems
        self.total_problems = total_problems

        summary = "; ".join(problem.message for problem in problems[:3])
        hidden = total_problems - min(len(problems), 3)
        if hidden > 0:
            summary += f" (and {hidden} more problems)"
        super().__init__(summary)


@dataclass
class ParsedDataset:
    """A validated dataset with the fingerprint of the uploaded bytes."""

    format: str  # "jsonl", "csv" or "text"
    encoding: str  # "utf-8", or "utf-8-sig" when the file starts with a byte order mark
    examples: list[Example]
    sha256: str  # hex digest of the file as uploaded, BOM and line endings included
    size_bytes: int
    duplicates: int  # examples that exactly repeat an earlier one, still kept in `examples`


class _ProblemList:
    """Problems in file order. Keeps the first `max_problems` and counts all of them."""

    def __init__(self, max_problems: int) -> None:
        self.max_problems = max_problems
        self.kept: list[Problem] = []
        self.total = 0

    def add(self, code: str, line: int | None, **params: Any) -> None:
        self.total += 1
        if len(self.kept) >= self.max_problems:
            return

        if line is not None:
            params = {"line": line, **params}
        message = MESSAGE_TEMPLATES[code] % params
        self.kept.append(Problem(code=code, line=line, message=message, params=params))

    def error(self) -> DatasetInvalid:
        return DatasetInvalid(list(self.kept), self.total)


@dataclass(frozen=True)
class _Line:
    number: int
    text: str
    # False when the line had an encoding problem or a NUL byte. That problem is already
    # reported, and `text` contains U+FFFD in place of the bad bytes.
    clean: bool


class _LineReader:
    """Iterate over the decoded physical lines of a file, hashing the bytes in the same pass.

    CRLF, LF and a lone CR each end a line, and none of them is part of the yielded text.
    """

    def __init__(self, path: Path, problems: _ProblemList) -> None:
        self.path = path
        self.problems = problems
        self.digest = hashlib.sha256()
        self.size_bytes = 0
        self.encoding = "utf-8"
        self.has_content = False

    def __iter__(self) -> Generator[_Line, None, None]:
        number = 0
        with self.path.open("rb") as stream:
            # Iterating a binary file splits at LF only, so one LF-terminated line at a time
            # is in memory. NOTE: a file that ends its lines with CR alone is read whole.
            for raw in stream:
                self.digest.update(raw)
                self.size_bytes += len(raw)

                if number == 0:
                    raw = self._strip_byte_order_mark(raw)

                for piece in _split_line_endings(raw):
                    number += 1
                    line = self._decode(number, piece)
                    if line.text.strip():
                        self.has_content = True
                    yield line

    def _strip_byte_order_mark(self, raw: bytes) -> bytes:
        if raw.startswith(codecs.BOM_UTF8):
            self.encoding = "utf-8-sig"
            return raw[len(codecs.BOM_UTF8) :]

        # Every line of a UTF-16 file would fail to decode, so one problem covers the file.
        if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            self.problems.add("utf16_encoding", 1)
            raise self.problems.error()
        return raw

    def _decode(self, number: int, raw: bytes) -> _Line:
        # LF and CR never occur inside a multi-byte UTF-8 sequence, so decoding line by line
        # accepts exactly the files that decode as a whole.
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            column = len(raw[: error.start].decode("utf-8", errors="replace")) + 1
            self.problems.add(
                "invalid_encoding", number, column=column, byte=f"0x{raw[error.start]:02X}"
            )
            return _Line(number, raw.decode("utf-8", errors="replace"), clean=False)

        if "\x00" in text:
            self.problems.add("nul_byte", number)
            return _Line(number, text.replace("\x00", "\ufffd"), clean=False)
        return _Line(number, text, clean=True)


def _split_line_endings(raw: bytes) -> list[bytes]:
    """Split one LF-terminated chunk into lines, treating CRLF and a lone CR as line ends."""
    if raw.endswith(b"\r\n"):
        body = raw[:-2]
    elif raw.endswith((b"\n", b"\r")):
        body = raw[:-1]
    else:
        body = raw
    return body.split(b"\r")


def _normalize_newlines(value: str) -> str:
    return value.replace("\r\n", "\n").replace("\r", "\n")


def _json_type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _parse_jsonl(lines: Iterator[_Line], problems: _ProblemList) -> Iterator[Example | None]:
    """Yield one item per non-blank line: its Example, or None when the line has a problem."""
    first_shape: str | None = None
    first_shape_line = 0

    for line in lines:
        if not line.text.strip():
            continue
        if not line.clean:
            yield None
            continue

        try:
            value = json.loads(line.text)
        except json.JSONDecodeError as error:
            problems.add("invalid_json", line.number, column=error.colno, error=error.msg)
            yield None
            continue
        except (ValueError, RecursionError) as error:
            # Raised for integers over Python's digit limit and for very deep nesting.
            problems.add("invalid_json", line.number, column=1, error=str(error))
            yield None
            continue

        if not isinstance(value, dict):
            problems.add("not_an_object", line.number, type=_json_type_name(value))
            yield None
            continue

        has_text = "text" in value
        has_pair = "prompt" in value or "completion" in value
        if has_text and has_pair:
            problems.add("conflicting_keys", line.number)
            yield None
            continue
        if not has_text and not has_pair:
            found_keys = json.dumps(list(value), ensure_ascii=False)
            problems.add("unknown_keys", line.number, keys=found_keys)
            yield None
            continue

        # The first line with a recognized shape fixes the shape for the whole file.
        shape = _TEXT_SHAPE if has_text else _PAIR_SHAPE
        if first_shape is None:
            first_shape = shape
            first_shape_line = line.number
        elif shape != first_shape:
            problems.add(
                "mixed_formats",
                line.number,
                shape=shape,
                first_line=first_shape_line,
                first_shape=first_shape,
            )
            yield None
            continue

        keys = ("text",) if has_text else ("prompt", "completion")
        yield _example_from_object(value, keys, line.number, problems)


def _example_from_object(
    value: dict[str, Any], keys: tuple[str, ...], number: int, problems: _ProblemList
) -> Example | None:
    """Check the string fields of one JSON object, reporting every bad key, not just the first."""
    texts: list[str] = []
    for key in keys:
        if key not in value:
            problems.add("missing_key", number, key=key)
        elif not isinstance(value[key], str):
            problems.add("non_string_value", number, key=key, type=_json_type_name(value[key]))
        elif not value[key].strip():
            problems.add("empty_field", number, field=key)
        else:
            texts.append(_normalize_newlines(value[key]))

    if len(texts) != len(keys):
        return None
    if len(texts) == 1:
        return Example(prompt="", completion=texts[0])
    return Example(prompt=texts[0], completion=texts[1])


def _parse_csv(lines: Iterator[_Line], problems: _ProblemList) -> Iterator[Example | None]:
    """Yield one item per CSV record after the header: its Example, or None on a problem."""
    # The reader sees one physical line per item, so `line_num` counts physical lines, and the
    # restored "\n" keeps line breaks inside quoted fields. Strict mode raises on an unclosed
    # quote at the end of the file instead of silently closing the field.
    reader = csv.reader((line.text + "\n" for line in lines), strict=True)
    columns: list[tuple[str, str]] | None = None

    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            _add_csv_error(error, start, reader.line_num, problems)
            if columns is None:
                raise problems.error() from None
            yield None
            continue

        if not row or (len(row) == 1 and not row[0].strip()):
            continue

        if columns is None:
            columns = _read_csv_header(row, start, problems)
            continue

        yield _example_from_row(row, columns, start, problems)


def _add_csv_error(error: csv.Error, start: int, current: int, problems: _ProblemList) -> None:
    # csv.Error carries no code, so the two cases with their own advice are recognized by the
    # message text of CPython's _csv module (checked on 3.11). Other texts become invalid_csv.
    text = str(error)
    if "unexpected end of data" in text:
        problems.add("unclosed_quote", start)
    elif "field larger than field limit" in text:
        problems.add("field_too_large", start, limit=csv.field_size_limit())
    else:
        problems.add("invalid_csv", current, error=text)


def _read_csv_header(row: list[str], number: int, problems: _ProblemList) -> list[tuple[str, str]]:
    """Return (name as written, role) per column, or raise when the header is not accepted."""
    names = [name.strip() for name in row]
    lowered = [name.lower() for name in names]

    for roles in _CSV_HEADERS:
        if sorted(lowered) == sorted(roles):
            return [(name, roles[key]) for name, key in zip(names, lowered)]

    # Without a known header no record can be read, so parsing stops here.
    problems.add("unknown_header", number, header=",".join(names))
    raise problems.error()


def _example_from_row(
    row: list[str], columns: list[tuple[str, str]], number: int, problems: _ProblemList
) -> Example | None:
    if len(row) != len(columns):
        problems.add("wrong_field_count", number, expected=len(columns), found=len(row))
        return None

    values: dict[str, str] = {}
    for value, (name, role) in zip(row, columns):
        if not value.strip():
            problems.add("empty_field", number, field=name)
        values[role] = value

    if not all(value.strip() for value in row):
        return None
    if "text" in values:
        return Example(prompt="", completion=values["text"])
    return Example(prompt=values["prompt"], completion=values["completion"])


def _parse_text(lines: Iterator[_Line], problems: _ProblemList) -> Iterator[Example | None]:
    """Yield one Example per block of lines, where whitespace-only lines separate blocks."""
    block: list[str] = []
    for line in lines:
        if line.text.strip():
            block.append(line.text)
        elif block:
            yield Example(prompt="", completion="\n".join(block))
            block = []

    if block:
        yield Example(prompt="", completion="\n".join(block))


_PARSERS = {"jsonl": _parse_jsonl, "csv": _parse_csv, "text": _parse_text}


def parse_dataset(
    path: Path, original_name: str, *, max_problems: int = 50, min_examples: int = 10
) -> ParsedDataset:
    """Parse an uploaded dataset file and validate every example.

    The format comes from the extension of `original_name` (.jsonl, .csv or .txt, in any
    case). The file is read once, line by line, and its sha256 is computed in the same pass.
    Raises DatasetInvalid with up to `max_problems` problems in file order. The file counts
    as too small when it has fewer than `min_examples` records, whether or not they are valid.
    """
    if max_problems < 1:
        raise ValueError(f"max_problems must be 1 or more, got {max_problems}")

    try:
        parsed = _parse_file(path, original_name, max_problems, min_examples)
    except DatasetInvalid as error:
        first = error.problems[0]
        logger.info(
            "Rejected dataset %r: %d problems, first %s at line %s",
            original_name, error.total_problems, first.code, first.line,
        )
        raise

    logger.info(
        "Parsed dataset %r: format %s, %d examples, %d duplicates, %d bytes",
        original_name, parsed.format, len(parsed.examples), parsed.duplicates, parsed.size_bytes,
    )
    return parsed


def _parse_file(
    path: Path, original_name: str, max_problems: int, min_examples: int
) -> ParsedDataset:
    problems = _ProblemList(max_problems)

    extension = PurePath(original_name).suffix.lower()
    dataset_format = _FORMATS_BY_EXTENSION.get(extension)
    if dataset_format is None:
        problems.add("unsupported_extension", None, name=PurePath(original_name).name)
        raise problems.error()

    reader = _LineReader(path, problems)
    lines = iter(reader)
    examples: list[Example] = []
    seen: set[Example] = set()
    duplicates = 0
    records = 0

    try:
        for example in _PARSERS[dataset_format](lines, problems):
            records += 1
            if example is None:
                continue
            if example in seen:
                duplicates += 1
            seen.add(example)
            examples.append(example)
    finally:
        # Closes the file at once when a parser stops early, such as on an unknown CSV header.
        lines.close()

    if not reader.has_content:
        problems.add("empty_file", None)
    elif records < min_examples:
        problems.add("too_few_examples", None, count=records, minimum=min_examples)

    if problems.total:
        raise problems.error()

    return ParsedDataset(
        format=dataset_format,
        encoding=reader.encoding,
        examples=examples,
        sha256=reader.digest.hexdigest(),
        size_bytes=reader.size_bytes,
        duplicates=duplicates,
    )


def _split_rank(seed: int, example: Example) -> bytes:
    # JSON keeps the three parts apart even when a prompt contains any separator character.
    key = json.dumps([seed, example.prompt, example.completion])
    return hashlib.sha256(key.encode("utf-8")).digest()


def split_examples(
    examples: Sequence[Example], *, seed: int = 0, validation_fraction: float = 0.1
) -> tuple[list[Example], list[Example]]:
    """Split examples into (train, validation), each in the original order.

    Distinct examples are ranked by a hash of (seed, prompt, completion), and validation takes
    them from the top of that ranking until it contains `round(len * validation_fraction)`
    examples, at least 1. So the split depends on the examples and the seed, not on file
    order, and copies of one example land on the same side. With 2 or more examples both sides
    are non-empty.
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

    ranked = sorted(copies, key=lambda example: _split_rank(seed, example))
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
