"""Serving benchmark: multi-LoRA batches against the bare base, PEFT and one-by-one serving.

Every figure compares runs made side by side in this process, interleaved over repeats, on a
full-size GPT-2 architecture (`GPT2Config()`: 12 layers, width 768) with random weights, so
nothing is downloaded. Adapters are rank 8 on c_attn, c_proj and c_fc with random non-zero A
and B. The workload is 16 requests over 8 adapters, 32 prompt and 32 new tokens each (greedy,
end-of-text ignored so every request produces all 32 tokens).

Run: `.venv/bin/python bench/serving.py [--quick] [--skip-http]`. Output is one `name: value`
per line. `--quick` uses fewer repeats and finishes in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from adapters_app.serving.adapters import (  # noqa: E402
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    AdapterCache,
    file_sha256,
    read_adapter,
)
from adapters_app.serving.base import BaseModel, build_gpt2_tokenizer, state_dict_hash  # noqa: E402
from adapters_app.serving.engine import Engine, GenerationRequest  # noqa: E402
from adapters_app.serving.prompting import format_prompt  # noqa: E402
from adapters_app.serving.scheduler import Scheduler  # noqa: E402

logger = logging.getLogger("bench.serving")

RANK = 8
ALPHA = 16
TARGET_MODULES = ("c_attn", "c_proj", "c_fc")
ADAPTER_COUNT = 8
REQUEST_COUNT = 16
PROMPT_TOKENS = 32
NEW_TOKENS = 32
HTTP_CLIENTS = 64
HTTP_TASKS = 16
# Words that GPT-2's tokenizer keeps as one token each, so prompts have an exact length.
PROMPT_WORDS = (
    " the", " of", " and", " to", " in", " is", " was", " for", " on", " that", " with",
    " as", " at", " by", " from", " it", " an", " be", " this", " which", " or", " are",
)


def build_base(seed: int = 0) -> BaseModel:
    """Build a frozen GPT-2 of the default size with random weights and the real tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config()).eval().requires_grad_(False)
    return BaseModel(
        model=model,
        tokenizer=build_gpt2_tokenizer(),
        model_id="gpt2-random",
        weight_hash=state_dict_hash(model),
        is_tiny=False,
    )


def write_adapter(base: BaseModel, folder: Path, seed: int) -> Path:
    """Write a PEFT-format rank-8 LoRA with random non-zero A and B for every targetable module."""
    from safetensors.torch import save_file
    from transformers.pytorch_utils import Conv1D

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, module in base.model.named_modules():
        if isinstance(module, Conv1D) and path.rsplit(".", 1)[-1] in TARGET_MODULES:
            in_features, out_features = module.weight.shape
            key = f"base_model.model.{path}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, in_features, generator=generator) * 0.02
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, RANK, generator=generator) * 0.02
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / ADAPTER_WEIGHTS_NAME))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": RANK,
        "lora_alpha": ALPHA,
        "lora_dropout": 0.0,
        "target_modules": list(TARGET_MODULES),
        "fan_in_fan_out": True,
        "bias": "none",
        "base_model_name_or_path": None,
    }
    (folder / ADAPTER_CONFIG_NAME).write_text(json.dumps(config), encoding="utf-8")
    return folder


def make_prompts(base: BaseModel, count: int, seed: int = 1) -> list[str]:
    """Return prompts of exactly PROMPT_TOKENS tokens once the serving separator is added."""
    chooser = random.Random(seed)
    prompts = []
    for _ in range(count):
        prompt = "".join(chooser.choice(PROMPT_WORDS) for _ in range(PROMPT_TOKENS - 1))
        length = len(base.tokenizer(format_prompt(prompt), add_special_tokens=False)["input_ids"])
        assert length == PROMPT_TOKENS, f"prompt has {length} tokens, expected {PROMPT_TOKENS}"
        prompts.append(prompt)
    return prompts


def mixed_requests(
    prompts: Sequence[str], adapters: Sequence[tuple[str, Path]], *, bare: bool = False
) -> list[GenerationRequest]:
    """Request i uses adapter i mod 8, so the batch interleaves adapters as real traffic does."""
    requests = []
    for index, prompt in enumerate(prompts):
        key, folder = adapters[index % len(adapters)]
        requests.append(
            GenerationRequest(
                prompt=prompt,
                adapter_key=None if bare else key,
                adapter_path=None if bare else folder,
                max_new_tokens=NEW_TOKENS,
                ignore_eos=True,
            )
        )
    return requests


