"""Training throughput of loraweb's trainer against transformers.Trainer + PEFT.

Both sides train the same rank-8 LoRA (c_attn, c_proj, c_fc) on a full-size GPT-2 with
random weights, on the same mixed-length data, for the same number of optimizer steps.
The reference pads each batch to its longest example in data order (no length grouping);
loraweb groups examples of similar length. Each side runs in its own subprocess so that its
peak RSS is its own. Prints one `name: value` line per figure.

    python bench/training.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

WORDS = (
    "the king of love and night rose in the river while summer light fell on stone roads as "
    "old friends spoke of rain gold fire snow music and the long way home"
).split()


def make_examples(count: int, seed: int) -> list[dict[str, str]]:
    """Prompt/completion pairs whose lengths vary from a few to about 200 tokens."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
        # Skewed lengths, as in real data: most examples short, some long.
        words = int(min(200, rng.expovariate(1 / 40) + 4))
        completion = " ".join(rng.choice(WORDS) for _ in range(words))
        rows.append({"prompt": prompt, "completion": completion})
    return rows


def build_base(folder: Path) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from adapters_app.serving.base import build_gpt2_tokenizer

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder)
    build_gpt2_tokenizer().save_pretrained(folder)


def peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_product(base: Path, rows: list[dict], steps: int, batch_size: int, threads: int) -> dict:
    """Time loraweb's training loop alone, as Trainer.train() is timed for the reference."""
    import torch

    from adapters_app.serving.base import load_base_model
    from training_app.trainer import TrainingConfig, _train_loop
    from training_app.trainer_data import collate, length_grouped_batches, tokenize_examples
    from training_app.trainer_model import prepare_lora_model

    class Pair:
        def __init__(self, row: dict) -> None:
            self.prompt, self.completion = row["prompt"], row["completion"]

    torch.set_num_threads(threads)
    config = TrainingConfig(
        rank=8, alpha=16, dropout=0.0, epochs=1, max_steps=steps, batch_size=batch_size,
        max_length=256, learning_rate=5e-4, warmup_ratio=0.0, eval_every=None,
    )
    loaded = load_base_model(str(base))
    torch.manual_seed(0)
    model, effective = prepare_lora_model(loaded.model, config)
    tokenized = tokenize_examples(loaded.tokenizer, [Pair(row) for row in rows], config.max_length)
    losses: list[float] = []

    started = time.perf_counter()
    outcome = _train_loop(
        model, tokenized, effective, pad_token_id=loaded.tokenizer.pad_token_id, device="cpu",
        started=time.monotonic(), on_progress=lambda progress: losses.append(progress.loss),
        should_stop=None, progress_every=1,
    )
    seconds = time.perf_counter() - started

    lengths = [len(example) for example in tokenized]
    padded = real = 0
    for number, indices in enumerate(length_grouped_batches(lengths, batch_size, config.seed, 1)):
        if number >= steps:
            break
        batch = collate([tokenized[i] for i in indices], loaded.tokenizer.pad_token_id)
        padded += batch.input_ids.numel()
        real += batch.token_count
    return {
        "seconds": seconds,
        "tokens": outcome.tokens_seen,
        "final_loss": sum(losses[-5:]) / len(losses[-5:]),
        "padding_fraction": 1 - real / padded,
        "peak_rss_mib": peak_rss_mib(),
    }


