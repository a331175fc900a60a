"""Turn prompt/completion examples into padded, label-masked batches for causal LM training."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence

from adapters_app.serving.prompting import format_prompt

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Label value that `torch.nn.functional.cross_entropy` skips.
IGNORE_INDEX = -100

# Length grouping sorts examples within chunks of this many batches. Larger chunks waste less
# padding but make batch contents less random from one epoch to the next.
BATCHES_PER_LENGTH_CHUNK = 16


class ExampleLike(Protocol):
    """A training or evaluation example. An empty prompt marks a text-only example.

    An example whose optional `truncated` attribute is true had its completion cut at upload,
    so training appends no EOS to it.
    """

    @property
    def prompt(self) -> str: ...

    @property
    def completion(self) -> str: ...


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of one example and the labels the loss is computed against."""

    input_ids: list[int]
    # Same length as `input_ids`: IGNORE_INDEX on prompt tokens, the token id elsewhere.
    labels: list[int]
    truncated: bool

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class Batch:
    """Right-padded tensors of one batch, all of shape (batch, longest sequence)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device: str | torch.device) -> Batch:
        return Batch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            labels=self.labels.to(device),
        )

    @property
    def token_count(self) -> int:
        """Number of real (non-padding) input tokens."""
        return int(self.attention_mask.sum().item())


def tokenize_example(
    prompt_ids: list[int],
    completion_ids: list[int],
    eos_token_id: int,
    max_length: int,
    *,
    append_eos: bool = True,
) -> TokenizedExample:
    """Join prompt and completion ids, append EOS and cut the result to `max_length` tokens.

    The completion's tail is cut first, so the prompt survives whenever it fits. A prompt of
    `max_length` tokens or more loses its head and keeps its end, which contains the separator,
    plus the first completion token, so every example still has a token to learn from.
    `append_eos=False` is for completions that upload already cut short: the model must not
    learn to stop where the cut is.
    """
    completion_ids = [*completion_ids, eos_token_id] if append_eos else list(completion_ids)
    truncated = len(prompt_ids) + len(completion_ids) > max_length

    if truncated:
        if len(prompt_ids) < max_length:
            completion_ids = completion_ids[: max_length - len(prompt_ids)]
        else:
            prompt_ids = prompt_ids[len(prompt_ids) - (max_length - 1) :]
            completion_ids = completion_ids[:1]

    # Text-only examples have no prompt, so every token is a label.
    labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    return TokenizedExample(
        input_ids=prompt_ids + completion_ids,
        labels=labels,
        truncated=truncated,
    )


def tokenize_examples(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[ExampleLike],
    max_length: int,
) -> list[TokenizedExample]:
    """Tokenize examples the way serving lays out a prompt: `format_prompt(prompt)`, then text.

    Prompt and completion are tokenized separately, so the prompt's tokens are exactly those
    that serving feeds the model before it generates.
    """
    eos_token_id = tokenizer.eos_token_id
    if eos_token_id is None:
        raise ValueError("The tokenizer has no EOS token, so completions cannot learn to stop")

    prompt_ids, completion_ids = tokenize_parts(tokenizer, examples)

    tokenized = []
    for example, example_prompt_ids, example_completion_ids in zip(
        examples, prompt_ids, completion_ids
    ):
        tokenized.append(
            tokenize_example(
                list(example_prompt_ids),
                list(example_completion_ids),
                eos_token_id,
                max_length,
                append_eos=not getattr(example, "truncated", False),
            )
        )
    return tokenized


def tokenize_parts(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[ExampleLike]
) -> tuple[list[list[int]], list[list[int]]]:
    """Return the token ids of each prompt, laid out by `format_prompt`, and of each completion.

    EOS is not included. Batched calls let the fast tokenizer work on all examples in one pass.
    """
    prompts = [format_prompt(example.prompt) for example in examples]
    completions = [example.completion for example in examples]
    prompt_ids = tokenizer(prompts)["input_ids"] if prompts else []
    completion_ids = tokenizer(completions)["input_ids"] if completions else []
    return prompt_ids, completion_ids


def example_token_counts(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[ExampleLike]
) -> list[tuple[int, int]]:
    """Return (prompt tokens, completion tokens) per example as training counts them, without EOS."""
    prompt_ids, completion_ids = tokenize_parts(tokenizer, examples)
    return [(len(prompt), len(completion)) for prompt, completion in zip(prompt_ids, completion_ids)]


def collate(examples: Sequence[TokenizedExample], pad_token_id: int) -> Batch:
    """Right-pad examples into one batch. Padding gets attention 0 and label IGNORE_INDEX."""
    import torch

    longest = max(len(example) for example in examples)
    input_ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)

    for row, example in enumerate(examples):
        length = len(example)
        input_ids[row, :length] = torch.tensor(example.input_ids, dtype=torch.long)
        attention_mask[row, :length] = 1
        labels[row, :length] = torch.tensor(example.labels, dtype=torch.long)

    return Batch(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int
) -> list[list[int]]:
    """Return shuffled batches of example indices in which examples have similar lengths.

    The indices are shuffled, cut into chunks of `BATCHES_PER_LENGTH_CHUNK` batches, and sorted
    by length inside each chunk, so a batch pads little while its contents still vary between
    epochs. The order depends only on `seed`, `epoch` and `lengths`.
    """
    generator = random.Random(f"{seed}:{epoch}")
    indices = list(range(len(lengths)))
    generator.shuffle(indices)

    chunk_size = batch_size * BATCHES_PER_LENGTH_CHUNK
    batches: list[list[int]] = []
    for start in range(0, len(indices), chunk_size):
        chunk = sorted(indices[start : start + chunk_size], key=lambda index: -lengths[index])
        for batch_start in range(0, len(chunk), batch_size):
            batches.append(chunk[batch_start : batch_start + batch_size])

    # Without this shuffle every chunk would start with its longest batch.
    generator.shuffle(batches)
    return batches


def evaluation_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Return batches of indices sorted by length, to pad as little as possible."""
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Return the summed cross-entropy over label tokens and how many label tokens there are.

    `logits` is (batch, sequence, vocabulary) and `labels` is (batch, sequence). Position t
    predicts token t + 1, so logits drop their last position and labels their first.
    """
    import torch.nn.functional as functional

    # Shifting the labels instead of the logits avoids copying the (batch, sequence,
    # vocabulary) tensor, the largest in a GPT-2 step: the last position gets no label.
    shifted_labels = functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    loss_sum = functional.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    token_count = int((shifted_labels != IGNORE_INDEX).sum().item())
    return loss_sum, token_count
