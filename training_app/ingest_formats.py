"""Dataset formats: how the lines of a JSONL, CSV, TSV or plain-text file become examples.

Each parser reads decoded lines from ingest_reader.py and yields one item per record, reporting
problems as it goes. ingest.py runs a parser and checks the examples that it yields. Like the
rest of the ingest modules this one imports nothing from Django.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from .ingest_problems import ProblemList
from .ingest_reader import MAX_LINE_CHARS, Line

logger = logging.getLogger(__name__)

FORMAT_JSONL = "jsonl"
FORMAT_CSV = "csv"
FORMAT_TSV = "tsv"
FORMAT_TEXT = "text"
_FORMATS_BY_EXTENSION = {
    ".jsonl": FORMAT_JSONL,
    ".csv": FORMAT_CSV,
    ".tsv": FORMAT_TSV,
    ".txt": FORMAT_TEXT,
}
GZIP_SUFFIX = ".gz"

# Layouts of the examples in a file.
SHAPE_PAIRS = "prompt_completion"
SHAPE_TEXT = "text"
SHAPE_CHAT = "chat"

ON_TOO_LONG_REJECT = "reject"
ON_TOO_LONG_TRUNCATE = "truncate"

# GPT-2's context, the longest example that training can feed the model.
MAX_EXAMPLE_TOKENS = 1024
# Maximum length of a plain-text example, in characters, so that a file without blank lines
# is not held in memory as one example.
MAX_TEXT_EXAMPLE_CHARS = MAX_LINE_CHARS

# Chat conversations become one prompt/completion pair. Every message but the last is
# rendered as "<Label>: <content>" on its own line, followed by the line "Assistant:", and
# that text is the prompt. The content of the last message, which must be the assistant's,
# is the completion. Training and serving put SEPARATOR ("\n") between the two, so a request
# laid out the same way continues the conversation.
CHAT_ROLE_LABELS = {"system": "System", "user": "User", "assistant": "Assistant"}
CHAT_COMPLETION_ROLE = "assistant"

# Accepted CSV and TSV headers, as the set of stripped lower-case column names, with the role
# of each column. Columns may come in any order because the header names them.
_CSV_HEADERS: tuple[dict[str, str], ...] = (
    {"prompt": "prompt", "completion": "completion"},
    {"source": "prompt", "target": "completion"},
    {"text": "text"},
)
# Delimiters tried for a .csv file, the first one winning ties. Excel writes ";" where the
# comma is the decimal separator.
_CSV_DELIMITERS = (",", ";", "\t")
_EXCEL_SEPARATOR_LINE = re.compile(r"^sep=(.)$", re.IGNORECASE)

# Keys that identify each JSONL layout, and the values of the `shape` parameters of
# `mixed_formats`.
_JSON_SHAPE_KEYS = {
    SHAPE_PAIRS: ("prompt", "completion"),
    SHAPE_TEXT: ("text",),
    SHAPE_CHAT: ("messages",),
}
_SHAPE_NAMES = {
    SHAPE_PAIRS: '"prompt" and "completion"',
    SHAPE_TEXT: '"text"',
    SHAPE_CHAT: '"messages"',
}

_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Example:
    """One training example. A text-only example has an empty prompt and its text as completion.

    `truncated` is True when upload cut the completion to the dataset's maximum length.
    """

    prompt: str
    completion: str
    truncated: bool = False


@dataclass(frozen=True)
class IngestOptions:
    """Choices the user makes when uploading a dataset."""

    # Maximum length of an example in GPT-2 tokens as training counts them: prompt,
    # separator, completion and EOS.
    max_length: int = MAX_EXAMPLE_TOKENS
    on_too_long: str = ON_TOO_LONG_REJECT
    drop_duplicates: bool = False
    # Column (CSV, TSV) or key (JSONL) names to read instead of the standard ones. A
    # completion column alone makes text-only examples.
    prompt_column: str = ""
    completion_column: str = ""
    max_decompressed_bytes: int | None = None

    def __post_init__(self) -> None:
        if not 2 <= self.max_length <= MAX_EXAMPLE_TOKENS:
            raise ValueError(f"max_length must be 2 to {MAX_EXAMPLE_TOKENS}, got {self.max_length}")
        if self.on_too_long not in (ON_TOO_LONG_REJECT, ON_TOO_LONG_TRUNCATE):
            raise ValueError(f"on_too_long must be reject or truncate, got {self.on_too_long!r}")
        if self.prompt_column and not self.completion_column:
            raise ValueError("prompt_column needs completion_column too")

    @property
    def maps_columns(self) -> bool:
        return bool(self.completion_column)

    def mapped_columns(self) -> list[tuple[str, str]]:
        """Return (role, column name) of the mapped columns, prompt first."""
        columns = [("prompt", self.prompt_column)] if self.prompt_column else []
        return columns + [("completion", self.completion_column)]


def dataset_format(name: str) -> tuple[str, bool] | None:
    """Return (format, gzip-compressed) for a client file name, or None when unsupported."""
    lowered = PurePath(name).name.lower()
    compressed = lowered.endswith(GZIP_SUFFIX)
    if compressed:
        lowered = lowered[: -len(GZIP_SUFFIX)]

    dataset_format = _FORMATS_BY_EXTENSION.get(PurePath(lowered).suffix)
    if dataset_format is None:
        return None
    return dataset_format, compressed


def render_chat(messages: Sequence[tuple[str, str]]) -> Example:
    """Render (role, content) messages, the last one the assistant's, as one example."""
    *history, (_, completion) = messages
    lines = [f"{CHAT_ROLE_LABELS[role]}: {content}" for role, content in history]
    lines.append(f"{CHAT_ROLE_LABELS[CHAT_COMPLETION_ROLE]}:")
    return Example(prompt="\n".join(lines), completion=completion)