def run_reference(base: Path, rows: list[dict], steps: int, batch_size: int, threads: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    from adapters_app.serving.base import load_base_model
    from adapters_app.serving.prompting import format_prompt

    torch.set_num_threads(threads)
    tokenizer = load_base_model(str(base)).tokenizer
    features = []
    for row in rows:
        prompt_ids = tokenizer(format_prompt(row["prompt"]))["input_ids"]
        completion_ids = tokenizer(row["completion"])["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt_ids + completion_ids)[:256]
        labels = ([-100] * len(prompt_ids) + completion_ids)[:256]
        features.append({"input_ids": ids, "labels": labels})

    def collate(batch: list[dict]) -> dict:
        longest = max(len(item["input_ids"]) for item in batch)
        pad = tokenizer.pad_token_id
        return {
            "input_ids": torch.tensor([item["input_ids"] + [pad] * (longest - len(item["input_ids"])) for item in batch]),
            "attention_mask": torch.tensor([[1] * len(item["input_ids"]) + [0] * (longest - len(item["input_ids"])) for item in batch]),
            "labels": torch.tensor([item["labels"] + [-100] * (longest - len(item["labels"])) for item in batch]),
        }

    torch.manual_seed(0)
    model = get_peft_model(
        GPT2LMHeadModel.from_pretrained(base),
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"],
                   fan_in_fan_out=True, task_type="CAUSAL_LM"),
    )
    losses: list[float] = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    with tempfile.TemporaryDirectory() as folder:
        arguments = TrainingArguments(
            output_dir=folder, per_device_train_batch_size=batch_size, max_steps=steps, learning_rate=5e-4,
            lr_scheduler_type="linear", warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[],
            use_cpu=True, dataloader_num_workers=0, remove_unused_columns=False,
            disable_tqdm=True, seed=0,
        )
        trainer = Trainer(model=model, args=arguments, train_dataset=features, data_collator=collate,
                          callbacks=[Record()])
        # Data order as given: the reference does no length grouping.
        trainer._get_train_sampler = lambda *args, **kwargs: torch.utils.data.SequentialSampler(features)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started

    padded = real = 0
    for start in range(0, min(steps * batch_size, len(features)), batch_size):
        batch = features[start:start + batch_size]
        longest = max(len(item["input_ids"]) for item in batch)
        padded += longest * len(batch)
        real += sum(len(item["input_ids"]) for item in batch)
    return {
        "seconds": seconds,
        "tokens": real,
        "final_loss": sum(losses[-5:]) / len(losses[-5:]),
        "padding_fraction": 1 - real / padded,
        "peak_rss_mib": peak_rss_mib(),
    }


def child(arguments: argparse.Namespace) -> None:
    rows = json.loads(Path(arguments.data).read_text())
    runner = run_product if arguments.child == "product" else run_reference
    print(json.dumps(runner(Path(arguments.base), rows, arguments.steps, arguments.batch_size, arguments.threads)))


def run_child(kind: str, base: Path, data: Path, steps: int, batch_size: int, threads: int) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--base", str(base), "--data", str(data),
               "--steps", str(steps), "--batch-size", str(batch_size), "--threads", str(threads)]
    environment = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    completed = subprocess.run(command, capture_output=True, text=True, env=environment)
    if completed.returncode != 0:
        raise SystemExit(f"The {kind} run failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def prep_seconds(base: Path, count: int) -> float:
    """Seconds to tokenize and batch `count` examples, the part of a run that grows with the data."""
    from adapters_app.serving.base import load_base_model
    from training_app.trainer_data import length_grouped_batches, tokenize_examples

    class Pair:
        def __init__(self, row: dict) -> None:
            self.prompt, self.completion = row["prompt"], row["completion"]

    tokenizer = load_base_model(str(base)).tokenizer
    examples = [Pair(row) for row in make_examples(count, seed=count)]
    started = time.perf_counter()
    tokenized = tokenize_examples(tokenizer, examples, 256)
    list(length_grouped_batches([len(example) for example in tokenized], 8, 0, 1))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Fewer steps; finishes in minutes on 2 CPU cores.")
    parser.add_argument("--steps", type=int, help="Optimizer steps per side (default 12 quick, 40 full).")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--child", choices=["product", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        child(arguments)
        return

    steps = arguments.steps or (12 if arguments.quick else 40)
    with tempfile.TemporaryDirectory(prefix="loraweb-bench-") as folder:
        base = Path(folder) / "gpt2-random"
        build_base(base)
        data = Path(folder) / "rows.json"
        data.write_text(json.dumps(make_examples(steps * arguments.batch_size, seed=0)))

        product = run_child("product", base, data, steps, arguments.batch_size, arguments.threads)
        reference = run_child("reference", base, data, steps, arguments.batch_size, arguments.threads)

        print(f"steps: {steps}")
        print(f"batch_size: {arguments.batch_size}")
        print(f"product_tokens_per_second: {product['tokens'] / product['seconds']:.1f}")
        print(f"reference_tokens_per_second: {reference['tokens'] / reference['seconds']:.1f}")
        # Both sides see the same examples, so equal real tokens over time is the throughput.
        print(f"throughput_vs_reference: {reference['seconds'] / product['seconds']:.3f}")
        print(f"product_peak_rss_mib: {product['peak_rss_mib']:.0f}")
        print(f"reference_peak_rss_mib: {reference['peak_rss_mib']:.0f}")
        print(f"peak_rss_vs_reference: {product['peak_rss_mib'] / reference['peak_rss_mib']:.3f}")
        print(f"padding_fraction: {product['padding_fraction']:.3f}")
        print(f"reference_padding_fraction: {reference['padding_fraction']:.3f}")
        print(f"product_final_loss: {product['final_loss']:.3f}")
        print(f"reference_final_loss: {reference['final_loss']:.3f}")

        sizes = (1000, 2000, 4000, 8000, 16000)
        timings = {size: prep_seconds(base, size) for size in sizes}
        for size in sizes:
            print(f"prep_seconds_{size}: {timings[size]:.2f}")
        print(f"prep_growth_16k_over_1k: {timings[16000] / timings[1000]:.2f}")


if __name__ == "__main__":
    main()