def timed(function: Callable[[], object]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def interleaved(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Run each callable `repeats` times, alternating between them, and return median seconds."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            seconds[name].append(timed(run))
    return {name: statistics.median(values) for name, values in seconds.items()}


def paired_ratio(numerator: Callable[[], object], denominator: Callable[[], object], pairs: int) -> float:
    """Return the median over `pairs` of numerator time / denominator time, each pair run back to back.

    The order alternates (AB, BA, ...) so that a slow drift of the machine favours neither
    side, and each ratio compares two runs seconds apart, which cancels most of the load that
    other processes put on the shared cores.
    """
    ratios: list[float] = []
    for index in range(pairs):
        if index % 2 == 0:
            top = timed(numerator)
            bottom = timed(denominator)
        else:
            bottom = timed(denominator)
            top = timed(numerator)
        ratios.append(top / bottom)
    return statistics.median(ratios)


def peft_model_with(base: BaseModel, adapters: Sequence[tuple[str, Path]]):
    """Load every adapter into one PeftModel on a private copy of the base."""
    import copy

    from peft import PeftModel

    model = copy.deepcopy(base.model)
    first_key, first_folder = adapters[0]
    peft_model = PeftModel.from_pretrained(model, first_folder, adapter_name=first_key)
    for key, folder in adapters[1:]:
        peft_model.load_adapter(folder, adapter_name=key)
    return peft_model.eval()


def peft_generate(peft_model, base: BaseModel, prompts: Sequence[str], adapter_names: Sequence[str]) -> None:
    encoded = [base.tokenizer(format_prompt(prompt), add_special_tokens=False)["input_ids"] for prompt in prompts]
    input_ids = torch.tensor(encoded)  # [batch, PROMPT_TOKENS], equal lengths so no padding
    with torch.inference_mode():
        peft_model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            adapter_names=list(adapter_names),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=base.tokenizer.eos_token_id,
        )


def peft_sequential(peft_model, base: BaseModel, prompts: Sequence[str], adapter_names: Sequence[str]) -> None:
    """Serve each request alone after `set_adapter`, as a server without batching does."""
    for prompt, name in zip(prompts, adapter_names):
        peft_model.set_adapter(name)
        encoded = base.tokenizer(format_prompt(prompt), add_special_tokens=False)["input_ids"]
        input_ids = torch.tensor([encoded])
        with torch.inference_mode():
            peft_model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=base.tokenizer.eos_token_id,
            )


def token_intervals(engine: Engine, request: GenerationRequest) -> list[float]:
    """Return the seconds between consecutive streamed tokens of one request served alone."""
    stamps: list[float] = []
    request.on_token = lambda piece: stamps.append(time.perf_counter())
    try:
        engine.generate_one(request)
    finally:
        request.on_token = None
    return [later - earlier for earlier, later in zip(stamps, stamps[1:])]


def measure_engine(
    base: BaseModel, engine: Engine, prompts: list[str], adapters: list[tuple[str, Path]], repeats: int
) -> dict[str, float]:
    """Mixed batch against the base, PEFT's mixed batch and PEFT one request at a time."""
    mixed = mixed_requests(prompts, adapters)
    bare = mixed_requests(prompts, adapters, bare=True)
    engine.generate(mixed)  # warm-up, and loads the adapters
    engine.generate(bare)

    peft_model = peft_model_with(base, adapters)
    names = [adapters[index % len(adapters)][0] for index in range(len(prompts))]
    peft_generate(peft_model, base, prompts[:2], names[:2])  # warm-up

    medians = interleaved(
        {
            "base": lambda: engine.generate(bare),
            "mixed": lambda: engine.generate(mixed),
            "peft": lambda: peft_generate(peft_model, base, prompts, names),
        },
        repeats,
    )
    sequential_seconds = timed(lambda: peft_sequential(peft_model, base, prompts, names))
    del peft_model
    mixed_vs_base = paired_ratio(lambda: engine.generate(mixed), lambda: engine.generate(bare), pairs=3 * repeats)

    # The median over every token interval of every run resists the bursts of other load on
    # the machine better than a mean per run.
    single = mixed[0]
    single_bare = bare[0]
    single_seconds: dict[str, list[float]] = {"adapter": [], "base": []}
    for _ in range(max(repeats, 5)):
        single_seconds["adapter"].extend(token_intervals(engine, single))
        single_seconds["base"].extend(token_intervals(engine, single_bare))

    tokens = len(prompts) * NEW_TOKENS
    return {
        "mixed_seconds": medians["mixed"],
        "base_seconds": medians["base"],
        "peft_seconds": medians["peft"],
        "sequential_seconds": sequential_seconds,
        "mixed_vs_base": mixed_vs_base,
        "mixed_vs_base_of_medians": medians["mixed"] / medians["base"],
        "mixed_vs_peft": medians["mixed"] / medians["peft"],
        "batched_vs_sequential": (tokens / medians["mixed"]) / (tokens / sequential_seconds),
        "single_stream_vs_base": statistics.median(single_seconds["adapter"])
        / statistics.median(single_seconds["base"]),
        "single_stream_ms_per_token": statistics.median(single_seconds["adapter"]) * 1000,
    }