# --- Parsers: lines to (line number, example or None) -----------------------------------------


@dataclass
class Layout:
    """Layout details that the parser learns while reading a file."""

    shape: str = SHAPE_PAIRS
    delimiter: str = ""


# Yields one item per record: its 1-based start line and its Example, or None when the record
# has a problem that is already reported.
_ParsedRecords = Iterator[tuple[int, "Example | None"]]


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


def _checked_string(value: object, key: str, number: int, problems: ProblemList) -> str | None:
    """Return a JSON value as example text, or None after reporting why it cannot be one."""
    if not isinstance(value, str):
        problems.add("non_string_value", number, key=key, type=_json_type_name(value))
        return None
    if not value.strip():
        problems.add("empty_field", number, field=key)
        return None

    # json.loads accepts "\ud800" escapes that are not part of a pair, and such a string
    # cannot be encoded as UTF-8 for the tokenizer or the stored file.
    surrogate = None if value.isascii() else _SURROGATE.search(value)
    if surrogate is not None:
        escape = f"\\u{ord(surrogate.group()):04x}"
        problems.add("unpaired_surrogate", number, key=key, escape=escape)
        return None
    return _normalize_newlines(value)


def _parse_jsonl(
    lines: Iterator[Line], problems: ProblemList, options: IngestOptions, layout: Layout
) -> _ParsedRecords:
    """Yield one item per non-blank line."""
    first_shape: str | None = None
    first_shape_line = 0
    if options.maps_columns:
        layout.shape = SHAPE_PAIRS if options.prompt_column else SHAPE_TEXT

    for line in lines:
        if not line.text.strip():
            continue
        if not line.clean:
            yield line.number, None
            continue

        value = _load_json_object(line, problems)
        if value is None:
            yield line.number, None
            continue

        if options.maps_columns:
            yield line.number, _example_from_mapped_object(value, options, line.number, problems)
            continue

        shape = _json_shape(value, line.number, problems)
        if shape is None:
            yield line.number, None
            continue

        # The first line with a recognized shape fixes the shape for the whole file.
        if first_shape is None:
            first_shape = shape
            first_shape_line = line.number
            layout.shape = shape
        elif shape != first_shape:
            problems.add(
                "mixed_formats",
                line.number,
                shape=_SHAPE_NAMES[shape],
                first_line=first_shape_line,
                first_shape=_SHAPE_NAMES[first_shape],
            )
            yield line.number, None
            continue

        if shape == SHAPE_CHAT:
            yield line.number, _example_from_chat(value["messages"], line.number, problems)
        else:
            yield line.number, _example_from_object(value, _JSON_SHAPE_KEYS[shape], line.number, problems)


