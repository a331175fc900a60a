"""Hyperparameters of one LoRA training run and their validation."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from adapters_app.serving.base import TARGETABLE_MODULES

# GPT-2's context size. A base model may have a smaller one, which `train_lora` checks once the
# base is loaded.
MAX_SEQUENCE_LENGTH = 1024

# Product limits that keep a request from asking for an absurd amount of work or memory. They
# are sanity bounds, not limits of LoRA or GPT-2.
MAX_RANK = 256
MAX_ALPHA = 1024.0
MAX_EPOCHS = 1000
MAX_BATCH_SIZE = 1024
MAX_SEED = 2**32 - 1


LR_SCHEDULES = ("linear", "cosine", "constant")
MAX_ACCUMULATION = 1024

# Named starting points for the form and the API; explicit values override a preset's.
PRESETS: dict[str, dict[str, Any]] = {
    # A first look in minutes: small rank, one pass, a high rate.
    "quick": {"rank": 4, "alpha": 8, "epochs": 1, "learning_rate": 1e-3, "eval_every": 0},
    # The defaults: rank 8 on all three module kinds, three passes.
    "balanced": {},
    # More capacity and passes, with a cosine schedule that settles at the end.
    "thorough": {
        "rank": 16,
        "alpha": 32,
        "epochs": 5,
        "learning_rate": 3e-4,
        "lr_schedule": "cosine",
        "warmup_ratio": 0.1,
    },
}


class ConfigError(ValueError):
    """A training hyperparameter is missing, of the wrong type or out of range."""


def _check_int(name: str, value: Any, minimum: int, maximum: int) -> None:
    # bool is a subclass of int, but `epochs=True` is a mistake rather than a count.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"{name} must be an integer from {minimum} to {maximum}, got {value!r}"
        )
    if not minimum <= value <= maximum:
        raise ConfigError(f"{name}={value!r} is out of range; allowed: {minimum} to {maximum}")


def _check_float(
    name: str,
    value: Any,
    minimum: float,
    maximum: float,
    *,
    include_minimum: bool = True,
    include_maximum: bool = True,
) -> None:
    low = "[" if include_minimum else "("
    high = "]" if include_maximum else ")"
    allowed = f"{low}{minimum:g}, {maximum:g}{high}"

    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number in {allowed}, got {value!r}")
    if math.isnan(value):
        raise ConfigError(f"{name}={value!r} is not a number; allowed: {allowed}")

    above_minimum = value >= minimum if include_minimum else value > minimum
    below_maximum = value <= maximum if include_maximum else value < maximum
    if not (above_minimum and below_maximum):
        raise ConfigError(f"{name}={value!r} is out of range; allowed: {allowed}")


@dataclass
class TrainingConfig:
    """Hyperparameters of a LoRA training run.

    On a warm start, `rank`, `alpha`, `dropout` and `target_modules` are taken from the parent
    adapter instead, and the training result reports the values that were used.
    """

    rank: int = 8
    alpha: float = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = TARGETABLE_MODULES
    learning_rate: float = 5e-4
    epochs: int = 3
    batch_size: int = 8
    max_length: int = 256
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    seed: int = 0
    # Upper bound on optimizer steps. Unlike Hugging Face's `max_steps` it does not override
    # `epochs`, so a run takes min(max_steps, epochs * batches per epoch) steps.
    max_steps: int | None = None
    lr_schedule: str = "linear"
    # Micro-batches whose gradients are summed before one optimizer step, so the effective
    # batch is batch_size * gradient_accumulation_steps without the memory of a larger batch.
    gradient_accumulation_steps: int = 1
    # Optimizer steps between validation losses for the live chart: 0 means about eight
    # points per run, None means only the final evaluation.
    eval_every: int | None = 0

    def __post_init__(self) -> None:
        # JSON has no tuples, so configs read back from a request or a record carry a list.
        if isinstance(self.target_modules, list):
            self.target_modules = tuple(self.target_modules)

    def validate(self) -> TrainingConfig:
        """Raise `ConfigError` naming the first invalid value and its allowed range.

        Returns the config itself so that a caller can write `config.validate()` inline.
        """
        _check_int("rank", self.rank, 1, MAX_RANK)
        _check_float("alpha", self.alpha, 0.0, MAX_ALPHA, include_minimum=False)
        _check_float("dropout", self.dropout, 0.0, 1.0, include_maximum=False)
        self._validate_target_modules()
        _check_float("learning_rate", self.learning_rate, 0.0, 1.0, include_minimum=False)
        _check_int("epochs", self.epochs, 1, MAX_EPOCHS)
        _check_int("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        # Two tokens is the shortest sequence that still has one token to predict.
        _check_int("max_length", self.max_length, 2, MAX_SEQUENCE_LENGTH)
        _check_float("warmup_ratio", self.warmup_ratio, 0.0, 1.0, include_maximum=False)
        _check_float("weight_decay", self.weight_decay, 0.0, 1.0)
        _check_int("seed", self.seed, 0, MAX_SEED)
        if self.max_steps is not None:
            _check_int("max_steps", self.max_steps, 1, 2**31 - 1)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(
                f"lr_schedule={self.lr_schedule!r} is not a known schedule; allowed: {', '.join(LR_SCHEDULES)}"
            )
        _check_int("gradient_accumulation_steps", self.gradient_accumulation_steps, 1, MAX_ACCUMULATION)
        if self.eval_every is not None:
            _check_int("eval_every", self.eval_every, 0, 2**31 - 1)
        return self

    def _validate_target_modules(self) -> None:
        choices = ", ".join(TARGETABLE_MODULES)
        modules = self.target_modules
        if not isinstance(modules, tuple) or not modules:
            raise ConfigError(
                f"target_modules must be a non-empty list drawn from {choices}, got {modules!r}"
            )
        for module in modules:
            if module not in TARGETABLE_MODULES:
                raise ConfigError(
                    f"target_modules contains {module!r}, which is not a GPT-2 module LoRA can "
                    f"target; allowed: {choices}"
                )
        if len(set(modules)) != len(modules):
            raise ConfigError(f"target_modules lists a module twice: {list(modules)!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingConfig:
        """Build and validate a config from a mapping; missing keys keep their defaults.

        A `preset` key names one of PRESETS, whose values apply before the other keys.
        """
        values = dict(data)
        preset = values.pop("preset", None)
        if preset is not None:
            if preset not in PRESETS:
                raise ConfigError(f"preset={preset!r} is not a known preset; allowed: {', '.join(PRESETS)}")
            values = {**PRESETS[preset], **values}

        known = {field.name for field in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"Unknown training parameter(s) {', '.join(map(repr, unknown))}; "
                f"allowed: preset, {', '.join(sorted(known))}"
            )
        return cls(**values).validate()

    def to_dict(self) -> dict[str, Any]:
        """Return the config as JSON-safe values, readable again by `from_dict`."""
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data