def measure_hot_switch(engine: Engine, adapters: list[tuple[str, Path]], repeats: int) -> float:
    """Median ms to switch a one-row batch to another cached adapter: cache lookup and plan."""
    requests = [
        GenerationRequest(prompt="Hello", adapter_key=key, adapter_path=folder, max_new_tokens=1)
        for key, folder in adapters[:2]
    ]
    for request in requests:
        engine.prepare(request)
    samples = []
    for index in range(max(repeats, 50)):
        request = requests[index % 2]
        started = time.perf_counter()
        adapter, hit = engine.load_adapter(request)
        engine.plan_for([adapter])
        samples.append((time.perf_counter() - started) * 1000)
        assert hit
    return statistics.median(samples)


def measure_cold_loads(base: BaseModel, adapters: list[tuple[str, Path]], loads: int) -> dict[str, float]:
    """p50 ms of reading a rank-8 adapter (sha256 included) into an empty and a full 200-entry cache.

    The full cache evicts its least recently used adapter on each load, as a serving process at
    capacity does, so both cases reuse freed memory. The adapter files are in the page cache.
    """
    hashes = {key: file_sha256(folder / ADAPTER_WEIGHTS_NAME) for key, folder in adapters}

    def load_into(cache: AdapterCache, key: str, source: tuple[str, Path]) -> float:
        source_key, folder = source
        started = time.perf_counter()
        cache.get_or_load(
            key, lambda: read_adapter(folder, base, key=key, expected_sha256=hashes[source_key])
        )
        return (time.perf_counter() - started) * 1000

    empty_samples = []
    for index in range(loads):
        cache = AdapterCache(max_adapters=1000, max_bytes=1 << 40)
        empty_samples.append(load_into(cache, f"cold-{index}", adapters[index % len(adapters)]))

    full = AdapterCache(max_adapters=200, max_bytes=1 << 40)
    for index in range(200):
        load_into(full, f"filler-{index}", adapters[index % len(adapters)])
    full_samples = [
        load_into(full, f"extra-{index}", adapters[index % len(adapters)]) for index in range(loads)
    ]
    assert len(full) == 200
    return {
        "cold_load_ms_p50": statistics.median(empty_samples),
        "cold_load_ms_p50_at_200": statistics.median(full_samples),
        "adapter_bytes": full.stats().bytes / full.stats().count,
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def run_clients(send: Callable[[int], int], count: int) -> dict[str, float]:
    """Start `count` clients at once; each calls send(i), which returns completion tokens."""
    latencies: list[float] = [0.0] * count
    tokens: list[int] = [0] * count
    errors: list[str] = []
    barrier = threading.Barrier(count)

    def client(index: int) -> None:
        barrier.wait()
        started = time.perf_counter()
        try:
            tokens[index] = send(index)
        except Exception as error:  # noqa: BLE001 - counted and printed below
            errors.append(repr(error))
        latencies[index] = time.perf_counter() - started

    threads = [threading.Thread(target=client, args=(index,)) for index in range(count)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} of {count} requests failed, first: {errors[0]}")
    return {
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p95_ms": percentile(latencies, 0.95) * 1000,
        "tokens_per_second": sum(tokens) / wall,
    }


def http_environment(work: Path, base_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "loraweb.settings",
            "LORAWEB_VAR_DIR": str(work / "var"),
            "LORAWEB_BASE_MODEL": str(base_dir),
            "LORAWEB_ADAPTER_ROOT": str(work / "adapters"),
            "LORAWEB_MAX_BATCH_SIZE": "16",
            "LORAWEB_MAX_QUEUE": str(HTTP_CLIENTS * 2),
            "LORAWEB_REQUEST_TIMEOUT_S": "600",
            "LORAWEB_MAX_NEW_TOKENS": str(NEW_TOKENS),
            "LORAWEB_LOG_LEVEL": "WARNING",
            "LORAWEB_ROLE": "all",
            # The server runs alone here, so it gets the engine's threads, not the half of the
            # cores that the role "all" defaults to for sharing a machine with a worker.
            "LORAWEB_TORCH_THREADS": str(torch.get_num_threads()),
            # This compares the web layer with the engine, so one user sends every request.
            "LORAWEB_RATE_LIMIT_COMPLETIONS": "off",
        }
    )
    return env


