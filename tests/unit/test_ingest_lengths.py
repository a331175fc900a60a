"""Token counts, truncation, duplicates, split sizes and statistics of `ingest_dataset`."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.ingest_cases import PAIR_LINE, jsonl, pair_lines
from training_app.ingest import (
    DatasetInvalid,
    Example,
    IngestOptions,
    IngestReport,
    ingest_dataset,
    read_prepared_examples,
    split_examples,
)
from training_app.ingest_stats import HISTOGRAM_BINS, ExampleIndex
from training_app.trainer_data import tokenize_examples

WORDS = "the cat sat on a mat while rain fell over quiet hills and rivers".split()


def random_examples(count: int, seed: int, max_words: int = 60) -> list[Example]:
    generator = random.Random(seed)

    def text(low: int, high: int) -> str:
        return " ".join(generator.choice(WORDS) for _ in range(generator.randint(low, high)))

    return [Example(text(1, 8), text(1, max_words)) for _ in range(count)]


def write_jsonl(path: Path, examples: list[Example]) -> Path:
    lines = [json.dumps({"prompt": example.prompt, "completion": example.completion}) for example in examples]
    path.write_text(jsonl(*lines), encoding="utf-8")
    return path


def ingest(folder: Path, tokenizer: Any, source: Path, **options: Any) -> tuple[IngestReport, list[Example]]:
    output = folder / "prepared.jsonl"
    report = ingest_dataset(
        source, source.name, output, tokenizer=tokenizer, options=IngestOptions(**options), min_examples=1
    )
    return report, read_prepared_examples(output)


def trainer_lengths(tokenizer: Any, examples: list[Example]) -> list[int]:
    return [len(tokenized) for tokenized in tokenize_examples(tokenizer, examples, max_length=1024)]


def test_token_stats_match_trainer(tmp_path: Path, gpt2_tokenizer: Any) -> None:
    examples = random_examples(300, seed=1)
    source = write_jsonl(tmp_path / "d.jsonl", examples)

    report, stored = ingest(tmp_path, gpt2_tokenizer, source)

    lengths = sorted(trainer_lengths(gpt2_tokenizer, examples))
    assert stored == examples
    assert report.tokens.total == sum(lengths)
    assert report.tokens.max == lengths[-1]
    assert report.tokens.mean == pytest.approx(sum(lengths) / len(lengths))
    assert report.tokens.p95 == lengths[math.ceil(0.95 * len(lengths)) - 1]
    assert sum(report.tokens.histogram) == 300
    assert len(report.tokens.histogram) <= HISTOGRAM_BINS
    assert report.tokens.bin_width * len(report.tokens.histogram) > report.tokens.max


def test_truncation_fits_trainer_without_eos(tmp_path: Path, gpt2_tokenizer: Any) -> None:
    examples = random_examples(80, seed=2, max_words=120)
    source = write_jsonl(tmp_path / "d.jsonl", examples)

    report, stored = ingest(tmp_path, gpt2_tokenizer, source, max_length=48, on_too_long="truncate")

    original_lengths = trainer_lengths(gpt2_tokenizer, examples)
    expected_truncated = sum(length > 48 for length in original_lengths)
    assert expected_truncated > 10
    assert report.num_truncated == expected_truncated
    assert sum(example.truncated for example in stored) == expected_truncated
    assert report.tokens.max <= 48

    tokenized = tokenize_examples(gpt2_tokenizer, stored, max_length=48)
    for original, example, result in zip(examples, stored, tokenized):
        assert example.prompt == original.prompt
        assert original.completion.startswith(example.completion)
        assert not result.truncated, "a cut example must fit the length it was cut to"
        if example.truncated:
            assert result.input_ids[-1] != gpt2_tokenizer.eos_token_id
        else:
            assert result.input_ids[-1] == gpt2_tokenizer.eos_token_id


def test_too_long_examples_listed_in_file_order(tmp_path: Path, gpt2_tokenizer: Any) -> None:
    long_line = json.dumps({"prompt": "p", "completion": "word " * 30})
    source = tmp_path / "d.jsonl"
    source.write_text(jsonl(PAIR_LINE, long_line, "{bad", long_line, PAIR_LINE), encoding="utf-8")

    with pytest.raises(DatasetInvalid) as raised:
        ingest(tmp_path, gpt2_tokenizer, source, max_length=16)

    problems = [(problem.code, problem.line) for problem in raised.value.problems]
    assert problems == [("too_long", 2), ("invalid_json", 3), ("too_long", 4)]
    assert raised.value.problems[0].params == {"line": 2, "tokens": 34, "maximum": 16}


def test_duplicates_dropped_from_prepared_file(tmp_path: Path, gpt2_tokenizer: Any) -> None:
    examples = random_examples(40, seed=3)
    with_copies = examples[:5] + examples + examples[10:20]
    source = write_jsonl(tmp_path / "d.jsonl", with_copies)

    report, stored = ingest(tmp_path, gpt2_tokenizer, source, drop_duplicates=True)

    assert report.num_duplicates == 15
    assert report.duplicates_dropped
    assert report.num_examples == 40
    assert stored == examples[:5] + examples[5:]
    assert [row.prompt for row in report.preview] == [example.prompt for example in stored[:10]]
    assert report.tokens.total == sum(trainer_lengths(gpt2_tokenizer, stored))


def test_duplicates_kept_by_default(tmp_path: Path, gpt2_tokenizer: Any) -> None:
    examples = random_examples(20, seed=4)
    source = write_jsonl(tmp_path / "d.jsonl", examples + examples[:3])

    report, stored = ingest(tmp_path, gpt2_tokenizer, source)

    assert report.num_duplicates == 3
    assert report.num_examples == 23
    assert stored == examples + examples[:3]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_sizes_match_split_examples(tmp_path: Path, gpt2_tokenizer: Any, seed: int) -> None:
    examples = random_examples(150, seed=seed)
    examples += examples[:30]
    source = write_jsonl(tmp_path / "d.jsonl", examples)

    report, stored = ingest(tmp_path, gpt2_tokenizer, source)

    train, validation = split_examples(stored, seed=0)
    assert (report.num_train, report.num_validation) == (len(train), len(validation))
    assert not set(train) & set(validation)


def test_split_sizes_small_counts() -> None:
    for count in range(0, 40):
        for copies in (0, 3):
            examples = [Example(f"p{i}", f"c{i}") for i in range(count)] + [Example("p0", "c0")] * copies
            index = ExampleIndex(seed=5)
            for example in examples:
                index.add(example.prompt, example.completion, 1)
            for fraction in (0.01, 0.1, 0.5):
                keep = np.ones(len(examples), dtype=bool)
                train, validation = split_examples(examples, seed=5, validation_fraction=fraction)
                assert index.split_sizes(keep, fraction) == (len(train), len(validation)), (count, copies, fraction)


def test_preview_rows_have_tokens(tmp_path: Path, gpt2_tokenizer: Any) -> None:
    source = tmp_path / "d.jsonl"
    source.write_text(jsonl(*pair_lines(25)), encoding="utf-8")

    report, stored = ingest(tmp_path, gpt2_tokenizer, source)

    assert len(report.preview) == 10
    assert report.preview[3].prompt == "p3"
    assert report.preview[3].tokens == trainer_lengths(gpt2_tokenizer, stored[3:4])[0]


def test_converted_encoding_stored_as_utf8(tmp_path: Path, gpt2_tokenizer: Any) -> None:
    rows = [(f"Question {i} : où ?", f"Réponse {i} : à côté de l’église et près du café.") for i in range(12)]
    source = tmp_path / "d.csv"
    source.write_bytes(("prompt,completion\r\n" + "".join(f"{p},{c}\r\n" for p, c in rows)).encode("cp1252"))

    report, stored = ingest(tmp_path, gpt2_tokenizer, source)

    assert report.encoding == "cp1252"
    assert report.encoding_detected
    assert stored == [Example(prompt, completion) for prompt, completion in rows]
