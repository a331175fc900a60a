"""Presets, schedules and gradient accumulation of the trainer."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from training_app.trainer import TrainingConfig, train_lora
from training_app.trainer_config import PRESETS, ConfigError


@dataclass(frozen=True)
class Pair:
    prompt: str
    completion: str


EXAMPLES = [Pair(str(number), " ".join(["one", "two", "three"][: 1 + number % 3])) for number in range(24)]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid(name):
    config = TrainingConfig.from_dict({"preset": name})
    for key, value in PRESETS[name].items():
        assert getattr(config, key) == value


def test_explicit_values_override_preset():
    config = TrainingConfig.from_dict({"preset": "thorough", "epochs": 2})
    assert config.epochs == 2
    assert config.rank == 16


@pytest.mark.parametrize(
    ("values", "quoted"),
    [
        ({"preset": "fastest"}, "'fastest'"),
        ({"lr_schedule": "exponential"}, "'exponential'"),
        ({"gradient_accumulation_steps": 0}, "0"),
        ({"eval_every": -1}, "-1"),
    ],
)
def test_invalid_options_quote_value(values, quoted):
    with pytest.raises(ConfigError) as error:
        TrainingConfig.from_dict(values)
    assert quoted in str(error.value)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_accumulation_and_schedules_run(tiny_base_dir, tmp_path, schedule):
    reports = []
    config = TrainingConfig(
        rank=2, alpha=4, epochs=1, batch_size=4, gradient_accumulation_steps=2, max_length=16,
        learning_rate=1e-3, lr_schedule=schedule, eval_every=None,
    )
    result = train_lora(
        tiny_base_dir, EXAMPLES, {"held-out": EXAMPLES[:4]}, config, tmp_path / "adapter", on_progress=reports.append
    )

    # 24 examples in micro-batches of 4 are 6 micro-batches, so 3 optimizer steps.
    assert result.steps == 3
    assert [report.step for report in reports] == [1, 2, 3]
    assert all(report.eval_loss is None for report in reports)
    if schedule == "constant":
        assert reports[-1].learning_rate == pytest.approx(1e-3)
