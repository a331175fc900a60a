"""Accepted dataset inputs: encodings, line endings, compression, CSV dialects, chat and columns."""

from __future__ import annotations

import codecs
import csv
import gzip
import hashlib
import io
import json
import tracemalloc
from pathlib import Path

import pytest

from tests.ingest_cases import PAIR_LINE, jsonl, pair_lines
from training_app.ingest import (
    SHAPE_CHAT,
    SHAPE_PAIRS,
    SHAPE_TEXT,
    DatasetInvalid,
    Example,
    IngestOptions,
    ParsedDataset,
    parse_dataset,
    render_chat,
)
from training_app.ingest_problems import ProblemList
from training_app.ingest_reader import CHUNK_BYTES, LineReader

FRENCH = [
    ("Où est la gare ?", "La gare est à côté du marché."),
    ("Quel temps fait-il ?", "Il fait très beau, mais un peu frais."),
    ("Combien coûte ce gâteau ?", "Il coûte trois euros cinquante."),
    ("Qu’est-ce que tu préfères ?", "Je préfère le thé à la crème brûlée."),
    ("Où habites-tu ?", "J’habite près de la forêt, à Besançon."),
    ("Comment ça va ?", "Ça va très bien, merci beaucoup !"),
    ("Que fais-tu ce week-end ?", "Je vais au cinéma avec ma sœur."),
    ("Quelle heure est-il ?", "Il est déjà midi et demi."),
    ("As-tu fini tes études ?", "Oui, j’ai eu mon diplôme l’été dernier."),
    ("Où as-tu acheté ça ?", "Au marché de Noël, près de l’église."),
    ("Aimes-tu la musique ?", "J’adore les chansons françaises des années soixante."),
    ("Qui a écrit ce livre ?", "C’est un écrivain québécois très connu."),
]
CHINESE = [
    ("今天天气怎么样？", "今天天气很好，阳光明媚。"),
    ("你叫什么名字？", "我叫小明，很高兴认识你。"),
    ("这本书多少钱？", "这本书二十五块钱。"),
    ("你住在哪里？", "我住在北京，离公司不远。"),
    ("你喜欢吃什么？", "我喜欢吃饺子和面条。"),
    ("明天你有空吗？", "明天下午我有空，我们一起去公园吧。"),
    ("火车站怎么走？", "一直往前走，然后在第二个路口左转。"),
    ("你会说中文吗？", "我会说一点儿中文，还在学习。"),
    ("现在几点了？", "现在是下午三点半。"),
    ("你周末做什么？", "我周末常常去图书馆看书。"),
    ("你的爱好是什么？", "我的爱好是画画和听音乐。"),
]
JAPANESE = [
    ("今日の天気はどうですか？", "今日はとても良い天気です。"),
    ("お名前は何ですか？", "私の名前は田中です。よろしくお願いします。"),
    ("駅はどこですか？", "駅はこの道をまっすぐ行って右にあります。"),
    ("趣味は何ですか？", "私の趣味は本を読むことと映画を見ることです。"),
    ("何時に起きますか？", "毎朝六時に起きて、散歩をします。"),
    ("週末は何をしますか？", "週末は友達と買い物に行きます。"),
    ("日本語は難しいですか？", "漢字は難しいですが、とても面白いです。"),
    ("好きな食べ物は何ですか？", "寿司とラーメンが大好きです。"),
    ("どこに住んでいますか？", "東京の近くに住んでいます。"),
    ("昨日は何をしましたか？", "昨日は図書館で勉強しました。"),
]


def parse_bytes(folder: Path, name: str, content: bytes, **options: object) -> ParsedDataset:
    path = folder / "upload.bin"
    path.write_bytes(content)
    return parse_dataset(path, name, min_examples=1, **options)  # type: ignore[arg-type]


