"""Wrap the frozen GPT-2 in a trainable LoRA adapter and score models on eval sets."""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from adapters_app.serving.base import BaseModel
from training_app.trainer_config import TrainingConfig
from training_app.trainer_data import (
    ExampleLike,
    TokenizedExample,
    collate,
    evaluation_batches,
    token_loss_sum,
    tokenize_examples,
)

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

logger = logging.getLogger(__name__)

# peft 0.21 calls transformers' deprecated `is_gradient_checkpointing` on every LoRA setup,
# which would print a FutureWarning into the worker log for each job. Nothing here can act on it.
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)

ADAPTER_CONFIG_FILE = "adapter_config.json"

# Name fragments of the LoRA matrices in a peft model. Nothing else may train.
LORA_MATRIX_MARKERS = (".lora_A.", ".lora_B.")


class TrainingError(RuntimeError):
    """A training run failed. Nothing was written to the output folder."""


# ---------------------------------------------------------------------------------------------
# Model preparation
# ---------------------------------------------------------------------------------------------


def prepare_lora_model(
    model: GPT2LMHeadModel,
    config: TrainingConfig,
    init_adapter_dir: Path | None = None,
) -> tuple[PeftModel, TrainingConfig]:
    """Wrap a frozen GPT-2 in a trainable LoRA adapter, fresh or loaded from `init_adapter_dir`.

    Returns the peft model and the config with the LoRA settings actually used, which on a warm
    start come from the parent's adapter_config.json. Only LoRA A and B matrices are left
    trainable. Raises TrainingError when the parent cannot be loaded or nothing would train.
    """
    from peft import LoraConfig, NoMatchingPeftModuleError, PeftModel, get_peft_model

    if init_adapter_dir is None:
        lora_config = LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=list(config.target_modules),
            # GPT-2's Conv1D stores weights as (in_features, out_features).
            fan_in_fan_out=True,
            task_type="CAUSAL_LM",
        )
        try:
            peft_model = get_peft_model(model, lora_config)
        except NoMatchingPeftModuleError as error:
            raise TrainingError(
                f"No module of the base matches target_modules {list(config.target_modules)}, "
                f"so no parameter would train: {error}"
            ) from error
    else:
        _check_parent_adapter(init_adapter_dir)
        try:
            peft_model = PeftModel.from_pretrained(model, init_adapter_dir, is_trainable=True)
        except NoMatchingPeftModuleError as error:
            raise TrainingError(
                f"Parent adapter {init_adapter_dir} targets modules that this base does not have, "
                f"so no parameter would train. Was it trained for another architecture? {error}"
            ) from error
        except (OSError, ValueError, RuntimeError) as error:
            raise TrainingError(
                f"Could not load parent adapter {init_adapter_dir} onto the base: {error}"
            ) from error

    _freeze_all_but_lora_matrices(peft_model)
    trainable = count_trainable_parameters(peft_model)
    if trainable == 0:
        raise TrainingError(
            "The adapter has no trainable LoRA A/B parameters, so training would change nothing. "
            "Check target_modules, or use a LoRA parent adapter."
        )

    effective = _effective_config(peft_model, config)
    if init_adapter_dir is not None and effective != config:
        logger.info(
            "Warm start from %s uses the parent's LoRA settings: rank %s, alpha %s, targets %s",
            init_adapter_dir,
            effective.rank,
            effective.alpha,
            list(effective.target_modules),
        )
    return peft_model, effective


def _check_parent_adapter(init_adapter_dir: Path) -> None:
    config_path = Path(init_adapter_dir) / ADAPTER_CONFIG_FILE
    if not config_path.is_file():
        raise TrainingError(f"Parent adapter not found: {config_path} does not exist")

    try:
        adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise TrainingError(
            f"Could not read parent adapter config {config_path}: {error}"
        ) from error

    peft_type = adapter_config.get("peft_type")
    if peft_type != "LORA":
        raise TrainingError(
            f"Parent adapter {init_adapter_dir} is a {peft_type!r} adapter; only LORA adapters "
            f"can be trained further"
        )


def _freeze_all_but_lora_matrices(peft_model: torch.nn.Module) -> None:
    # A parent adapter may carry other trainable tensors (modules_to_save copies, DoRA
    # magnitudes). The product trains A and B only, so those stay as the parent left them.
    frozen = []
    for name, parameter in peft_model.named_parameters():
        if parameter.requires_grad and not any(marker in name for marker in LORA_MATRIX_MARKERS):
            parameter.requires_grad_(False)
            frozen.append(name)
    if frozen:
        logger.warning(
            "Froze %d non-LoRA parameters of the parent adapter, first ones: %s",
            len(frozen),
            frozen[:5],
        )


def count_trainable_parameters(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


def _effective_config(peft_model: PeftModel, config: TrainingConfig) -> TrainingConfig:
    lora_config = peft_model.peft_config[peft_model.active_adapter]
    targets = lora_config.target_modules
    # peft stores target_modules as a set, or as a regex string when the adapter was made so.
    if isinstance(targets, str):
        target_modules: tuple[str, ...] = (targets,)
    elif set(targets) == set(config.target_modules):
        target_modules = config.target_modules
    else:
        target_modules = tuple(sorted(targets))

    return dataclasses.replace(
        config,
        rank=int(lora_config.r),
        alpha=lora_config.lora_alpha,
        dropout=float(lora_config.lora_dropout),
        target_modules=target_modules,
    )


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def tokenize_eval_sets(
    base: BaseModel,
    eval_sets: Mapping[str, Sequence[ExampleLike]],
    max_length: int,
) -> dict[str, list[TokenizedExample]]:
    tokenized = {}
    for name, examples in eval_sets.items():
        if len(examples) == 0:
            raise TrainingError(f"Eval set {name!r} has no examples")
        tokenized[name] = tokenize_examples(base.tokenizer, examples, max_length)
        truncated = sum(example.truncated for example in tokenized[name])
        if truncated:
            logger.info("Eval set %r: %d examples cut to %d tokens", name, truncated, max_length)
    return tokenized


def evaluate_model(
    model: torch.nn.Module,
    tokenized_sets: Mapping[str, list[TokenizedExample]],
    *,
    batch_size: int,
    pad_token_id: int,
    device: str | torch.device,
) -> dict[str, float]:
    """Return each set's mean cross-entropy per label token (sum over tokens / token count)."""
    import torch

    was_training = model.training
    model.eval()
    losses: dict[str, float] = {}
    try:
        with torch.no_grad():
            for name, examples in tokenized_sets.items():
                # Summing in a Python float (float64) keeps many batch sums precise.
                loss_sum = 0.0
                token_count = 0
                for indices in evaluation_batches([len(e) for e in examples], batch_size):
                    batch = collate([examples[i] for i in indices], pad_token_id).to(device)
                    logits = model(
                        input_ids=batch.input_ids,
                        attention_mask=batch.attention_mask,
                        use_cache=False,
                    ).logits
                    batch_loss, batch_tokens = token_loss_sum(logits, batch.labels)
                    loss_sum += float(batch_loss.double().item())
                    token_count += batch_tokens

                if token_count == 0:
                    raise TrainingError(f"Eval set {name!r} has no completion tokens to score")
                losses[name] = loss_sum / token_count
    finally:
        model.train(was_training)
    return losses
