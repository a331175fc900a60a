"""Malformed and unusual dataset files, each with the problem code and line it must produce.

The parser tests (tests/unit/test_ingest.py) and the upload service tests
(tests/app/test_dataset_upload.py) both run every case.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from training_app.ingest import MAX_TEXT_EXAMPLE_CHARS
from training_app.ingest_reader import MAX_LINE_CHARS

PAIR_LINE = '{"prompt": "p", "completion": "c"}'
TEXT_LINE = '{"text": "t"}'
CHAT_LINE = json.dumps(
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
)


def jsonl(*lines: str) -> str:
    return "".join(line + "\n" for line in lines)


def pair_lines(count: int) -> list[str]:
    return [json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) for i in range(count)]


def chat(*messages: Any) -> str:
    return json.dumps({"messages": list(messages)})


# Russian text saved as DOS code page 866, which charset-normalizer 3.4 takes for cp1125 and
# which is not among the encodings converted automatically.
RUSSIAN_CSV = "prompt,completion\n" + "".join(
    f"Вопрос {i},Это русский текст. Москва большой город, где живёт много людей.\n"
    for i in range(40)
)


def _long_jsonl_line() -> bytes:
    return (PAIR_LINE + "\n").encode() + b'{"prompt": "' + b"x" * (MAX_LINE_CHARS + 1) + b'"}\n'


def _long_text_block() -> bytes:
    line = "y" * 999 + "\n"
    return ("a\n\n" + line * (MAX_TEXT_EXAMPLE_CHARS // len(line) + 2)).encode()


@dataclass(frozen=True)
class Case:
    id: str
    name: str
    content: str | bytes | Callable[[], bytes]
    code: str  # code of the first problem
    line: int | None  # line of the first problem
    # IngestOptions fields. Cases with max_length or on_too_long need the tokenizer.
    options: dict[str, Any] = field(default_factory=dict)

    def data(self) -> bytes:
        content = self.content() if callable(self.content) else self.content
        return content.encode("utf-8") if isinstance(content, str) else content

    @property
    def needs_tokenizer(self) -> bool:
        return "max_length" in self.options or "on_too_long" in self.options


INVALID_CASES: list[Case] = [
    # JSONL syntax and shape.
    Case("json-missing-value", "d.jsonl", jsonl(PAIR_LINE, '{"prompt": "a", "completion": }'), "invalid_json", 2),
    Case("json-truncated-object", "d.jsonl", jsonl(PAIR_LINE, PAIR_LINE, '{"prompt": "a"'), "invalid_json", 3),
    Case("json-single-quotes", "d.jsonl", jsonl("{'prompt': 'a', 'completion': 'b'}"), "invalid_json", 1),
    Case("json-pretty-printed", "d.jsonl", '{\n  "prompt": "a",\n  "completion": "b"\n}\n', "invalid_json", 1),
    Case("json-array-line", "d.jsonl", jsonl(PAIR_LINE, '["p", "c"]'), "not_an_object", 2),
    Case("json-string-line", "d.jsonl", jsonl('"just text"'), "not_an_object", 1),
    Case("json-missing-completion", "d.jsonl", jsonl(PAIR_LINE, '{"prompt": "a"}'), "missing_key", 2),
    Case("json-missing-prompt", "d.jsonl", jsonl('{"completion": "b"}'), "missing_key", 1),
    Case("json-other-keys", "d.jsonl", jsonl('{"question": "a", "answer": "b"}'), "unknown_keys", 1),
    Case("json-empty-object", "d.jsonl", jsonl(PAIR_LINE, "{}"), "unknown_keys", 2),
    Case("json-text-and-prompt", "d.jsonl", jsonl('{"text": "t", "prompt": "p"}'), "conflicting_keys", 1),
    Case("json-messages-and-prompt", "d.jsonl", jsonl(PAIR_LINE, '{"messages": [], "prompt": "p"}'),
         "conflicting_keys", 2),
    Case("json-text-after-pairs", "d.jsonl", jsonl(PAIR_LINE, PAIR_LINE, TEXT_LINE), "mixed_formats", 3),
    Case("json-pair-after-text", "d.jsonl", jsonl(TEXT_LINE, PAIR_LINE), "mixed_formats", 2),
    Case("json-chat-after-pairs", "d.jsonl", jsonl(PAIR_LINE, CHAT_LINE), "mixed_formats", 2),
    Case("json-number-value", "d.jsonl", jsonl('{"prompt": 7, "completion": "seven"}'), "non_string_value", 1),
    Case("json-null-value", "d.jsonl", jsonl(PAIR_LINE, '{"prompt": "a", "completion": null}'),
         "non_string_value", 2),
    Case("json-empty-prompt", "d.jsonl", jsonl('{"prompt": "", "completion": "b"}'), "empty_field", 1),
    Case("json-whitespace-completion", "d.jsonl", jsonl('{"prompt": "a", "completion": " \\n\\t"}'),
         "empty_field", 1),
    Case("json-empty-text", "d.jsonl", jsonl(TEXT_LINE, '{"text": "   "}'), "empty_field", 2),
    Case("json-lone-surrogate", "d.jsonl", jsonl(PAIR_LINE, '{"prompt": "a\\ud800b", "completion": "c"}'),
         "unpaired_surrogate", 2),
    # Chat conversations.
    Case("chat-messages-string", "d.jsonl", jsonl('{"messages": "hello"}'), "invalid_messages", 1),
    Case("chat-messages-empty", "d.jsonl", jsonl(CHAT_LINE, '{"messages": []}'), "empty_messages", 2),
    Case("chat-message-not-object", "d.jsonl", jsonl(chat("hi", {"role": "assistant", "content": "a"})),
         "invalid_message", 1),
    Case("chat-message-without-content", "d.jsonl", jsonl(CHAT_LINE, chat({"role": "user"})),
         "message_missing_key", 2),
    Case("chat-unknown-role", "d.jsonl", jsonl(chat({"role": "bot", "content": "x"})), "unknown_role", 1),
    Case("chat-role-number", "d.jsonl", jsonl(chat({"role": 1, "content": "x"})), "non_string_value", 1),
    Case("chat-content-number", "d.jsonl",
         jsonl(chat({"role": "user", "content": "hi"}, {"role": "assistant", "content": 5})), "non_string_value", 1),
    Case("chat-empty-content", "d.jsonl",
         jsonl(CHAT_LINE, chat({"role": "user", "content": " "}, {"role": "assistant", "content": "a"})),
         "empty_field", 2),
    Case("chat-ends-with-user", "d.jsonl", jsonl(chat({"role": "user", "content": "hi"})), "last_not_assistant", 1),
    # Line numbers count blank lines and every kind of line ending.
    Case("json-after-blank-lines", "d.jsonl", jsonl(PAIR_LINE, "", "   ", PAIR_LINE, "{bad"), "invalid_json", 5),
    Case("json-after-crlf", "d.jsonl", (PAIR_LINE + "\r\n") * 3 + "{bad\r\n", "invalid_json", 4),
    Case("json-after-lone-cr", "d.jsonl", PAIR_LINE + "\r" + PAIR_LINE + "\r{bad\r", "invalid_json", 3),
    Case("json-utf16-bom-line-3", "d.jsonl", "\ufeff".encode("utf-16-le") + jsonl(PAIR_LINE, PAIR_LINE, "{bad").encode("utf-16-le"),
         "invalid_json", 3),
    # Bytes and encoding.
    Case("latin1-byte-in-utf8-jsonl", "d.jsonl",
         jsonl('{"prompt": "naïve café", "completion": "crème brûlée"}').encode()
         + '{"prompt": "café", "completion": "x"}\n'.encode("latin-1"),
         "invalid_encoding", 2),
    Case("latin1-byte-in-utf8-text", "d.txt", "ünï\n\ntwo\n\n".encode() + b"na\xefve\n", "invalid_encoding", 5),
    Case("truncated-utf8-csv", "d.csv", b"prompt,completion\na,b\nc,\xe2\x82\n", "invalid_encoding", 3),
    Case("nul-byte-jsonl", "d.jsonl", jsonl(PAIR_LINE) + '{"prompt": "a\x00", "completion": "b"}\n', "nul_byte", 2),
    Case("nul-byte-text", "d.txt", "a\n\nb\x00c\n", "nul_byte", 3),
    Case("utf16-without-bom", "d.jsonl", jsonl(PAIR_LINE, PAIR_LINE).encode("utf-16-le"), "utf16_encoding", 1),
    Case("utf16-lone-surrogate", "d.csv",
         b"\xff\xfe" + "prompt,completion\n".encode("utf-16-le") + b"\x00\xd8" + "a,b\n".encode("utf-16-le"),
         "decode_error", 2),
    Case("binary-bytes", "d.jsonl", bytes(range(0x80, 0x100)) * 8, "unknown_encoding", 1),
    Case("dos-cyrillic-text", "d.csv", RUSSIAN_CSV.encode("cp866"), "unsupported_encoding", 2),
    Case("bom-after-join", "d.jsonl", jsonl(PAIR_LINE) + "\ufeff" + jsonl(PAIR_LINE), "bom_in_middle", 2),
    Case("bom-inside-csv", "d.csv", "\ufeffprompt,completion\na,b\n\ufeffprompt,completion\nc,d\n", "bom_in_middle", 3),
    Case("line-too-long", "d.jsonl", _long_jsonl_line, "line_too_long", 2),
    Case("text-block-too-large", "d.txt", _long_text_block, "example_too_large", 3),
    # Compression.
    Case("gzip-name-plain-content", "d.jsonl.gz", jsonl(PAIR_LINE), "invalid_gzip", 1),
    Case("gzip-cut-off", "d.jsonl.gz", gzip.compress(jsonl(*pair_lines(300)).encode())[:-40], "invalid_gzip", 1),
    Case("gzip-error-line-crlf", "d.jsonl.gz", gzip.compress(((PAIR_LINE + "\r\n") * 3 + "{bad\r\n").encode()),
         "invalid_json", 4),
    Case("gzip-csv-unknown-header", "d.csv.gz", gzip.compress(b"q,a\n1,2\n"), "unknown_header", 1),
    Case("gzip-expands-too-far", "d.txt.gz", gzip.compress(b"word\n\n" * 1000), "decompressed_too_large", None,
         options={"max_decompressed_bytes": 1000}),
    # CSV and TSV header, records and quoting.
    Case("csv-unknown-header", "d.csv", "question,answer\na,b\n", "unknown_header", 1),
    Case("csv-no-header", "d.csv", "hello,world\nfoo,bar\n", "unknown_header", 1),
    Case("csv-header-after-blank-lines", "d.csv", "\n\ninput,output\na,b\n", "unknown_header", 3),
    Case("csv-extra-column", "d.csv", "prompt,completion,id\na,b,1\n", "unknown_header", 1),
    Case("csv-repeated-column", "d.csv", "prompt,prompt\na,b\n", "unknown_header", 1),
    Case("csv-too-many-fields", "d.csv", "prompt,completion\na,b\nc,d,e\n", "wrong_field_count", 3),
    Case("csv-too-few-fields", "d.csv", "source,target\na,b\nlonely\n", "wrong_field_count", 3),
    Case("csv-unquoted-comma-text", "d.csv", "text\nhello, world\n", "wrong_field_count", 2),
    Case("csv-empty-target", "d.csv", "source,target\na,b\nc,\n", "empty_field", 3),
    Case("csv-whitespace-prompt", "d.csv", "prompt,completion\n   ,b\n", "empty_field", 2),
    Case("csv-semicolon-empty-field", "d.csv", "prompt;completion\na;b\nc;\n", "empty_field", 3),
    Case("csv-unclosed-quote", "d.csv", 'prompt,completion\na,b\n"c,d\ne,f\n', "unclosed_quote", 3),
    Case("csv-text-after-quote", "d.csv", 'prompt,completion\na,b\n"c"d,e\n', "invalid_csv", 3),
    Case("csv-error-after-multiline", "d.csv", 'prompt,completion\n"a\nb\nc",d\ne,\n', "empty_field", 5),
    Case("csv-multiline-record-start", "d.csv", 'prompt,completion\nx,y\n"a\nb",\n', "empty_field", 3),
    Case("csv-huge-field", "d.csv", "prompt,completion\na,\"" + "x" * 140_000 + "\n", "field_too_large", 2),
    Case("tsv-too-many-fields", "d.tsv", "prompt\tcompletion\na\tb\tc\n", "wrong_field_count", 2),
    Case("tsv-text-after-quote", "d.tsv", 'prompt\tcompletion\n"a"b\tc\n', "invalid_csv", 2),
    # Column options.
    Case("csv-mapped-column-missing", "d.csv", "question,answer\nq,a\n", "missing_column", 1,
         options={"prompt_column": "question", "completion_column": "reply"}),
    Case("csv-mapped-column-twice", "d.csv", "q,q,a\n1,2,3\n", "duplicate_column", 1,
         options={"prompt_column": "q", "completion_column": "a"}),
    Case("csv-mapped-empty-value", "d.csv", "id,question,answer\n1,q,a\n2,,a\n", "empty_field", 3,
         options={"prompt_column": "question", "completion_column": "answer"}),
    Case("jsonl-mapped-key-missing", "d.jsonl", jsonl('{"question": "q", "answer": "a"}', '{"question": "q"}'),
         "missing_column", 2, options={"prompt_column": "question", "completion_column": "answer"}),
    Case("text-with-column-options", "d.txt", "a\n\nb\n", "columns_not_applicable", None,
         options={"completion_column": "text"}),
    # Length in GPT-2 tokens.
    Case("too-long-rejected", "d.jsonl",
         jsonl(PAIR_LINE, '{"prompt": "one two three", "completion": "four five six seven eight nine"}'),
         "too_long", 2, options={"max_length": 8}),
    Case("too-long-text", "d.txt", "short\n\n" + "many words " * 20 + "\n", "too_long", 3, options={"max_length": 16}),
    Case("prompt-too-long-truncating", "d.jsonl",
         jsonl('{"prompt": "' + "word " * 20 + '", "completion": "x"}'),
         "prompt_too_long", 1, options={"max_length": 8, "on_too_long": "truncate"}),
    # Whole file.
    Case("empty-file", "d.jsonl", b"", "empty_file", None),
    Case("blank-lines-only", "d.txt", "\n  \n\t\n", "empty_file", None),
    Case("bom-only", "d.csv", b"\xef\xbb\xbf", "empty_file", None),
    Case("empty-gzip", "d.jsonl.gz", gzip.compress(b""), "empty_file", None),
    Case("csv-header-only", "d.csv", "prompt,completion\n", "too_few_examples", None),
    Case("unsupported-json", "d.json", jsonl(PAIR_LINE), "unsupported_extension", None),
    Case("unsupported-no-extension", "dataset", jsonl(PAIR_LINE), "unsupported_extension", None),
    Case("unsupported-xlsx-gz", "d.xlsx.gz", gzip.compress(b"x"), "unsupported_extension", None),
]