def csv_text(rows: list[tuple[str, str]]) -> str:
    """Return rows under a prompt,completion header as Excel writes CSV: CRLF, minimal quoting."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(("prompt", "completion"))
    writer.writerows(rows)
    return buffer.getvalue()


def pair_examples(rows: list[tuple[str, str]]) -> list[Example]:
    return [Example(prompt, completion) for prompt, completion in rows]


# Encodings.


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be"])
def test_utf16_with_bom_converted(tmp_path: Path, codec: str) -> None:
    bom = codecs.BOM_UTF16_LE if codec.endswith("le") else codecs.BOM_UTF16_BE
    content = bom + csv_text(FRENCH).encode(codec)

    parsed = parse_bytes(tmp_path, "d.csv", content)

    assert parsed.encoding == "utf-16"
    assert not parsed.encoding_detected
    assert parsed.examples == pair_examples(FRENCH)
    assert parsed.sha256 == hashlib.sha256(content).hexdigest()


def test_utf32_with_bom_converted(tmp_path: Path) -> None:
    content = codecs.BOM_UTF32_LE + jsonl(*pair_lines(3)).encode("utf-32-le")

    parsed = parse_bytes(tmp_path, "d.jsonl", content)

    assert parsed.encoding == "utf-32"
    assert parsed.examples[2] == Example("p2", "c2")


@pytest.mark.parametrize(
    ("rows", "codec", "expected"),
    [(FRENCH, "cp1252", "cp1252"), (CHINESE, "gbk", "gb18030"), (JAPANESE, "shift_jis", "cp932")],
    ids=["french-cp1252", "chinese-gbk", "japanese-shift-jis"],
)
def test_legacy_encoding_detected_and_converted(
    tmp_path: Path, rows: list[tuple[str, str]], codec: str, expected: str
) -> None:
    parsed = parse_bytes(tmp_path, "d.csv", csv_text(rows).encode(codec))

    assert parsed.encoding == expected
    assert parsed.encoding_detected
    assert parsed.examples == pair_examples(rows)


def test_converted_file_keeps_line_numbers(tmp_path: Path) -> None:
    content = (csv_text(FRENCH) + "seul\r\n").encode("cp1252")

    with pytest.raises(DatasetInvalid) as raised:
        parse_bytes(tmp_path, "d.csv", content)

    problem = raised.value.problems[0]
    assert problem.code == "wrong_field_count"
    assert problem.line == len(FRENCH) + 2


def test_utf8_bom_reported(tmp_path: Path) -> None:
    parsed = parse_bytes(tmp_path, "d.jsonl", codecs.BOM_UTF8 + jsonl(PAIR_LINE).encode())

    assert parsed.encoding == "utf-8-sig"
    assert parsed.examples == [Example("p", "c")]


def test_surrogate_pair_escape_accepted(tmp_path: Path) -> None:
    parsed = parse_bytes(tmp_path, "d.jsonl", b'{"prompt": "smile", "completion": "\\ud83d\\ude00"}\n')

    assert parsed.examples == [Example("smile", "\U0001f600")]


# Line endings.


def test_mixed_line_endings(tmp_path: Path) -> None:
    content = "one\r\ntwo\rthree\n\r\nfour\r\rfive\n".encode()

    parsed = parse_bytes(tmp_path, "d.txt", content)

    assert parsed.examples == [Example("", "one\ntwo\nthree"), Example("", "four"), Example("", "five")]


def test_crlf_split_across_chunks(tmp_path: Path) -> None:
    # The CR ends the first chunk and the LF starts the second; they must end one line.
    first = "a" * (CHUNK_BYTES - 1) + "\r"
    content = (first + "\nb\r\n\r\nc\r\n").encode()

    parsed = parse_bytes(tmp_path, "d.txt", content)

    assert parsed.examples == [Example("", "a" * (CHUNK_BYTES - 1) + "\nb"), Example("", "c")]


# A raw chunk, its decoded text and the list of its lines: a few times CHUNK_BYTES, however
# large the file.
READER_PEAK_LIMIT = 16 * CHUNK_BYTES


def reader_peak_bytes(path: Path, *, compressed: bool = False) -> tuple[int, int]:
    """Return (lines read, peak bytes traced by tracemalloc) for reading `path` with LineReader."""
    reader = LineReader(path, ProblemList(50), compressed=compressed)
    tracemalloc.start()
    try:
        count = sum(1 for _ in reader)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return count, peak


def test_lone_cr_file_read_in_chunks(tmp_path: Path) -> None:
    path = tmp_path / "lone-cr.txt"
    line = "a line that ends with a carriage return only"
    with path.open("w", encoding="utf-8", newline="") as handle:
        for _ in range(200_000):
            handle.write(line + "\r")

    count, peak = reader_peak_bytes(path)

    assert path.stat().st_size >= 9_000_000
    assert count == 200_000
    assert peak < READER_PEAK_LIMIT


def test_gzip_read_in_chunks(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for line in pair_lines(300_000):
            handle.write(line + "\n")

    count, peak = reader_peak_bytes(path, compressed=True)

    assert count == 300_000
    assert peak < READER_PEAK_LIMIT


# Compression.


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("d.jsonl", jsonl(*pair_lines(12))),
        ("d.csv", "prompt,completion\n" + "".join(f"p{i},c{i}\n" for i in range(12))),
        ("d.tsv", "prompt\tcompletion\n" + "".join(f"p{i}\tc{i}\n" for i in range(12))),
        ("d.txt", "".join(f"c{i}\n\n" for i in range(12))),
    ],
)
def test_gzip_matches_plain(tmp_path: Path, name: str, content: str) -> None:
    compressed = gzip.compress(content.encode())

    plain = parse_bytes(tmp_path, name, content.encode())
    packed = parse_bytes(tmp_path, name + ".gz", compressed)

    assert packed.examples == plain.examples
    assert packed.format == plain.format
    assert packed.compression == "gzip"
    assert plain.compression == ""
    assert packed.sha256 == hashlib.sha256(compressed).hexdigest()
    assert packed.size_bytes == len(compressed)


def test_gzip_recognized_without_gz_name(tmp_path: Path) -> None:
    parsed = parse_bytes(tmp_path, "d.jsonl", gzip.compress(jsonl(*pair_lines(3)).encode()))

    assert parsed.compression == "gzip"
    assert len(parsed.examples) == 3


def test_gzip_utf16_csv(tmp_path: Path) -> None:
    content = gzip.compress(codecs.BOM_UTF16_LE + csv_text(CHINESE).encode("utf-16-le"))

    parsed = parse_bytes(tmp_path, "d.csv.gz", content)

    assert parsed.encoding == "utf-16"
    assert parsed.examples == pair_examples(CHINESE)


# CSV and TSV dialects.


def test_tsv_pairs_with_quoted_multiline(tmp_path: Path) -> None:
    content = 'source\ttarget\n"two\nlines"\tplain\nwith, comma\t"tab\there"\n'

    parsed = parse_bytes(tmp_path, "d.tsv", content.encode())

    assert parsed.format == "tsv"
    assert parsed.delimiter == "\t"
    assert parsed.examples == [Example("two\nlines", "plain"), Example("with, comma", "tab\there")]


def test_excel_semicolon_csv(tmp_path: Path) -> None:
    # As Excel saves "CSV UTF-8" where the comma is the decimal separator.
    content = codecs.BOM_UTF8 + 'Prompt;Completion\r\n"Line one\r\nline two";"1,5 litres; please"\r\nx;y\r\n'.encode()

    parsed = parse_bytes(tmp_path, "d.csv", content)

    assert parsed.delimiter == ";"
    assert parsed.examples == [Example("Line one\nline two", "1,5 litres; please"), Example("x", "y")]


def test_excel_separator_line(tmp_path: Path) -> None:
    parsed = parse_bytes(tmp_path, "d.csv", b"sep=|\r\nprompt|completion\r\na,b|c;d\r\n")

    assert parsed.delimiter == "|"
    assert parsed.examples == [Example("a,b", "c;d")]


def test_tab_delimited_csv_name(tmp_path: Path) -> None:
    parsed = parse_bytes(tmp_path, "d.csv", b"text\textra\nignored\tcolumn\n", options=IngestOptions(completion_column="text"))

    assert parsed.delimiter == "\t"
    assert parsed.examples == [Example("", "ignored")]


# Chat conversations.


def test_chat_rendered_as_pair(tmp_path: Path) -> None:
    conversation = {
        "id": 7,
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Italy?\r\nThanks."},
            {"role": "assistant", "content": "Rome."},
        ],
    }

    parsed = parse_bytes(tmp_path, "d.jsonl", (json.dumps(conversation) + "\n").encode())

    assert parsed.shape == SHAPE_CHAT
    assert parsed.examples == [
        Example(
            "System: Answer briefly.\nUser: Capital of France?\nAssistant: Paris.\n"
            "User: And of Italy?\nThanks.\nAssistant:",
            "Rome.",
        )
    ]


def test_render_chat_single_turn() -> None:
    assert render_chat([("user", "Hi"), ("assistant", "Hello")]) == Example("User: Hi\nAssistant:", "Hello")


def test_shapes_reported(tmp_path: Path) -> None:
    pairs = parse_bytes(tmp_path, "d.jsonl", jsonl(PAIR_LINE).encode())
    text = parse_bytes(tmp_path, "d.csv", b"text\nhello\n")

    assert pairs.shape == SHAPE_PAIRS
    assert text.shape == SHAPE_TEXT


# Column options.


def test_jsonl_mapped_keys(tmp_path: Path) -> None:
    content = jsonl('{"question": "Q1", "answer": "A1", "source": 3}', '{"answer": "A2", "question": "Q2"}')
    options = IngestOptions(prompt_column="question", completion_column="answer")

    parsed = parse_bytes(tmp_path, "d.jsonl", content.encode(), options=options)

    assert parsed.examples == [Example("Q1", "A1"), Example("Q2", "A2")]


def test_csv_mapped_columns_ignore_others(tmp_path: Path) -> None:
    content = "id, Question ,ANSWER,notes\n1,q1,a1,\n2,q2,a2,seen\n"
    options = IngestOptions(prompt_column="question", completion_column="answer")

    parsed = parse_bytes(tmp_path, "d.csv", content.encode(), options=options)

    assert parsed.examples == [Example("q1", "a1"), Example("q2", "a2")]
    assert parsed.shape == SHAPE_PAIRS


def test_completion_column_alone_makes_text(tmp_path: Path) -> None:
    options = IngestOptions(completion_column="body")

    parsed = parse_bytes(tmp_path, "d.csv", b"title,body\nt1,first\nt2,second\n", options=options)

    assert parsed.examples == [Example("", "first"), Example("", "second")]
    assert parsed.shape == SHAPE_TEXT


# Duplicates.


def test_duplicates_dropped_on_request(tmp_path: Path) -> None:
    content = jsonl(PAIR_LINE, '{"prompt": "x", "completion": "y"}', PAIR_LINE, PAIR_LINE)

    parsed = parse_bytes(tmp_path, "d.jsonl", content.encode(), options=IngestOptions(drop_duplicates=True))

    assert parsed.duplicates == 2
    assert parsed.examples == [Example("p", "c"), Example("x", "y")]


def test_dropping_duplicates_can_leave_too_few(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(jsonl(*[PAIR_LINE] * 12), encoding="utf-8")

    with pytest.raises(DatasetInvalid) as raised:
        parse_dataset(path, "d.jsonl", options=IngestOptions(drop_duplicates=True))

    problem = raised.value.problems[0]
    assert problem.code == "too_few_examples"
    assert problem.params == {"count": 1, "minimum": 10}
