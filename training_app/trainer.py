"""Train a LoRA adapter on the frozen GPT-2 base and save it atomically.

Only LoRA matrices A and B train. The base weights are hashed before and after a run, and the
run fails if they changed. This module imports no Django code, so a Celery task, a management
command or a test can call it directly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from adapters_app.serving.checksum import file_sha256
from adapters_app.serving.base import BaseModel, BaseModelError, load_base_model, state_dict_hash
from training_app.trainer_config import ConfigError, TrainingConfig
from training_app.trainer_data import (
    ExampleLike,
    TokenizedExample,
    collate,
    length_grouped_batches,
    token_loss_sum,
    tokenize_examples,
)
from training_app.trainer_model import (
    TrainingError,
    count_trainable_parameters,
    evaluate_model,
    prepare_lora_model,
    tokenize_eval_sets,
)

if TYPE_CHECKING:
    import torch
    from peft import PeftModel

__all__ = [
    "ConfigError",
    "ExampleLike",
    "Progress",
    "TrainingCancelled",
    "TrainingConfig",
    "TrainingError",
    "TrainingResult",
    "evaluate_adapter",
    "prepare_lora_model",
    "train_lora",
]

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
TRAINING_RECORD_FILE = "training_record.json"
TRAINING_RECORD_VERSION = 1

MAX_GRAD_NORM = 1.0


class TrainingCancelled(Exception):
    """Cancellation requested through `should_stop`. Nothing was written to the output folder."""


@dataclass
class Progress:
    """Snapshot of a running training job, passed to `on_progress`."""

    step: int
    total_steps: int
    # 1-based epoch of the step just taken.
    epoch: int
    # Mean token-level training loss of the steps since the previous report.
    loss: float
    # Learning rate of the step just taken.
    learning_rate: float
    # Non-padding input tokens processed so far.
    tokens_seen: int
    elapsed_seconds: float
    # Mean validation loss over a sample of every eval set, on the steps that measure it.
    eval_loss: float | None = None


@dataclass
class TrainingResult:
    """Outcome of a finished run.

    training_record.json in the adapter folder stores the same values, except the folder path.
    """

    output_dir: Path
    adapter_sha256: str
    adapter_bytes: int
    # Mean cross-entropy per completion token, in nats, keyed by eval set name.
    eval_loss: dict[str, float]
    base_eval_loss: dict[str, float]
    # Loss of the parent adapter before training, or None on a fresh start.
    initial_eval_loss: dict[str, float] | None
    # (step, token-level loss of that step's batch), one entry per step.
    train_loss: list[tuple[int, float]]
    steps: int
    tokens_seen: int
    truncated_examples: int
    wall_seconds: float
    trainable_parameters: int
    base_weight_hash: str
    # LoRA settings the adapter was trained with. On a warm start they come from the parent.
    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    # Folder name of the parent adapter on a warm start.
    parent_adapter: str | None = None
    # All hyperparameters as used, with the LoRA settings above.
    config: TrainingConfig = field(default_factory=TrainingConfig)

    def to_dict(self) -> dict[str, Any]:
        """Return the result as JSON-safe values."""
        return {
            "output_dir": str(self.output_dir),
            "adapter_sha256": self.adapter_sha256,
            "adapter_bytes": self.adapter_bytes,
            "eval_loss": dict(self.eval_loss),
            "base_eval_loss": dict(self.base_eval_loss),
            "initial_eval_loss": (
                dict(self.initial_eval_loss) if self.initial_eval_loss is not None else None
            ),
            "train_loss": [[step, loss] for step, loss in self.train_loss],
            "steps": self.steps,
            "tokens_seen": self.tokens_seen,
            "truncated_examples": self.truncated_examples,
            "wall_seconds": self.wall_seconds,
            "trainable_parameters": self.trainable_parameters,
            "base_weight_hash": self.base_weight_hash,
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "target_modules": list(self.target_modules),
            "parent_adapter": self.parent_adapter,
            "config": self.config.to_dict(),
        }


def evaluate_adapter(
    base_path: str | Path,
    adapter_dir: Path | None,
    eval_sets: Mapping[str, Sequence[ExampleLike]],
    *,
    max_length: int = 256,
    batch_size: int = 8,
    device: str = "cpu",
) -> dict[str, float]:
    """Score an existing adapter, or the bare base when `adapter_dir` is None.

    Returns each eval set's mean cross-entropy per completion token, computed exactly as
    `train_lora` computes `eval_loss`.
    """
    from peft import PeftModel

    TrainingConfig(max_length=max_length, batch_size=batch_size).validate()
    base = _load_base(base_path, device)
    _check_max_length(max_length, base)
    tokenized = tokenize_eval_sets(base, eval_sets, max_length)

    model: torch.nn.Module = base.model
    if adapter_dir is not None:
        try:
            model = PeftModel.from_pretrained(base.model, adapter_dir)
        except (OSError, ValueError, RuntimeError) as error:
            raise TrainingError(f"Could not load adapter {adapter_dir}: {error}") from error

    losses = evaluate_model(
        model,
        tokenized,
        batch_size=batch_size,
        pad_token_id=base.tokenizer.pad_token_id,
        device=device,
    )
    logger.info("Evaluated adapter %s on base %s: %s", adapter_dir, base_path, losses)
    return losses


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _load_base(base_path: str | Path, device: str) -> BaseModel:
    try:
        return load_base_model(str(base_path), device=device)
    except BaseModelError as error:
        raise TrainingError(str(error)) from error


def _check_max_length(max_length: int, base: BaseModel) -> None:
    if max_length > base.max_positions:
        raise ConfigError(
            f"max_length={max_length} exceeds the base model's context of "
            f"{base.max_positions} tokens; allowed: 2 to {base.max_positions}"
        )


@dataclass
class _LoopOutcome:
    steps: int
    tokens_seen: int
    train_loss: list[tuple[int, float]]


def _train_loop(
    peft_model: PeftModel,
    examples: list[TokenizedExample],
    config: TrainingConfig,
    *,
    pad_token_id: int,
    device: str,
    started: float,
    on_progress: Callable[[Progress], None] | None,
    should_stop: Callable[[], bool] | None,
    progress_every: int,
    periodic_eval: Callable[[], float] | None = None,
) -> _LoopOutcome:
    import torch

    accumulation = config.gradient_accumulation_steps
    micro_batches_per_epoch = math.ceil(len(examples) / config.batch_size)
    steps_per_epoch = math.ceil(micro_batches_per_epoch / accumulation)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    warmup_steps = math.ceil(config.warmup_ratio * total_steps)
    eval_every = _eval_interval(config.eval_every, total_steps) if periodic_eval is not None else None

    trainable = [parameter for parameter in peft_model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=config.learning_rate, weight_decay=config.weight_decay
    )
    scheduler = _make_scheduler(config.lr_schedule, optimizer, warmup_steps, total_steps)
    lengths = [len(example) for example in examples]

    step = 0
    tokens_seen = 0
    train_loss: list[tuple[int, float]] = []
    losses_since_report: list[float] = []
    pending: list[float] = []
    peft_model.train()

    for epoch in range(1, config.epochs + 1):
        batches = list(length_grouped_batches(lengths, config.batch_size, config.seed, epoch))
        for position, indices in enumerate(batches):
            if step >= total_steps:
                break
            if should_stop is not None and should_stop():
                raise TrainingCancelled(f"Training stopped on request after {step} steps")

            batch = collate([examples[i] for i in indices], pad_token_id)
            tokens_seen += batch.token_count
            batch = batch.to(device)

            # logits: (batch, sequence, vocabulary). The loss is the mean over this batch's
            # label tokens, so long completions weigh more than short ones.
            with _mixed_precision(device):
                logits = peft_model(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
                ).logits
            loss_sum, label_tokens = token_loss_sum(logits, batch.labels)
            loss = loss_sum / max(label_tokens, 1)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"Training loss became {loss.item()} at step {step + 1}; "
                    f"lower learning_rate (now {config.learning_rate})"
                )

            # Each micro-batch contributes 1/accumulation of the step's gradient.
            (loss / accumulation).backward()
            pending.append(float(loss.item()))
            # The logits are the largest tensor of a step; holding them into the next forward
            # pass would keep two steps' worth alive at once.
            del logits, loss_sum, loss
            last_in_epoch = position == len(batches) - 1
            if len(pending) < accumulation and not last_in_epoch:
                continue

            torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
            learning_rate = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            step += 1
            step_loss = sum(pending) / len(pending)
            pending = []
            train_loss.append((step, step_loss))
            losses_since_report.append(step_loss)

            eval_loss = None
            if eval_every is not None and (step % eval_every == 0 or step == total_steps):
                eval_loss = periodic_eval()
                peft_model.train()

            report = step % progress_every == 0 or step == total_steps or eval_loss is not None
            if on_progress is not None and report:
                on_progress(
                    Progress(
                        step=step,
                        total_steps=total_steps,
                        epoch=epoch,
                        loss=sum(losses_since_report) / len(losses_since_report),
                        learning_rate=learning_rate,
                        tokens_seen=tokens_seen,
                        elapsed_seconds=time.monotonic() - started,
                        eval_loss=eval_loss,
                    )
                )
                losses_since_report = []

    return _LoopOutcome(steps=step, tokens_seen=tokens_seen, train_loss=train_loss)


def _mixed_precision(device: str):
    """bfloat16 autocast on a CUDA device that supports it, otherwise full precision.

    LoRA weights and optimizer state stay float32; token_loss_sum upcasts the logits.
    NOTE: no CUDA device was available where this was written, so this path is untested.
    """
    import contextlib

    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# Examples per eval set in the validation points taken during training.
PERIODIC_EVAL_EXAMPLES = 64

# Validation points per run when `eval_every` is 0.
AUTO_EVAL_POINTS = 8


def _eval_interval(eval_every: int | None, total_steps: int) -> int | None:
    if eval_every is None:
        return None
    if eval_every == 0:
        return max(1, math.ceil(total_steps / AUTO_EVAL_POINTS))
    return eval_every


def _make_scheduler(name: str, optimizer, warmup_steps: int, total_steps: int):
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    if name == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    if name == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup_steps)
    return get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)


def train_lora(
    base_path: str | Path,
    train_examples: Sequence[ExampleLike],
    eval_sets: Mapping[str, Sequence[ExampleLike]],
    config: TrainingConfig,
    output_dir: Path,
    *,
    init_adapter_dir: Path | None = None,
    device: str = "cpu",
    torch_threads: int = 0,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    progress_every: int = 1,
    record_extra: Mapping[str, Any] | None = None,
) -> TrainingResult:
    """Train a LoRA adapter on the frozen base at `base_path` and save it to `output_dir`.

    `record_extra` is added to the adapter's training_record.json, for facts only the caller
    knows (which datasets, their hashes and split seeds).

    A fresh adapter is built from `config`. With `init_adapter_dir` the parent adapter is loaded
    and trained further, keeping its rank, alpha, dropout and target modules. `output_dir` must
    not exist yet; it appears complete, via a rename, or not at all.

    Raises ConfigError for invalid hyperparameters, TrainingError when training fails (and for
    an empty training set, a base or parent that cannot be loaded, or a changed base), and
    TrainingCancelled when `should_stop` returns True between steps.
    """
    import torch

    config.validate()
    output_dir = Path(output_dir)
    if progress_every < 1:
        raise ValueError(f"progress_every must be at least 1, got {progress_every!r}")
    if output_dir.exists():
        raise TrainingError(f"Output folder {output_dir} already exists; choose a new one")
    train_examples = list(train_examples)
    if not train_examples:
        raise TrainingError("No training examples; add at least one before training")

    previous_threads = torch.get_num_threads()
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    started = time.monotonic()
    logger.info(
        "Training LoRA adapter %s on base %s (parent %s, %d examples, device %s)",
        output_dir,
        base_path,
        init_adapter_dir,
        len(train_examples),
        device,
    )

    try:
        result = _train_and_save(
            base_path,
            train_examples,
            eval_sets,
            config,
            output_dir,
            init_adapter_dir=init_adapter_dir,
            device=device,
            started=started,
            on_progress=on_progress,
            should_stop=should_stop,
            progress_every=progress_every,
            record_extra=record_extra or {},
        )
    except TrainingCancelled:
        logger.info("Training of %s cancelled after %.1f s", output_dir, time.monotonic() - started)
        raise
    except Exception as error:
        logger.error("Training of %s failed: %s", output_dir, error)
        raise
    finally:
        torch.set_num_threads(previous_threads)

    logger.info(
        "Saved adapter %s (sha256 %s, %d steps, %.1f s): eval loss %s, base %s",
        output_dir,
        result.adapter_sha256[:12],
        result.steps,
        result.wall_seconds,
        result.eval_loss,
        result.base_eval_loss,
    )
    return result


def _train_and_save(
    base_path: str | Path,
    train_examples: list[ExampleLike],
    eval_sets: Mapping[str, Sequence[ExampleLike]],
    config: TrainingConfig,
    output_dir: Path,
    *,
    init_adapter_dir: Path | None,
    device: str,
    started: float,
    on_progress: Callable[[Progress], None] | None,
    should_stop: Callable[[], bool] | None,
    progress_every: int,
    record_extra: Mapping[str, Any],
) -> TrainingResult:
    import torch

    base = _load_base(base_path, device)
    _check_max_length(config.max_length, base)
    if init_adapter_dir is not None:
        _warn_if_parent_base_differs(init_adapter_dir, base)

    # The seed fixes the LoRA A initialisation, dropout masks and, with the epoch, batch order.
    torch.manual_seed(config.seed)
    peft_model, effective = prepare_lora_model(base.model, config, init_adapter_dir)
    trainable_parameters = count_trainable_parameters(peft_model)

    pad_token_id = base.tokenizer.pad_token_id
    train_tokenized = tokenize_examples(base.tokenizer, train_examples, config.max_length)
    truncated_examples = sum(example.truncated for example in train_tokenized)
    eval_tokenized = tokenize_eval_sets(base, eval_sets, config.max_length)
    eval_options = dict(batch_size=config.batch_size, pad_token_id=pad_token_id, device=device)

    with peft_model.disable_adapter():
        base_eval_loss = evaluate_model(peft_model, eval_tokenized, **eval_options)
    initial_eval_loss = None
    if init_adapter_dir is not None:
        initial_eval_loss = evaluate_model(peft_model, eval_tokenized, **eval_options)

    # The live chart needs validation points during training. A bounded sample of each set
    # keeps them cheap, and the full splits are scored once at the end.
    sampled_sets = {name: examples[:PERIODIC_EVAL_EXAMPLES] for name, examples in eval_tokenized.items()}

    def periodic_eval() -> float:
        losses = evaluate_model(peft_model, sampled_sets, **eval_options)
        return sum(losses.values()) / len(losses)

    outcome = _train_loop(
        peft_model,
        train_tokenized,
        effective,
        pad_token_id=pad_token_id,
        device=device,
        started=started,
        on_progress=on_progress,
        should_stop=should_stop,
        progress_every=progress_every,
        periodic_eval=periodic_eval if sampled_sets else None,
    )
    if should_stop is not None and should_stop():
        raise TrainingCancelled(f"Training stopped on request after {outcome.steps} steps")

    eval_loss = evaluate_model(peft_model, eval_tokenized, **eval_options)

    result = TrainingResult(
        output_dir=output_dir,
        adapter_sha256="",
        adapter_bytes=0,
        eval_loss=eval_loss,
        base_eval_loss=base_eval_loss,
        initial_eval_loss=initial_eval_loss,
        train_loss=outcome.train_loss,
        steps=outcome.steps,
        tokens_seen=outcome.tokens_seen,
        truncated_examples=truncated_examples,
        wall_seconds=0.0,
        trainable_parameters=trainable_parameters,
        base_weight_hash=base.weight_hash,
        rank=effective.rank,
        alpha=effective.alpha,
        dropout=effective.dropout,
        target_modules=effective.target_modules,
        parent_adapter=Path(init_adapter_dir).name if init_adapter_dir is not None else None,
        config=effective,
    )
    _save_atomically(peft_model, base, result, init_adapter_dir, started, record_extra)
    return result


def _warn_if_parent_base_differs(init_adapter_dir: Path, base: BaseModel) -> None:
    record_path = Path(init_adapter_dir) / TRAINING_RECORD_FILE
    if not record_path.is_file():
        return
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        logger.warning("Could not read %s: %s", record_path, error)
        return

    parent_hash = record.get("base_model", {}).get("weight_hash")
    if parent_hash and parent_hash != base.weight_hash:
        logger.warning(
            "Parent adapter %s was trained on base weights %s, not on %s (%s)",
            init_adapter_dir,
            parent_hash[:12],
            base.model_id,
            base.weight_hash[:12],
        )


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


def _save_atomically(
    peft_model: PeftModel,
    base: BaseModel,
    result: TrainingResult,
    init_adapter_dir: Path | None,
    started: float,
    record_extra: Mapping[str, Any],
) -> None:
    """Save adapter and record into a hidden sibling folder, then rename it to `output_dir`.

    Fills in the result's adapter hash, size and wall time. The sibling sits in the same parent,
    so `os.replace` is a rename within one file system and readers never see a partial adapter.
    """
    output_dir = result.output_dir
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    temporary_dir = output_dir.parent / f".{output_dir.name}.partial-{uuid.uuid4().hex[:8]}"

    try:
        peft_model.save_pretrained(temporary_dir)
        weights_path = temporary_dir / ADAPTER_WEIGHTS_FILE
        result.adapter_sha256 = file_sha256(weights_path)
        result.adapter_bytes = weights_path.stat().st_size

        # Removing the LoRA layers without merging gives back the base modules under their
        # original names, so the hash is comparable with the one taken at load time.
        unloaded = peft_model.base_model.unload()
        final_hash = state_dict_hash(unloaded)
        if final_hash != base.weight_hash:
            raise TrainingError(
                f"Base weights changed during training, from hash {base.weight_hash[:12]} to "
                f"{final_hash[:12]}, so the adapter was discarded"
            )

        result.wall_seconds = time.monotonic() - started
        record = {**_training_record(base, result, init_adapter_dir), **record_extra}
        (temporary_dir / TRAINING_RECORD_FILE).write_text(
            json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )

        # NOTE: os.replace silently replaces an empty folder, so a folder created at
        # output_dir between this check and the rename would be lost. Callers give each run
        # its own output_dir.
        if output_dir.exists():
            raise TrainingError(f"Output folder {output_dir} already exists; choose a new one")
        os.replace(temporary_dir, output_dir)
    except BaseException:
        shutil.rmtree(temporary_dir, ignore_errors=True)
        raise


def _training_record(
    base: BaseModel, result: TrainingResult, init_adapter_dir: Path | None
) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    parent = None
    if init_adapter_dir is not None:
        parent_weights = Path(init_adapter_dir) / ADAPTER_WEIGHTS_FILE
        parent = {
            "name": Path(init_adapter_dir).name,
            "adapter_sha256": file_sha256(parent_weights) if parent_weights.is_file() else None,
        }

    record = result.to_dict()
    # The folder is renamed after the record is written, so its path would be stale.
    record.pop("output_dir")
    record.update(
        {
            "record_version": TRAINING_RECORD_VERSION,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "hyperparameters": record.pop("config"),
            "base_model": {"id": base.model_id, "weight_hash": base.weight_hash},
            "parent_adapter": parent,
            "seed": result.config.seed,
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
            },
        }
    )
    return record
