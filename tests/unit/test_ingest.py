"""Tests for dataset parsing, validation and the train/validation split."""

from __future__ import annotations

import csv
import hashlib
import random
import re
from pathlib import Path
from typing import Any

import pytest

from tests.ingest_cases import INVALID_CASES, PAIR_LINE, TEXT_LINE, Case, jsonl, pair_lines
from training_app.ingest import (
    MESSAGE_TEMPLATES,
    DatasetInvalid,
    Example,
    IngestOptions,
    ParsedDataset,
    parse_dataset,
    split_examples,
)


def write_file(folder: Path, name: str, content: str | bytes) -> Path:
    path = folder / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def parse_content(
    folder: Path, name: str, content: str | bytes, **options: Any
) -> ParsedDataset:
    options.setdefault("min_examples", 1)
    return parse_dataset(write_file(folder, name, content), name, **options)


def parse_problems(
    folder: Path, name: str, content: str | bytes, **options: Any
) -> DatasetInvalid:
    with pytest.raises(DatasetInvalid) as raised:
        parse_content(folder, name, content, **options)
    return raised.value


def case_problems(folder: Path, case: Case, tokenizer: Any) -> DatasetInvalid:
    return parse_problems(
        folder,
        case.name,
        case.data(),
        options=IngestOptions(**case.options),
        tokenizer=tokenizer if case.needs_tokenizer else None,
    )


@pytest.mark.parametrize("case", INVALID_CASES, ids=[case.id for case in INVALID_CASES])
def test_invalid_input_reports_code_and_line(tmp_path: Path, case: Case, gpt2_tokenizer: Any) -> None:
    invalid = case_problems(tmp_path, case, gpt2_tokenizer)

    first = invalid.problems[0]
    assert first.code == case.code
    assert first.line == case.line
    assert first.message == MESSAGE_TEMPLATES[case.code] % first.params


