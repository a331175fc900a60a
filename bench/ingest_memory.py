"""Dataset validation benchmark: peak memory growth and time of checking a large JSONL file.

Generates a JSONL file of prompt/completion pairs (200 MiB by default, about 1% exact
duplicates and some non-ASCII text) in a temporary folder, then runs two readers of it, each
in a fresh subprocess so neither inherits the other's memory:

- product: `training_app.ingest.ingest_dataset`, the upload path, with the real GPT-2
  tokenizer counting every example's tokens and the prepared file written to disk.
- baseline: read the file whole, `json.loads` per line into a list, no token counting.

Each subprocess imports everything and builds the tokenizer first, then records its resident
set size (RSS) and runs. It reports the peak RSS above that starting point twice: sampled
every 5 ms from /proc/self/statm, and from `resource.getrusage` (ru_maxrss). The latter can
only overstate the growth, because it also covers the tokenizer's start-up peak.

Run: `.venv/bin/python bench/ingest_memory.py [--size-mib 200]`. Output is one `name: value`
per line. Linux only (/proc). The product run tokenizes at a few MB/s on one core, so the
default size takes minutes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# Memory growth the product must stay under on the default file, in MiB.
GOAL_PEAK_GROWTH_MIB = 100
SAMPLE_INTERVAL_SECONDS = 0.005
MIB = 1024 * 1024

_WORDS = (
    "the of and to in is was that for on with as by at from this have not are but had his they "
    "which one you were her all she there would their we him been has when who will more no if "
    "out so said what up its about into than them can only other new some could time these two "
    "may then do first any my now such like our over man me even most made after also did many "
    "river mountain garden letter window morning evening winter summer question answer number "
    "station market library teacher student kitchen journey harbour village forest silence"
).split()
_ACCENTED = "café naïve déjà façade jalapeño über smörgåsbord 东京 北京 日本語 ünïcödé".split()


def _sentence(generator: random.Random, low: int, high: int) -> str:
    words = [generator.choice(_WORDS) for _ in range(generator.randint(low, high))]
    if generator.random() < 0.2:
        words.insert(generator.randrange(len(words)), generator.choice(_ACCENTED))
    return " ".join(words).capitalize() + "."


def generate(path: Path, size_bytes: int, seed: int = 0) -> int:
    """Write prompt/completion lines until the file reaches `size_bytes`; return the line count."""
    generator = random.Random(seed)
    prompts = [_sentence(generator, 4, 16) for _ in range(4000)]
    paragraphs = [" ".join(_sentence(generator, 6, 20) for _ in range(generator.randint(2, 9))) for _ in range(8000)]

    lines = 0
    recent: list[str] = []
    with path.open("w", encoding="utf-8") as handle:
        while handle.tell() < size_bytes:
            if recent and generator.random() < 0.01:
                line = generator.choice(recent)
            else:
                record = {"prompt": generator.choice(prompts), "completion": generator.choice(paragraphs)}
                # The id keeps most lines distinct although prompts and paragraphs repeat.
                record["completion"] += f" ({lines})"
                line = json.dumps(record, ensure_ascii=False) + "\n"
                recent = (recent + [line])[-100:]
            handle.write(line)
            lines += 1
    return lines


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = _rss_bytes()
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(SAMPLE_INTERVAL_SECONDS):
            self.peak = max(self.peak, _rss_bytes())


def _run_product(path: Path) -> dict:
    from adapters_app.serving.base import build_gpt2_tokenizer
    from training_app.ingest import ingest_dataset

    tokenizer = build_gpt2_tokenizer()
    output = path.with_name("prepared.jsonl")

    def run() -> dict:
        report = ingest_dataset(path, path.name, output, tokenizer=tokenizer)
        return {
            "examples": report.num_examples,
            "duplicates": report.num_duplicates,
            "tokens": report.tokens.total,
            "max_tokens": report.tokens.max,
        }

    return _measure(run)


def _run_baseline(path: Path) -> dict:
    def run() -> dict:
        with path.open(encoding="utf-8") as handle:
            records = [json.loads(line) for line in handle]
        return {"examples": len(records)}

    return _measure(run)


def _measure(run) -> dict:
    gc.collect()
    before = _rss_bytes()
    sampler = _PeakSampler()
    sampler.start()
    started = time.perf_counter()

    result = run()

    seconds = time.perf_counter() - started
    sampler.stopped.set()
    sampler.join()
    peak_sampled = max(sampler.peak, _rss_bytes())
    peak_rusage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        **result,
        "seconds": seconds,
        "rss_before_mib": before / MIB,
        "peak_growth_mib": (peak_sampled - before) / MIB,
        "peak_growth_rusage_mib": (peak_rusage - before) / MIB,
    }


def _child(kind: str, path: Path) -> None:
    runner = _run_product if kind == "product" else _run_baseline
    print(json.dumps(runner(path)))


def _spawn(kind: str, path: Path) -> dict:
    completed = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--data", str(path)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=float, default=200.0, help="size of the generated JSONL file in MiB")
    parser.add_argument("--child", choices=["product", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    arguments = parser.parse_args()

    if arguments.child:
        _child(arguments.child, Path(arguments.data))
        return

    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as folder:
        path = Path(folder) / "bench.jsonl"
        started = time.perf_counter()
        lines = generate(path, int(arguments.size_mib * MIB))
        print(f"file_mib: {path.stat().st_size / MIB:.1f}")
        print(f"lines: {lines}")
        print(f"generate_seconds: {time.perf_counter() - started:.1f}")

        product = _spawn("product", path)
        baseline = _spawn("baseline", path)

    print(f"product_examples: {product['examples']}")
    print(f"product_duplicates: {product['duplicates']}")
    print(f"product_tokens: {product['tokens']}")
    print(f"product_max_tokens: {product['max_tokens']}")
    print(f"product_seconds: {product['seconds']:.1f}")
    print(f"product_rss_before_mib: {product['rss_before_mib']:.0f}")
    print(f"product_peak_growth_mib: {product['peak_growth_mib']:.1f}")
    print(f"product_peak_growth_rusage_mib: {product['peak_growth_rusage_mib']:.1f}")
    print(f"baseline_examples: {baseline['examples']}")
    print(f"baseline_seconds: {baseline['seconds']:.1f}")
    print(f"baseline_rss_before_mib: {baseline['rss_before_mib']:.0f}")
    print(f"baseline_peak_growth_mib: {baseline['peak_growth_mib']:.1f}")
    print(f"baseline_peak_growth_rusage_mib: {baseline['peak_growth_rusage_mib']:.1f}")
    print(f"peak_growth_vs_baseline: {product['peak_growth_mib'] / baseline['peak_growth_mib']:.3f}")
    print(f"goal_peak_growth_mib: {GOAL_PEAK_GROWTH_MIB}")
    print(f"goal_met: {'yes' if product['peak_growth_rusage_mib'] < GOAL_PEAK_GROWTH_MIB else 'no'}")
    print(f"cpus: {os.cpu_count()}")
    print(f"cpu_model: {_cpu_model()}")
    print(f"python: {platform.python_version()}")


if __name__ == "__main__":
    main()
