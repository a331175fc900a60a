"""Problem codes, English message templates and the problem list of dataset validation.

Like the rest of the ingest modules, this one imports nothing from Django. Every problem
carries a stable code and the parameters of its message, so the web layer can translate the
message by code (see messages.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def gettext_noop(message: str) -> str:
    # Only marks the string for the translation catalog, and messages.py translates it at run time.
    return message


# English message templates by problem code. The parameters of each template are exactly the
# keys of `Problem.params` for that code, and the web layer wraps these strings in gettext.
# `line` is a 1-based physical line number of the decompressed, decoded file. For
# `invalid_gzip` it is the first line that could not be read, because gzip data is read in
# chunks of many lines. The `error`
# parameter of `invalid_json`, `invalid_csv` and `invalid_gzip` is the English text of a Python
# exception and is not translated.
MESSAGE_TEMPLATES: dict[str, str] = {
    # Whole file.
    "unsupported_extension": gettext_noop(
        'Cannot read "%(name)s": the file name must end in .jsonl, .csv, .tsv or .txt, '
        "optionally followed by .gz."
    ),
    "empty_file": gettext_noop(
        "The file contains no examples; upload a file with at least one non-blank line."
    ),
    "too_few_examples": gettext_noop(
        "The file has too few examples for training (%(count)s, at least %(minimum)s "
        "needed); add more examples."
    ),
    "columns_not_applicable": gettext_noop(
        'The column options apply to JSONL, CSV and TSV files, but "%(name)s" is plain text; '
        "clear the column options or upload another format."
    ),
    # Compression.
    "invalid_gzip": gettext_noop(
        "The gzip data is damaged or cut off at line %(line)s or later (%(error)s); "
        "compress the file again and upload it."
    ),
    "decompressed_too_large": gettext_noop(
        "The file is larger than %(limit)s bytes after decompression; "
        "split it into smaller files and upload them one by one."
    ),
    # Bytes and encoding, in every format.
    "utf16_encoding": gettext_noop(
        "Line %(line)s: the file is saved as UTF-16; save it as UTF-8 and upload it again."
    ),
    "invalid_encoding": gettext_noop(
        "Line %(line)s, column %(column)s: the byte %(byte)s is not valid UTF-8; "
        "save the file as UTF-8 and upload it again."
    ),
    "unknown_encoding": gettext_noop(
        "Line %(line)s, column %(column)s: the byte %(byte)s is not valid UTF-8, and no other "
        "encoding fits the file; save the file as UTF-8 and upload it again."
    ),
    "unsupported_encoding": gettext_noop(
        "Line %(line)s, column %(column)s: the byte %(byte)s is not valid UTF-8; the file "
        "looks like %(encoding)s, which is not converted automatically; save the file as "
        "UTF-8 and upload it again."
    ),
    "decode_error": gettext_noop(
        "Line %(line)s, column %(column)s: the byte %(byte)s is not valid in %(encoding)s, "
        "the encoding this file was read in; save the file as UTF-8 and upload it again."
    ),
    "nul_byte": gettext_noop(
        "Line %(line)s contains a NUL byte, so the file looks binary; "
        "upload a text file saved as UTF-8."
    ),
    "bom_in_middle": gettext_noop(
        "Line %(line)s, column %(column)s contains a byte order mark (U+FEFF), which usually "
        "means that files were joined; delete it and upload the file again."
    ),
    "line_too_long": gettext_noop(
        "Line %(line)s is longer than %(limit)s characters; "
        "put each example on its own line and keep examples shorter."
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
        "Line %(line)s: the object has the keys %(keys)s; each JSON line needs "
        '"prompt" and "completion", "text", or "messages", unless the upload options name '
        "the keys to use."
    ),
    "missing_key": gettext_noop(
        'Line %(line)s: the key "%(key)s" is missing; '
        'each JSON line needs "prompt" and "completion", or "text".'
    ),
    "conflicting_keys": gettext_noop(
        "Line %(line)s has the keys %(keys)s, which belong to different formats; use "
        '"prompt" with "completion", "text" alone, or "messages" alone.'
    ),
    "mixed_formats": gettext_noop(
        "Line %(line)s uses %(shape)s but line %(first_line)s uses %(first_shape)s; "
        "use the same keys on every line of the file."
    ),
    "non_string_value": gettext_noop(
        'Line %(line)s: the value of "%(key)s" is a JSON %(type)s; '
        "write it as a string in double quotes."
    ),
    "unpaired_surrogate": gettext_noop(
        'Line %(line)s: the value of "%(key)s" contains the escape %(escape)s, half of a '
        "UTF-16 surrogate pair, which is not a character; remove it or complete the pair."
    ),
    # JSONL chat conversations.
    "invalid_messages": gettext_noop(
        'Line %(line)s: "messages" is a JSON %(type)s; write it as an array of objects '
        'with "role" and "content".'
    ),
    "empty_messages": gettext_noop(
        'Line %(line)s: "messages" is empty; add the conversation, ending with an '
        "assistant message."
    ),
    "invalid_message": gettext_noop(
        "Line %(line)s: message %(index)s is a JSON %(type)s; write each message as an "
        'object with "role" and "content".'
    ),
    "message_missing_key": gettext_noop(
        'Line %(line)s: message %(index)s has no "%(key)s"; '
        'each message needs "role" and "content".'
    ),
    "unknown_role": gettext_noop(
        "Line %(line)s: message %(index)s has the role %(role)s; "
        'use "system", "user" or "assistant".'
    ),
    "last_not_assistant": gettext_noop(
        'Line %(line)s: the last message has the role "%(role)s"; end each conversation '
        "with the assistant message that the model should learn."
    ),
    # JSONL, CSV and TSV.
    "empty_field": gettext_noop(
        'Line %(line)s: "%(field)s" is empty or only whitespace; '
        "fill it in or remove the example."
    ),
    "missing_column": gettext_noop(
        'Line %(line)s has no column or key "%(column)s", which the upload options name as '
        "the %(role)s column; correct the name or clear the option."
    ),
    # CSV and TSV.
    "unknown_header": gettext_noop(
        'Line %(line)s: the header "%(header)s" is not recognized; the first line must name '
        "the columns prompt,completion or source,target or text, unless the upload options "
        "name the columns to use."
    ),
    "duplicate_column": gettext_noop(
        'Line %(line)s: the header names the column "%(column)s" more than once; '
        "rename the columns so that each name is unique."
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
    # Plain text.
    "example_too_large": gettext_noop(
        "Line %(line)s: the example that starts here is longer than %(limit)s characters; "
        "separate examples with a blank line."
    ),
    # Length in GPT-2 tokens, in every format.
    "too_long": gettext_noop(
        "Line %(line)s: the example has %(tokens)s GPT-2 tokens, more than the maximum "
        "length of %(maximum)s; shorten it, raise the maximum length, or choose to truncate "
        "long examples."
    ),
    "prompt_too_long": gettext_noop(
        "Line %(line)s: the prompt alone has %(tokens)s GPT-2 tokens, so no completion token "
        "fits in the maximum length of %(maximum)s; shorten the prompt or raise the maximum "
        "length."
    ),
}


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

    @property
    def column(self) -> int | None:
        """1-based character column of the problem within its line, when the code has one."""
        return self.params.get("column")

    @property
    def field(self) -> str | None:
        """Name of the JSON key, CSV column or message field that the problem concerns."""
        return self.params.get("field") or self.params.get("key")


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


class ProblemList:
    """Problems in file order. Keeps the first `max_problems` and counts all of them.

    `before_add`, when set, runs before each problem is recorded. The ingest pipeline uses
    it to finish the checks of earlier lines first, so problems stay in file order.
    """

    def __init__(self, max_problems: int) -> None:
        self.max_problems = max_problems
        self.kept: list[Problem] = []
        self.total = 0
        self.before_add: Callable[[], None] | None = None

    def add(self, code: str, line: int | None, **params: Any) -> None:
        if self.before_add is not None:
            self.before_add()

        self.total += 1
        if len(self.kept) >= self.max_problems:
            return

        if line is not None:
            params = {"line": line, **params}
        message = MESSAGE_TEMPLATES[code] % params
        self.kept.append(Problem(code=code, line=line, message=message, params=params))

    def error(self) -> DatasetInvalid:
        return DatasetInvalid(list(self.kept), self.total)