def test_invalid_case_ids_distinct() -> None:
    ids = [case.id for case in INVALID_CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 40


def test_every_code_has_invalid_case() -> None:
    tested_codes = {case.code for case in INVALID_CASES}
    assert tested_codes == set(MESSAGE_TEMPLATES)


def test_template_placeholders_match_reported_params(tmp_path: Path, gpt2_tokenizer: Any) -> None:
    for case in INVALID_CASES:
        invalid = case_problems(tmp_path, case, gpt2_tokenizer)
        placeholders = set(re.findall(r"%\((\w+)\)s", MESSAGE_TEMPLATES[case.code]))
        assert set(invalid.problems[0].params) == placeholders, case.id


def test_missing_key_message_names_key(tmp_path: Path) -> None:
    content = jsonl(*[PAIR_LINE] * 6, '{"prompt": "a"}')

    problem = parse_problems(tmp_path, "d.jsonl", content).problems[0]

    assert problem.params == {"line": 7, "key": "completion"}
    assert problem.message == (
        'Line 7: the key "completion" is missing; '
        'each JSON line needs "prompt" and "completion", or "text".'
    )


def test_invalid_encoding_reports_column_and_byte(tmp_path: Path) -> None:
    content = "ok\n\n".encode() + "éa".encode() + b"\xff\n"

    problem = parse_problems(tmp_path, "d.txt", content).problems[0]

    assert problem.params == {"line": 3, "column": 3, "byte": "0xFF"}


def test_invalid_json_reports_column(tmp_path: Path) -> None:
    problem = parse_problems(tmp_path, "d.jsonl", '{"prompt": "a",, }\n').problems[0]

    assert problem.params["column"] == 16
    assert problem.params["error"] == "Expecting property name enclosed in double quotes"


def test_unknown_keys_lists_found_keys(tmp_path: Path) -> None:
    problem = parse_problems(tmp_path, "d.jsonl", '{"question": "a", "answer": "b"}\n').problems[0]

    assert problem.params["keys"] == '["question", "answer"]'


def test_mixed_formats_names_both_shapes(tmp_path: Path) -> None:
    problem = parse_problems(tmp_path, "d.jsonl", jsonl("", TEXT_LINE, PAIR_LINE)).problems[0]

    assert problem.params == {
        "line": 3,
        "shape": '"prompt" and "completion"',
        "first_line": 2,
        "first_shape": '"text"',
    }


def test_all_problems_on_one_line_reported(tmp_path: Path) -> None:
    invalid = parse_problems(tmp_path, "d.jsonl", jsonl('{"prompt": 1, "completion": ""}'))

    assert [(problem.code, problem.line) for problem in invalid.problems] == [
        ("non_string_value", 1),
        ("empty_field", 1),
    ]


def test_problems_reported_in_file_order(tmp_path: Path) -> None:
    content = jsonl(PAIR_LINE, "[1]", PAIR_LINE, "{oops", '{"prompt": "a"}')

    invalid = parse_problems(tmp_path, "d.jsonl", content)

    assert [problem.line for problem in invalid.problems] == [2, 4, 5]
    assert invalid.total_problems == 3


def test_too_few_examples_counts_records(tmp_path: Path) -> None:
    invalid = parse_problems(tmp_path, "d.jsonl", jsonl(*pair_lines(3)), min_examples=10)

    assert len(invalid.problems) == 1
    assert invalid.problems[0].params == {"count": 3, "minimum": 10}


def test_too_few_examples_counts_invalid_records(tmp_path: Path) -> None:
    content = jsonl(*pair_lines(3), "{bad")

    invalid = parse_problems(tmp_path, "d.jsonl", content, min_examples=4)

    assert [problem.code for problem in invalid.problems] == ["invalid_json"]


def test_max_problems_caps_list_not_total(tmp_path: Path) -> None:
    content = jsonl(*pair_lines(20), *["{bad"] * 80)

    invalid = parse_problems(tmp_path, "d.jsonl", content, max_problems=50)

    assert len(invalid.problems) == 50
    assert invalid.total_problems == 80
    assert invalid.problems[-1].line == 70
    assert "and 77 more problems" in str(invalid)


def test_max_problems_default_is_fifty(tmp_path: Path) -> None:
    invalid = parse_problems(tmp_path, "d.csv", "text\n" + ",\n" * 120)

    assert len(invalid.problems) == 50
    assert invalid.total_problems == 120


def test_unsupported_extension_names_file(tmp_path: Path) -> None:
    path = write_file(tmp_path, "upload.bin", jsonl(PAIR_LINE))

    with pytest.raises(DatasetInvalid) as raised:
        parse_dataset(path, "folder/My Data.xlsx")

    assert raised.value.problems[0].params == {"name": "My Data.xlsx"}


# Valid inputs.


def test_jsonl_pairs_parse(tmp_path: Path) -> None:
    content = jsonl(
        '{"prompt": "Hello", "completion": "Bonjour"}',
        "",
        '{"prompt": "a\\nb", "completion": "ünï €", "id": 3}',
    )

    parsed = parse_content(tmp_path, "d.jsonl", content)

    assert parsed.format == "jsonl"
    assert parsed.encoding == "utf-8"
    assert parsed.examples == [Example("Hello", "Bonjour"), Example("a\nb", "ünï €")]
    assert parsed.duplicates == 0


def test_jsonl_text_only_parse(tmp_path: Path) -> None:
    parsed = parse_content(tmp_path, "d.jsonl", jsonl('{"text": "one"}', '{"text": "two"}'))

    assert parsed.examples == [Example("", "one"), Example("", "two")]


def test_extension_case_insensitive(tmp_path: Path) -> None:
    path = write_file(tmp_path, "stored.bin", jsonl(PAIR_LINE))

    parsed = parse_dataset(path, "Data.JSONL", min_examples=1)

    assert parsed.format == "jsonl"


def test_bom_stripped_and_reported(tmp_path: Path) -> None:
    content = b"\xef\xbb\xbf" + "Prompt,Completion\r\na,b\r\n".encode()

    parsed = parse_content(tmp_path, "d.csv", content)

    assert parsed.encoding == "utf-8-sig"
    assert parsed.examples == [Example("a", "b")]


def test_bom_jsonl_first_line_parses(tmp_path: Path) -> None:
    parsed = parse_content(tmp_path, "d.jsonl", b"\xef\xbb\xbf" + jsonl(PAIR_LINE).encode())

    assert parsed.examples == [Example("p", "c")]


def test_crlf_and_lone_cr_normalized(tmp_path: Path) -> None:
    content = (
        '{"prompt": "a\\r\\nb", "completion": "c\\rd"}\r\n'
        '{"prompt": "e", "completion": "f"}\r'
    )

    parsed = parse_content(tmp_path, "d.jsonl", content)

    assert parsed.examples == [Example("a\nb", "c\nd"), Example("e", "f")]


def test_text_blocks_with_crlf(tmp_path: Path) -> None:
    content = "first line\r\nsecond line\r\n\r\n\r\n  \r\nnext block\rend\r\n"

    parsed = parse_content(tmp_path, "d.txt", content)

    assert parsed.format == "text"
    assert parsed.examples == [
        Example("", "first line\nsecond line"),
        Example("", "next block\nend"),
    ]


def test_text_keeps_indentation_without_final_newline(tmp_path: Path) -> None:
    parsed = parse_content(tmp_path, "d.txt", "\n\n  indented\n\tline\n\nlast")

    assert parsed.examples == [Example("", "  indented\n\tline"), Example("", "last")]


def test_csv_quoted_multiline_field(tmp_path: Path) -> None:
    content = 'prompt,completion\n"Roses, red","line one\n\nline ""three"""\nplain,text\n'

    parsed = parse_content(tmp_path, "d.csv", content)

    assert parsed.format == "csv"
    assert parsed.examples == [
        Example("Roses, red", 'line one\n\nline "three"'),
        Example("plain", "text"),
    ]


def test_csv_multiline_field_with_crlf(tmp_path: Path) -> None:
    content = 'source,target\r\n"a\r\nb",c\r\n'

    parsed = parse_content(tmp_path, "d.csv", content)

    assert parsed.examples == [Example("a\nb", "c")]


def test_csv_source_target_mapped(tmp_path: Path) -> None:
    content = " Source , TARGET \nA dog runs.,Un chien court.\n"

    parsed = parse_content(tmp_path, "d.csv", content)

    assert parsed.examples == [Example("A dog runs.", "Un chien court.")]


def test_csv_columns_in_any_order(tmp_path: Path) -> None:
    parsed = parse_content(tmp_path, "d.csv", "target,source\nsortie,entrée\n")

    assert parsed.examples == [Example("entrée", "sortie")]


def test_csv_text_column(tmp_path: Path) -> None:
    parsed = parse_content(tmp_path, "d.csv", 'TEXT\nsome words\n"with, comma"\n\n')

    assert parsed.examples == [Example("", "some words"), Example("", "with, comma")]


def test_csv_written_by_csv_module_roundtrips(tmp_path: Path) -> None:
    rows = [("a, b", 'say "hi"'), ("multi\nline", "x"), ("ü", "€")]
    path = tmp_path / "d.csv"
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("prompt", "completion"))
        writer.writerows(rows)

    parsed = parse_dataset(path, "d.csv", min_examples=1)

    assert parsed.examples == [Example(prompt, completion) for prompt, completion in rows]