def _load_json_object(line: Line, problems: ProblemList) -> dict[str, Any] | None:
    try:
        value = json.loads(line.text)
    except json.JSONDecodeError as error:
        problems.add("invalid_json", line.number, column=error.colno, error=error.msg)
        return None
    except (ValueError, RecursionError) as error:
        # Raised for integers over Python's digit limit and for very deep nesting.
        problems.add("invalid_json", line.number, column=1, error=str(error))
        return None

    if not isinstance(value, dict):
        problems.add("not_an_object", line.number, type=_json_type_name(value))
        return None
    return value


def _json_shape(value: dict[str, Any], number: int, problems: ProblemList) -> str | None:
    """Return the layout that the object's keys name, or None after reporting a problem."""
    present = [shape for shape, keys in _JSON_SHAPE_KEYS.items() if any(key in value for key in keys)]
    if len(present) == 1:
        return present[0]

    if present:
        format_keys = {key for shape in present for key in _JSON_SHAPE_KEYS[shape]}
        found = [key for key in value if key in format_keys]
        problems.add("conflicting_keys", number, keys=json.dumps(found, ensure_ascii=False))
    else:
        problems.add("unknown_keys", number, keys=json.dumps(list(value), ensure_ascii=False))
    return None


def _example_from_object(
    value: dict[str, Any], keys: tuple[str, ...], number: int, problems: ProblemList
) -> Example | None:
    """Check the string fields of one JSON object, reporting every bad key, not just the first."""
    texts: list[str] = []
    for key in keys:
        if key not in value:
            problems.add("missing_key", number, key=key)
            continue
        text = _checked_string(value[key], key, number, problems)
        if text is not None:
            texts.append(text)

    if len(texts) != len(keys):
        return None
    if len(texts) == 1:
        return Example(prompt="", completion=texts[0])
    return Example(prompt=texts[0], completion=texts[1])


def _example_from_mapped_object(
    value: dict[str, Any], options: IngestOptions, number: int, problems: ProblemList
) -> Example | None:
    columns = options.mapped_columns()
    texts: list[str] = []
    for role, key in columns:
        if key not in value:
            problems.add("missing_column", number, column=key, role=role)
            continue
        text = _checked_string(value[key], key, number, problems)
        if text is not None:
            texts.append(text)

    if len(texts) != len(columns):
        return None
    if len(texts) == 1:
        return Example(prompt="", completion=texts[0])
    return Example(prompt=texts[0], completion=texts[1])


def _example_from_chat(messages: object, number: int, problems: ProblemList) -> Example | None:
    """Check a chat conversation and render it with `render_chat`.

    Messages are numbered from 1 in messages, and keys use JSON's 0-based indexes, such as
    "messages[0].content".
    """
    if not isinstance(messages, list):
        problems.add("invalid_messages", number, type=_json_type_name(messages))
        return None
    if not messages:
        problems.add("empty_messages", number)
        return None

    turns: list[tuple[str, str]] = []
    for index, message in enumerate(messages, start=1):
        turn = _chat_turn(message, index, number, problems)
        if turn is not None:
            turns.append(turn)
    if len(turns) != len(messages):
        return None

    last_role = turns[-1][0]
    if last_role != CHAT_COMPLETION_ROLE:
        problems.add("last_not_assistant", number, role=last_role)
        return None
    return render_chat(turns)


