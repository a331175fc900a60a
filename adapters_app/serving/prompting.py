"""Prompt layout before the model sees it, shared by training and serving."""

from __future__ import annotations

# Prompt/completion pairs are trained as `prompt + SEPARATOR + completion + <|endoftext|>`.
# Serving appends the same separator, so a prompt typed in the playground lines up with
# what the adapter saw in training.
SEPARATOR = "\n"


def format_prompt(prompt: str) -> str:
    """Return the model input for a prompt: the prompt followed by exactly one separator."""
    if not prompt or prompt.endswith(SEPARATOR):
        return prompt
    return prompt + SEPARATOR