def prepare_http_database(env: dict[str, str], adapters: list[tuple[str, Path]], weight_hash: str) -> str:
    """Create the database, 16 tasks with an active version each, and an API token; return it."""
    Path(env["LORAWEB_VAR_DIR"]).mkdir(parents=True, exist_ok=True)
    os.environ.update({key: value for key, value in env.items() if key.startswith(("LORAWEB_", "DJANGO_"))})
    import django

    django.setup()
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from adapters_app.models import AdapterVersion
    from adapters_app.roles import SYSTEM
    from adapters_app.services import api_token_create, task_create, version_activate

    call_command("migrate", verbosity=0)
    from django.contrib.auth.models import Group

    user = get_user_model().objects.create_user("bench", password="bench-only-password")
    user.groups.add(Group.objects.get(name="viewer"))  # completions need the viewer role
    adapter_root = Path(settings.LORAWEB_ADAPTER_ROOT)
    for index in range(HTTP_TASKS):
        task = task_create(slug=f"task-{index}", name=f"Task {index}", user=SYSTEM)
        key, folder = adapters[index % len(adapters)]
        target = adapter_root / f"task-{index}" / "v1"
        shutil.copytree(folder, target)
        version = AdapterVersion.objects.create(
            task=task,
            number=1,
            status=AdapterVersion.Status.READY,
            base_model_id=task.base_model_id,
            base_weight_hash=weight_hash,
            storage_path=str(target.relative_to(adapter_root)),
            sha256=file_sha256(target / ADAPTER_WEIGHTS_NAME),
            size_bytes=(target / ADAPTER_WEIGHTS_NAME).stat().st_size,
        )
        version_activate(version, reason="benchmark", user=SYSTEM)
    return api_token_create(user, name="bench", user=SYSTEM)[1]


def wait_for_server(port: int, process: subprocess.Popen, timeout: float = 180) -> None:
    import http.client

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the server did not respond on port {port} within {timeout} s")