def test_duplicates_counted_and_kept(tmp_path: Path) -> None:
    content = jsonl(PAIR_LINE, '{"prompt": "x", "completion": "y"}', PAIR_LINE, PAIR_LINE)

    parsed = parse_content(tmp_path, "d.jsonl", content)

    assert parsed.duplicates == 2
    assert len(parsed.examples) == 4


def test_text_duplicates_counted(tmp_path: Path) -> None:
    parsed = parse_content(tmp_path, "d.txt", "a\nb\n\nc\n\na\nb\n\na\nb\n")

    assert parsed.duplicates == 2
    assert len(parsed.examples) == 4


def test_sha256_and_size_of_raw_bytes(tmp_path: Path) -> None:
    content = b"\xef\xbb\xbf" + "prompt,completion\r\na,b\r\n".encode()

    parsed = parse_content(tmp_path, "d.csv", content)

    assert parsed.sha256 == hashlib.sha256(content).hexdigest()
    assert parsed.size_bytes == len(content)


def test_min_examples_default_is_ten(tmp_path: Path) -> None:
    path = write_file(tmp_path, "d.jsonl", jsonl(*pair_lines(10)))

    parsed = parse_dataset(path, "d.jsonl")

    assert len(parsed.examples) == 10


# Train/validation split.


def make_examples(count: int) -> list[Example]:
    return [Example(f"prompt {i}", f"completion {i}") for i in range(count)]


