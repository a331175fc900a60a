"""Tests of the LoRA training loop on the tiny GPT-2 with small generated data.

The tiny base has random weights and 128-wide tied embeddings, so its logits are small: even
a perfect adapter cannot push a single token's loss much below about 8.3 nats, against about
10.9 for the bare base. The thresholds below are set with that ceiling in mind.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapters_app.serving.base import load_base_model
from training_app.trainer import (
    ConfigError,
    Progress,
    TrainingCancelled,
    TrainingConfig,
    TrainingError,
    TrainingResult,
    evaluate_adapter,
    prepare_lora_model,
    train_lora,
)
from training_app.trainer_data import (
    IGNORE_INDEX,
    collate,
    length_grouped_batches,
    token_loss_sum,
    tokenize_examples,
)

ENGLISH = "zero one two three four five six seven eight nine".split()
SPANISH = "cero uno dos tres cuatro cinco seis siete ocho nueve".split()

# Settings that move the tiny model clearly within a few seconds on a laptop CPU.
FAST_CONFIG = dict(rank=16, alpha=32, learning_rate=3e-3, epochs=20, batch_size=8)


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str


def spelled_digits(count: int, words: list[str], seed: int) -> list[Example]:
    """Return examples like "3 1 4" -> "three one four", generated from `seed`."""
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        digits = [rng.randrange(10) for _ in range(rng.randint(2, 5))]
        examples.append(
            Example(" ".join(map(str, digits)), " ".join(words[digit] for digit in digits))
        )
    return examples


ENGLISH_TRAIN = spelled_digits(40, ENGLISH, seed=1)
ENGLISH_EVAL = {"english": spelled_digits(12, ENGLISH, seed=2)}
SPANISH_TRAIN = spelled_digits(40, SPANISH, seed=3)
SPANISH_EVAL = {"spanish": spelled_digits(12, SPANISH, seed=4)}


@pytest.fixture(scope="module")
def tokenizer(tiny_base_dir: Path):
    return load_base_model(str(tiny_base_dir)).tokenizer


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="module")
def english_run(tiny_base_dir: Path, adapters_dir: Path) -> tuple[TrainingResult, list[Progress]]:
    """Fresh adapter trained on English spelled digits, with every progress report."""
    reports: list[Progress] = []
    result = train_lora(
        tiny_base_dir,
        ENGLISH_TRAIN,
        ENGLISH_EVAL,
        TrainingConfig(**FAST_CONFIG),
        adapters_dir / "english",
        on_progress=reports.append,
        progress_every=7,
    )
    return result, reports


@pytest.fixture(scope="module")
def spanish_run(tiny_base_dir: Path, adapters_dir: Path, english_run) -> TrainingResult:
    """Adapter warm-started from the English one and trained on Spanish spelled digits.

    The config requests rank 4 and only c_attn, which a warm start must ignore in favour of
    the parent's settings.
    """
    config = TrainingConfig(
        **{**FAST_CONFIG, "epochs": 10, "rank": 4, "target_modules": ("c_attn",)}
    )
    return train_lora(
        tiny_base_dir,
        SPANISH_TRAIN,
        SPANISH_EVAL,
        config,
        adapters_dir / "spanish",
        init_adapter_dir=english_run[0].output_dir,
    )


# ---------------------------------------------------------------------------------------------
# Fresh training
# ---------------------------------------------------------------------------------------------


def test_fresh_training_beats_base(english_run) -> None:
    result, _ = english_run

    assert result.base_eval_loss["english"] > 10.0
    assert result.eval_loss["english"] < result.base_eval_loss["english"] - 1.0
    assert result.initial_eval_loss is None
    assert result.steps == 5 * 20
    assert len(result.train_loss) == result.steps
    assert result.train_loss[-1][1] < result.train_loss[0][1]


def test_fresh_training_reports_progress(english_run) -> None:
    result, reports = english_run

    # Every 7th step, plus the final step, which 7 does not divide.
    # Validation points come about eight times per run, on top of the regular reports.
    evaluated = [report.step for report in reports if report.eval_loss is not None]
    assert evaluated == [*range(13, 100, 13), 100]
    steps = [report.step for report in reports]
    assert steps == sorted(set([*range(7, 100, 7), 100, *evaluated]))
    assert all(0 < report.eval_loss < 20 for report in reports if report.eval_loss is not None)
    assert all(report.total_steps == 100 for report in reports)
    assert reports[-1].epoch == 20
    assert reports[-1].tokens_seen == result.tokens_seen
    assert reports[0].learning_rate < FAST_CONFIG["learning_rate"]
    assert reports[-1].elapsed_seconds > 0


def test_fresh_training_writes_adapter(english_run) -> None:
    result, _ = english_run
    output_dir = result.output_dir

    assert (output_dir / "adapter_model.safetensors").stat().st_size == result.adapter_bytes
    assert (output_dir / "adapter_config.json").is_file()
    assert len(result.adapter_sha256) == 64
    leftovers = [path.name for path in output_dir.parent.iterdir() if path.name.startswith(".")]
    assert leftovers == []


def test_training_record_contents(english_run) -> None:
    result, _ = english_run
    record = json.loads((result.output_dir / "training_record.json").read_text())

    assert record["adapter_sha256"] == result.adapter_sha256
    assert record["hyperparameters"] == TrainingConfig(**FAST_CONFIG).to_dict()
    assert record["base_model"]["weight_hash"] == result.base_weight_hash
    assert record["parent_adapter"] is None
    assert set(record["versions"]) == {"torch", "transformers", "peft"}
    assert record["seed"] == 0
    assert record["steps"] == result.steps
    assert record["tokens_seen"] == result.tokens_seen
    assert record["eval_loss"] == result.eval_loss
    assert record["base_eval_loss"] == result.base_eval_loss
    assert record["train_loss"] == [list(point) for point in result.train_loss]
    assert record["wall_seconds"] > 0


def test_result_to_dict_is_json(english_run) -> None:
    result, _ = english_run
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))

    assert data["output_dir"] == str(result.output_dir)
    assert data["rank"] == 16
    assert data["alpha"] == 32
    assert data["target_modules"] == ["c_attn", "c_proj", "c_fc"]


def test_only_lora_matrices_saved(english_run, tiny_base_dir: Path) -> None:
    result, _ = english_run
    tensors = load_file(result.output_dir / "adapter_model.safetensors")

    assert tensors
    assert all(".lora_A." in name or ".lora_B." in name for name in tensors)
    # 2 layers x 4 targeted modules (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) x (A, B).
    assert len(tensors) == 2 * 4 * 2
    assert result.trainable_parameters == sum(tensor.numel() for tensor in tensors.values())
    assert result.base_weight_hash == load_base_model(str(tiny_base_dir)).weight_hash


def test_prepare_marks_only_lora_trainable(tiny_base_dir: Path) -> None:
    base = load_base_model(str(tiny_base_dir))
    config = TrainingConfig(rank=4, target_modules=("c_fc",))

    model, effective = prepare_lora_model(base.model, config)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]

    assert trainable
    assert all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert all(".c_fc." in name for name in trainable)
    assert effective.rank == 4
    assert effective.target_modules == ("c_fc",)


def test_saved_adapter_loads_on_plain_gpt2(english_run, tiny_base_dir: Path) -> None:
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    result, _ = english_run
    plain = GPT2LMHeadModel.from_pretrained(tiny_base_dir)
    model = PeftModel.from_pretrained(plain, result.output_dir)
    input_ids = torch.tensor([[16, 362, 513, 198]])

    with torch.no_grad():
        adapted = model(input_ids=input_ids).logits
        with model.disable_adapter():
            bare = model(input_ids=input_ids).logits
    assert not torch.allclose(adapted, bare)


def test_evaluate_adapter_matches_training(english_run, tiny_base_dir: Path) -> None:
    result, _ = english_run

    adapter_loss = evaluate_adapter(tiny_base_dir, result.output_dir, ENGLISH_EVAL)
    base_loss = evaluate_adapter(tiny_base_dir, None, ENGLISH_EVAL)

    assert adapter_loss["english"] == pytest.approx(result.eval_loss["english"], abs=1e-5)
    assert base_loss["english"] == pytest.approx(result.base_eval_loss["english"], abs=1e-5)


def test_evaluation_is_token_weighted(tiny_base_dir: Path) -> None:
    # A mean of batch means would change with the batch size; a token-level mean does not.
    one_per_batch = evaluate_adapter(tiny_base_dir, None, ENGLISH_EVAL, batch_size=1)
    all_in_one = evaluate_adapter(tiny_base_dir, None, ENGLISH_EVAL, batch_size=12)

    assert one_per_batch["english"] == pytest.approx(all_in_one["english"], rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Warm start
# ---------------------------------------------------------------------------------------------


def test_warm_start_initial_loss_is_parent(spanish_run, english_run, tiny_base_dir: Path) -> None:
    parent_loss = evaluate_adapter(tiny_base_dir, english_run[0].output_dir, SPANISH_EVAL)

    assert spanish_run.initial_eval_loss is not None
    initial = spanish_run.initial_eval_loss["spanish"]
    assert initial == pytest.approx(parent_loss["spanish"], abs=1e-5)


def test_warm_start_improves_on_parent(spanish_run) -> None:
    assert spanish_run.initial_eval_loss is not None
    assert spanish_run.eval_loss["spanish"] < spanish_run.initial_eval_loss["spanish"] - 0.5


def test_warm_start_changes_weights(spanish_run, english_run) -> None:
    parent = load_file(english_run[0].output_dir / "adapter_model.safetensors")
    child = load_file(spanish_run.output_dir / "adapter_model.safetensors")

    assert spanish_run.adapter_sha256 != english_run[0].adapter_sha256
    assert set(child) == set(parent)
    assert any(not torch.equal(child[name], parent[name]) for name in parent)


def test_warm_start_uses_parent_settings(spanish_run, english_run) -> None:
    record = json.loads((spanish_run.output_dir / "training_record.json").read_text())

    assert spanish_run.rank == 16
    assert spanish_run.alpha == 32
    assert set(spanish_run.target_modules) == {"c_attn", "c_proj", "c_fc"}
    assert spanish_run.parent_adapter == "english"
    assert record["parent_adapter"]["name"] == "english"
    assert record["parent_adapter"]["adapter_sha256"] == english_run[0].adapter_sha256
    assert record["hyperparameters"]["rank"] == 16


def test_warm_start_foreign_architecture(english_run, tiny_base_dir: Path, tmp_path: Path) -> None:
    # An adapter made for a LLaMA-style model targets q_proj/v_proj, which GPT-2 does not have,
    # so loading it would leave nothing to train.
    foreign = tmp_path / "llama-adapter"
    shutil.copytree(english_run[0].output_dir, foreign)
    adapter_config = json.loads((foreign / "adapter_config.json").read_text())
    adapter_config["target_modules"] = ["q_proj", "v_proj"]
    (foreign / "adapter_config.json").write_text(json.dumps(adapter_config))

    with pytest.raises(TrainingError, match="no parameter would train"):
        train_lora(
            tiny_base_dir,
            SPANISH_TRAIN,
            SPANISH_EVAL,
            TrainingConfig(max_steps=1),
            tmp_path / "out",
            init_adapter_dir=foreign,
        )
    assert not (tmp_path / "out").exists()


def test_warm_start_missing_parent(tiny_base_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="Parent adapter not found"):
        train_lora(
            tiny_base_dir,
            SPANISH_TRAIN,
            SPANISH_EVAL,
            TrainingConfig(max_steps=1),
            tmp_path / "out",
            init_adapter_dir=tmp_path / "missing",
        )


# ---------------------------------------------------------------------------------------------
# Cancellation, failures, determinism
# ---------------------------------------------------------------------------------------------


def test_cancel_leaves_no_output(tiny_base_dir: Path, tmp_path: Path) -> None:
    checks = 0
    reports: list[Progress] = []

    def stop_after_three_steps() -> bool:
        nonlocal checks
        checks += 1
        return checks > 3

    with pytest.raises(TrainingCancelled):
        train_lora(
            tiny_base_dir,
            ENGLISH_TRAIN,
            ENGLISH_EVAL,
            TrainingConfig(),
            tmp_path / "out",
            on_progress=reports.append,
            should_stop=stop_after_three_steps,
        )

    assert [report.step for report in reports] == [1, 2, 3]
    assert list(tmp_path.iterdir()) == []


def test_existing_output_dir_rejected(tiny_base_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()

    with pytest.raises(TrainingError, match="already exists"):
        train_lora(tiny_base_dir, ENGLISH_TRAIN, ENGLISH_EVAL, TrainingConfig(), tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_output_dir_created_mid_run(tiny_base_dir: Path, tmp_path: Path) -> None:
    # Another job creates the folder while this one trains: the rename must not replace it,
    # and the partial folder must be removed.
    output_dir = tmp_path / "out"

    def create_output_dir(progress: Progress) -> None:
        output_dir.mkdir(exist_ok=True)

    with pytest.raises(TrainingError, match="already exists"):
        train_lora(
            tiny_base_dir,
            ENGLISH_TRAIN,
            ENGLISH_EVAL,
            TrainingConfig(max_steps=2),
            output_dir,
            on_progress=create_output_dir,
        )

    assert [path.name for path in tmp_path.iterdir()] == ["out"]
    assert list(output_dir.iterdir()) == []


def test_empty_training_set_rejected(tiny_base_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="No training examples"):
        train_lora(tiny_base_dir, [], ENGLISH_EVAL, TrainingConfig(), tmp_path / "out")


def test_same_seed_same_adapter(tiny_base_dir: Path, tmp_path: Path) -> None:
    def sha(name: str, seed: int) -> str:
        config = TrainingConfig(**{**FAST_CONFIG, "max_steps": 4, "seed": seed})
        result = train_lora(tiny_base_dir, ENGLISH_TRAIN, ENGLISH_EVAL, config, tmp_path / name)
        return result.adapter_sha256

    first = sha("first", seed=5)
    second = sha("second", seed=5)
    other_seed = sha("third", seed=6)

    assert first == second
    assert other_seed != first


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("rank", 0, "1 to 256"),
        ("rank", 2.5, "1 to 256"),
        ("alpha", -1.0, "(0, 1024]"),
        ("dropout", 1.0, "[0, 1)"),
        ("target_modules", ("q_proj",), "c_attn, c_proj, c_fc"),
        ("target_modules", (), "c_attn, c_proj, c_fc"),
        ("learning_rate", 0.0, "(0, 1]"),
        ("epochs", True, "1 to 1000"),
        ("batch_size", 0, "1 to 1024"),
        ("max_length", 4096, "2 to 1024"),
        ("warmup_ratio", float("nan"), "[0, 1)"),
        ("weight_decay", -0.1, "[0, 1]"),
        ("seed", -1, "0 to 4294967295"),
        ("max_steps", 0, "1 to"),
    ],
)
def test_config_error_quotes_value(field: str, value: object, allowed: str) -> None:
    config = TrainingConfig(**{field: value})

    with pytest.raises(ConfigError) as raised:
        config.validate()

    message = str(raised.value)
    assert field in message
    bad_value = repr(value[0]) if field == "target_modules" and value else repr(value)
    assert bad_value in message
    assert allowed in message


def test_config_from_dict_unknown_key() -> None:
    with pytest.raises(ConfigError, match="'learning_rte'"):
        TrainingConfig.from_dict({"learning_rte": 1e-3})


def test_config_dict_round_trip() -> None:
    config = TrainingConfig(rank=4, target_modules=("c_attn", "c_fc"), max_steps=10)
    data = json.loads(json.dumps(config.to_dict()))

    assert TrainingConfig.from_dict(data) == config


# ---------------------------------------------------------------------------------------------
# Tokenization and batching
# ---------------------------------------------------------------------------------------------


def test_labels_mask_prompt_and_end_with_eos(tokenizer) -> None:
    [example] = tokenize_examples(tokenizer, [Example("3 1", "three one")], max_length=64)
    prompt_ids = tokenizer("3 1\n")["input_ids"]
    completion_ids = tokenizer("three one")["input_ids"]

    assert example.input_ids == prompt_ids + completion_ids + [tokenizer.eos_token_id]
    assert example.labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert example.labels[len(prompt_ids) :] == completion_ids + [tokenizer.eos_token_id]
    assert not example.truncated


def test_text_only_labels_every_token(tokenizer) -> None:
    [example] = tokenize_examples(tokenizer, [Example("", "plain text")], max_length=64)

    assert example.labels == example.input_ids
    assert example.input_ids[-1] == tokenizer.eos_token_id


def test_truncation_cuts_completion_tail(tokenizer) -> None:
    long_completion = " ".join(ENGLISH * 5)
    [example] = tokenize_examples(tokenizer, [Example("3 1", long_completion)], max_length=10)
    prompt_ids = tokenizer("3 1\n")["input_ids"]

    assert example.truncated
    assert len(example) == 10
    assert example.input_ids[: len(prompt_ids)] == prompt_ids
    assert tokenizer.eos_token_id not in example.input_ids


def test_truncation_of_overlong_prompt(tokenizer) -> None:
    long_prompt = " ".join(map(str, range(40)))
    [example] = tokenize_examples(tokenizer, [Example(long_prompt, "done")], max_length=8)

    assert example.truncated
    assert len(example) == 8
    # The prompt keeps its end, with the separator, and one completion token remains.
    assert example.labels[:-1] == [IGNORE_INDEX] * 7
    assert example.labels[-1] == tokenizer("done")["input_ids"][0]
    assert tokenizer.decode(example.input_ids[:-1]).endswith("39\n")


def test_truncated_examples_counted(tiny_base_dir: Path, tmp_path: Path) -> None:
    examples = [*ENGLISH_TRAIN[:6], Example("1", " ".join(ENGLISH * 10))]
    config = TrainingConfig(max_length=32, max_steps=1)

    result = train_lora(tiny_base_dir, examples, ENGLISH_EVAL, config, tmp_path / "out")

    assert result.truncated_examples == 1


def test_collate_pads_without_labels(tokenizer) -> None:
    examples = tokenize_examples(
        tokenizer, [Example("1", "one"), Example("1 2 3", "one two three")], max_length=64
    )
    batch = collate(examples, tokenizer.pad_token_id)
    short = len(examples[0])

    assert batch.input_ids.shape == (2, len(examples[1]))
    assert batch.attention_mask[0, :short].tolist() == [1] * short
    assert batch.attention_mask[0, short:].sum() == 0
    assert (batch.labels[0, short:] == IGNORE_INDEX).all()
    assert (batch.input_ids[0, short:] == tokenizer.pad_token_id).all()
    assert batch.attention_mask[1].sum() == len(examples[1])
    assert batch.token_count == short + len(examples[1])


def test_length_grouping_is_deterministic() -> None:
    lengths = [random.Random(index).randint(5, 200) for index in range(100)]

    first = length_grouped_batches(lengths, batch_size=4, seed=3, epoch=1)
    again = length_grouped_batches(lengths, batch_size=4, seed=3, epoch=1)
    next_epoch = length_grouped_batches(lengths, batch_size=4, seed=3, epoch=2)

    assert first == again
    assert first != next_epoch
    assert sorted(index for batch in first for index in batch) == list(range(100))
    assert all(len(batch) == 4 for batch in first)


def test_length_grouping_reduces_padding() -> None:
    lengths = [random.Random(index).randint(5, 200) for index in range(256)]

    def padding(batches: list[list[int]]) -> int:
        total = 0
        for batch in batches:
            batch_lengths = [lengths[index] for index in batch]
            total += max(batch_lengths) * len(batch) - sum(batch_lengths)
        return total

    shuffled = list(range(256))
    random.Random(0).shuffle(shuffled)
    unsorted = [shuffled[start : start + 8] for start in range(0, 256, 8)]
    grouped = length_grouped_batches(lengths, batch_size=8, seed=0, epoch=1)

    assert padding(grouped) < padding(unsorted) / 3


def test_token_loss_sum_ignores_masked_labels() -> None:
    # Uniform logits over 4 classes give ln 4 per scored token.
    logits = torch.zeros(1, 4, 4)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 2, IGNORE_INDEX]])

    loss_sum, token_count = token_loss_sum(logits, labels)

    assert token_count == 1
    assert loss_sum.item() == pytest.approx(torch.log(torch.tensor(4.0)).item())