def _chat_turn(message: object, index: int, number: int, problems: ProblemList) -> tuple[str, str] | None:
    if not isinstance(message, dict):
        problems.add("invalid_message", number, index=index, type=_json_type_name(message))
        return None

    missing = [key for key in ("role", "content") if key not in message]
    for key in missing:
        problems.add("message_missing_key", number, index=index, key=key)
    if missing:
        return None

    role = message["role"]
    valid = True
    if not isinstance(role, str):
        problems.add("non_string_value", number, key=f"messages[{index - 1}].role", type=_json_type_name(role))
        valid = False
    elif role not in CHAT_ROLE_LABELS:
        problems.add("unknown_role", number, index=index, role=json.dumps(role, ensure_ascii=False))
        valid = False

    content = _checked_string(message["content"], f"messages[{index - 1}].content", number, problems)
    if not valid or content is None:
        return None
    return role, content


def _parse_delimited(
    lines: Iterator[Line],
    problems: ProblemList,
    options: IngestOptions,
    layout: Layout,
    *,
    delimiter: str | None,
) -> _ParsedRecords:
    """Yield one item per CSV or TSV record after the header.

    `delimiter=None` detects it from the header line among ",", ";" and tab, and an Excel
    "sep=X" first line sets it outright.
    """
    header = _first_content_line(lines)
    if header is None:
        return

    separator_line = _EXCEL_SEPARATOR_LINE.match(header.text.strip())
    if separator_line is not None:
        delimiter = separator_line.group(1)
        header = _first_content_line(lines)
        if header is None:
            return

    if delimiter is None:
        delimiter = _detect_delimiter(header.text, options)
    layout.delimiter = delimiter

    # The reader sees one physical line per item, so `line_num` counts physical lines after the
    # skipped ones, and the restored "\n" keeps line breaks inside quoted fields. Strict mode
    # raises on an unclosed quote at the end of the file instead of silently closing the field.
    skipped = header.number - 1
    texts = (line.text + "\n" for line in itertools.chain([header], lines))
    reader = csv.reader(texts, delimiter=delimiter, strict=True)
    columns: _Columns | None = None

    while True:
        start = skipped + reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            _add_csv_error(error, start, skipped + reader.line_num, problems)
            if columns is None:
                raise problems.error() from None
            yield start, None
            continue

        if not row or (len(row) == 1 and not row[0].strip()):
            continue

        if columns is None:
            columns = _read_csv_header(row, start, problems, options)
            layout.shape = SHAPE_TEXT if columns.roles.keys() == {"completion"} else SHAPE_PAIRS
            continue

        yield start, _example_from_row(row, columns, start, problems)


def _first_content_line(lines: Iterator[Line]) -> Line | None:
    for line in lines:
        if line.text.strip():
            return line
    return None


def _split_header(text: str, delimiter: str) -> list[str]:
    try:
        return next(csv.reader([text], delimiter=delimiter))
    except (csv.Error, StopIteration):
        return []


def _detect_delimiter(header_text: str, options: IngestOptions) -> str:
    """Pick the delimiter that makes the header line an accepted header, else the one that
    splits it into the most columns."""
    for delimiter in _CSV_DELIMITERS:
        if _header_roles(_split_header(header_text, delimiter), options) is not None:
            return delimiter
    return max(_CSV_DELIMITERS, key=lambda delimiter: len(_split_header(header_text, delimiter)))


@dataclass(frozen=True)
class _Columns:
    names: list[str]  # as written in the header, stripped
    roles: dict[str, int]  # role ("prompt", "completion") to column index


def _header_roles(row: list[str], options: IngestOptions) -> dict[str, int] | None:
    """Return role to column index when the header is accepted as it is, else None."""
    lowered = [name.strip().lower() for name in row]

    if options.maps_columns:
        roles = {}
        for role, column in options.mapped_columns():
            matches = [index for index, name in enumerate(lowered) if name == column.strip().lower()]
            if len(matches) != 1:
                return None
            roles[role] = matches[0]
        return roles

    for header in _CSV_HEADERS:
        if sorted(lowered) == sorted(header):
            # A text column is the completion of a text-only example.
            return {
                ("completion" if header[name] == "text" else header[name]): index
                for index, name in enumerate(lowered)
            }
    return None