def test_split_deterministic() -> None:
    examples = make_examples(200)

    assert split_examples(examples, seed=3) == split_examples(examples, seed=3)


def test_split_independent_of_order() -> None:
    examples = make_examples(200)
    shuffled = list(examples)
    random.Random(1).shuffle(shuffled)

    train, validation = split_examples(examples, seed=5)
    shuffled_train, shuffled_validation = split_examples(shuffled, seed=5)

    assert set(train) == set(shuffled_train)
    assert set(validation) == set(shuffled_validation)


def test_split_preserves_file_order() -> None:
    examples = make_examples(100)
    position = {example: index for index, example in enumerate(examples)}

    train, validation = split_examples(examples)

    assert [position[example] for example in train] == sorted(position[e] for e in train)
    assert [position[example] for example in validation] == sorted(
        position[e] for e in validation
    )
    assert len(train) + len(validation) == 100


def test_split_fraction_of_examples() -> None:
    train, validation = split_examples(make_examples(1000), validation_fraction=0.2)

    assert len(validation) == 200
    assert len(train) == 800


def test_split_depends_on_seed() -> None:
    examples = make_examples(100)

    assert split_examples(examples, seed=0)[1] != split_examples(examples, seed=1)[1]


def test_split_duplicates_on_same_side() -> None:
    base = make_examples(50)
    examples = base + base[:25] + base[:10]

    for seed in range(20):
        train, validation = split_examples(examples, seed=seed)
        assert not set(train) & set(validation), seed
        assert len(train) + len(validation) == len(examples)


def test_split_two_examples_both_sides() -> None:
    train, validation = split_examples(make_examples(2))

    assert len(train) == 1
    assert len(validation) == 1


def test_split_small_sets_never_empty() -> None:
    for count in range(2, 30):
        for fraction in (0.01, 0.1, 0.5, 0.99):
            train, validation = split_examples(make_examples(count), validation_fraction=fraction)
            assert train, (count, fraction)
            assert validation, (count, fraction)


def test_split_single_distinct_example() -> None:
    examples = [Example("same", "text")] * 5

    train, validation = split_examples(examples)

    assert len(train) == 4
    assert len(validation) == 1


def test_split_one_example_goes_to_train() -> None:
    assert split_examples(make_examples(1)) == (make_examples(1), [])


def test_split_rejects_bad_fraction() -> None:
    with pytest.raises(ValueError):
        split_examples(make_examples(10), validation_fraction=1.0)
    with pytest.raises(ValueError):
        split_examples(make_examples(10), validation_fraction=0.0)


# Real public datasets.

# Example and duplicate counts as listed in the datasets' PROVENANCE.md. The .txt count is
# the number of blank-line-separated blocks.
REAL_DATASETS = {
    "poems_A1.jsonl": ("jsonl", 288, 0),
    "poems_A2.jsonl": ("jsonl", 114, 0),
    "tang_poems.jsonl": ("jsonl", 1500, 0),
    "translate_B1.csv": ("csv", 4000, 0),
    "tinyshakespeare.txt": ("text", 5926, 59),
}


@pytest.mark.parametrize("name", sorted(REAL_DATASETS))
def test_real_dataset_parses(shared_datasets: Path, name: str) -> None:
    expected_format, expected_count, expected_duplicates = REAL_DATASETS[name]
    path = shared_datasets / name

    parsed = parse_dataset(path, name)

    assert parsed.format == expected_format
    assert len(parsed.examples) == expected_count
    assert parsed.duplicates == expected_duplicates
    assert parsed.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert parsed.size_bytes == path.stat().st_size


def test_real_datasets_folder_fully_covered(shared_datasets: Path) -> None:
    data_files = {path.name for path in shared_datasets.iterdir() if path.suffix != ".md"}

    assert data_files == set(REAL_DATASETS)


def test_real_translation_maps_source_target(shared_datasets: Path) -> None:
    path = shared_datasets / "translate_B1.csv"
    with path.open(encoding="utf-8", newline="") as handle:
        first_row = next(row for index, row in enumerate(csv.reader(handle)) if index == 1)

    parsed = parse_dataset(path, "translate_B1.csv")

    assert parsed.examples[0] == Example(first_row[0], first_row[1])