def measure_http(base: BaseModel, engine: Engine, adapters: list[tuple[str, Path]], work: Path) -> dict[str, float]:
    """64 concurrent clients over 16 tasks through uvicorn, against the same load on the engine."""
    import http.client

    base_dir = work / "base"
    base.model.save_pretrained(base_dir)
    base.tokenizer.save_pretrained(base_dir)
    env = http_environment(work, base_dir)
    token = prepare_http_database(env, adapters, base.weight_hash)
    prompts = make_prompts(base, HTTP_CLIENTS, seed=2)

    port = free_port()
    log_path = work / "uvicorn.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "loraweb.asgi:application", "--host", "127.0.0.1",
             "--port", str(port), "--no-access-log"],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            wait_for_server(port, process)

            def send(index: int) -> int:
                body = json.dumps(
                    {"model": f"task-{index % HTTP_TASKS}", "prompt": prompts[index],
                     "max_tokens": NEW_TOKENS, "temperature": 0}
                )
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
                connection.request(
                    "POST", "/v1/completions", body,
                    {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
                )
                response = connection.getresponse()
                payload = json.loads(response.read())
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {payload}")
                return int(payload["usage"]["completion_tokens"])

            send(0)  # loads the base model in the server
            for index in range(1, HTTP_TASKS):
                send(index)  # loads every adapter, as a warm server has them
            http_figures = run_clients(send, HTTP_CLIENTS)
        finally:
            process.terminate()
            process.wait(timeout=30)

    scheduler = Scheduler(engine, batch_window_ms=5, max_batch_size=16, max_queue=HTTP_CLIENTS * 2).start()
    try:
        def submit(index: int) -> int:
            key, folder = adapters[(index % HTTP_TASKS) % len(adapters)]
            request = GenerationRequest(
                prompt=prompts[index], adapter_key=key, adapter_path=folder, max_new_tokens=NEW_TOKENS
            )
            return scheduler.submit(request).result(timeout=600).completion_tokens

        engine_figures = run_clients(submit, HTTP_CLIENTS)
    finally:
        scheduler.stop()
    return {
        "http_p50_ms": http_figures["p50_ms"],
        "http_p95_ms": http_figures["p95_ms"],
        "http_tokens_per_second": http_figures["tokens_per_second"],
        "engine_p50_ms": engine_figures["p50_ms"],
        "engine_p95_ms": engine_figures["p95_ms"],
        "engine_tokens_per_second": engine_figures["tokens_per_second"],
        "http_vs_engine_tokens_per_second": http_figures["tokens_per_second"]
        / engine_figures["tokens_per_second"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 7 (a few minutes on 2 cores)")
    parser.add_argument("--skip-http", action="store_true", help="leave out the HTTP end-to-end figure")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all CPUs)")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sys.stdout.reconfigure(line_buffering=True)  # each figure shows up as soon as it is measured
    repeats = 3 if arguments.quick else 7
    torch.set_num_threads(arguments.threads)

    started = time.perf_counter()
    print(f"model: GPT2Config() random weights (12 layers, 768 wide), float32, {arguments.threads} torch threads")
    print(f"workload: {REQUEST_COUNT} requests over {ADAPTER_COUNT} rank-{RANK} adapters, "
          f"{PROMPT_TOKENS} prompt + {NEW_TOKENS} new tokens, greedy, {repeats} repeats (median)")
    base = build_base()
    work = Path(tempfile.mkdtemp(prefix="loraweb-bench-"))
    try:
        adapters = [
            (f"adapter-{index}", write_adapter(base, work / "source" / f"adapter-{index}", seed=100 + index))
            for index in range(ADAPTER_COUNT)
        ]
        prompts = make_prompts(base, REQUEST_COUNT)
        engine = Engine(base, cache_max_adapters=64, cache_max_bytes=1 << 34)

        figures = measure_engine(base, engine, prompts, adapters, repeats)
        print(f"mixed_vs_base: {figures['mixed_vs_base']:.3f}")
        print(f"mixed_vs_base_of_medians: {figures['mixed_vs_base_of_medians']:.3f}")
        print(f"mixed_vs_peft: {figures['mixed_vs_peft']:.3f}")
        print(f"batched_vs_sequential: {figures['batched_vs_sequential']:.2f}")
        print(f"single_stream_vs_base: {figures['single_stream_vs_base']:.3f}")
        print(f"hot_switch_ms: {measure_hot_switch(engine, adapters, repeats):.3f}")
        cold = measure_cold_loads(base, adapters, loads=20 if arguments.quick else 50)
        print(f"cold_load_ms_p50: {cold['cold_load_ms_p50']:.1f}")
        print(f"cold_load_ms_p50_at_200: {cold['cold_load_ms_p50_at_200']:.1f}")
        print(f"mixed_batch_s: {figures['mixed_seconds']:.2f}")
        print(f"base_batch_s: {figures['base_seconds']:.2f}")
        print(f"peft_mixed_batch_s: {figures['peft_seconds']:.2f}")
        print(f"sequential_s: {figures['sequential_seconds']:.2f}")
        print(f"single_stream_ms_per_token: {figures['single_stream_ms_per_token']:.1f}")
        print(f"adapter_bytes: {cold['adapter_bytes']:.0f}")

        if not arguments.skip_http:
            print(f"http_workload: {HTTP_CLIENTS} concurrent clients over {HTTP_TASKS} tasks through uvicorn, "
                  f"same model as above, {PROMPT_TOKENS} prompt + up to {NEW_TOKENS} new tokens")
            http = measure_http(base, engine, adapters, work)
            for name in ("http_p50_ms", "http_p95_ms", "http_tokens_per_second", "engine_p50_ms",
                         "engine_p95_ms", "engine_tokens_per_second", "http_vs_engine_tokens_per_second"):
                print(f"{name}: {http[name]:.2f}")
        engine.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"total_s: {time.perf_counter() - started:.0f}")


if __name__ == "__main__":
    main()