def _read_csv_header(row: list[str], number: int, problems: ProblemList, options: IngestOptions) -> _Columns:
    """Return the columns of an accepted header, or raise, because no record can be read
    without one."""
    names = [name.strip() for name in row]
    roles = _header_roles(row, options)
    if roles is not None:
        return _Columns(names=names, roles=roles)

    if options.maps_columns:
        lowered = [name.lower() for name in names]
        for role, column in options.mapped_columns():
            count = lowered.count(column.strip().lower())
            if count == 0:
                problems.add("missing_column", number, column=column, role=role)
            elif count > 1:
                problems.add("duplicate_column", number, column=column)
    else:
        problems.add("unknown_header", number, header=",".join(names))
    raise problems.error()


def _add_csv_error(error: csv.Error, start: int, current: int, problems: ProblemList) -> None:
    # csv.Error carries no code, so the two cases with their own advice are recognized by the
    # message text of CPython's _csv module (checked on 3.11). Other texts become invalid_csv.
    text = str(error)
    if "unexpected end of data" in text:
        problems.add("unclosed_quote", start)
    elif "field larger than field limit" in text:
        problems.add("field_too_large", start, limit=csv.field_size_limit())
    else:
        problems.add("invalid_csv", current, error=text)


def _example_from_row(row: list[str], columns: _Columns, number: int, problems: ProblemList) -> Example | None:
    if len(row) != len(columns.names):
        problems.add("wrong_field_count", number, expected=len(columns.names), found=len(row))
        return None

    # With the standard headers every column is used. With mapped columns the others are
    # ignored, so only the mapped ones must be filled in.
    values: dict[str, str] = {}
    for role, index in sorted(columns.roles.items(), key=lambda item: item[1]):
        value = row[index]
        if not value.strip():
            problems.add("empty_field", number, field=columns.names[index])
        values[role] = _normalize_newlines(value)

    if not all(value.strip() for value in values.values()):
        return None
    return Example(prompt=values.get("prompt", ""), completion=values["completion"])


def _parse_text(
    lines: Iterator[Line], problems: ProblemList, options: IngestOptions, layout: Layout
) -> _ParsedRecords:
    """Yield one item per block of lines, where whitespace-only lines separate blocks."""
    layout.shape = SHAPE_TEXT
    block: list[str] = []
    start = 0
    size = 0
    # A block with a bad line is still one record, but yields None.
    bad = False
    oversized = False

    for line in lines:
        if line.clean and not line.text.strip():
            if block or bad or oversized:
                yield start, None if bad or oversized else Example(prompt="", completion="\n".join(block))
            block, size, bad, oversized = [], 0, False, False
            continue

        if not (block or bad or oversized):
            start = line.number
        bad = bad or not line.clean
        size += len(line.text) + 1
        if oversized:
            continue
        if size > MAX_TEXT_EXAMPLE_CHARS:
            problems.add("example_too_large", start, limit=MAX_TEXT_EXAMPLE_CHARS)
            oversized = True
            block = []
            continue
        block.append(line.text)

    if block or bad or oversized:
        yield start, None if bad or oversized else Example(prompt="", completion="\n".join(block))


def _parse_csv(lines: Iterator[Line], problems: ProblemList, options: IngestOptions, layout: Layout) -> _ParsedRecords:
    return _parse_delimited(lines, problems, options, layout, delimiter=None)


def _parse_tsv(lines: Iterator[Line], problems: ProblemList, options: IngestOptions, layout: Layout) -> _ParsedRecords:
    return _parse_delimited(lines, problems, options, layout, delimiter="\t")


PARSERS: dict[str, Callable[[Iterator[Line], ProblemList, IngestOptions, Layout], _ParsedRecords]] = {
    FORMAT_JSONL: _parse_jsonl,
    FORMAT_CSV: _parse_csv,
    FORMAT_TSV: _parse_tsv,
    FORMAT_TEXT: _parse_text,
}
