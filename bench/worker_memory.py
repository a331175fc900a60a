"""Memory of a real Celery training worker across consecutive jobs, with and without child recycling.

Starts a private `redis-server` and, for each setting of LORAWEB_WORKER_MAX_TASKS_PER_CHILD
(1: a fresh pool process per job, 0: one pool process for ever), a real
`celery -A loraweb worker --concurrency=1`. It trains the same small job N times in a row
and after each one prints the resident set size (RSS) of the worker's processes, parent and
pool child together, plus the largest RSS sampled while the job ran. Everything lives in a
temporary folder (SQLite database, adapters, the base model).

    .venv/bin/python bench/worker_memory.py [--model gpt2-random|tiny] [--jobs 5] [--steps 4]

`gpt2-random` is GPT2Config() (124M parameters) with random weights, the same compute as
GPT-2; `tiny` is the test suite's two-layer base. Output is one `name: value` per line.
Linux only (psutil reads /proc).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
MIB = 1024 * 1024
SETTINGS = {"recycled": "1", "kept": "0"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def build_base(kind: str, folder: Path) -> None:
    from adapters_app.serving.base import build_gpt2_tokenizer, build_tiny_gpt2

    if kind == "tiny":
        build_tiny_gpt2(folder)
        return
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder)
    build_gpt2_tokenizer().save_pretrained(folder)


def tree_rss(pid: int) -> tuple[int, int]:
    """Return the summed RSS of a process and its descendants, and the largest single one."""
    import psutil

    try:
        parent = psutil.Process(pid)
        processes = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    sizes = []
    for process in processes:
        try:
            sizes.append(process.memory_info().rss)
        except psutil.NoSuchProcess:
            continue
    return sum(sizes), max(sizes, default=0)


def wait_ready(log_path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"worker exited; see {log_path}")
        if b" ready." in log_path.read_bytes():
            return
        time.sleep(0.2)
    raise RuntimeError(f"worker not ready; see {log_path}")


def run_setting(name: str, env: dict[str, str], folder: Path, jobs: int, steps: int) -> None:
    from adapters_app.roles import SYSTEM
    from training_app import services
    from training_app.models import Dataset, TrainingJob

    worker_env = {**env, "LORAWEB_WORKER_MAX_TASKS_PER_CHILD": SETTINGS[name]}
    log_path = folder / f"worker-{name}.log"
    with log_path.open("ab") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "loraweb", "worker", "--loglevel=INFO", "--concurrency=1",
             "--pool=prefork", "--queues=bench", f"--hostname=bench-{name}@%h"],
            cwd=REPO_ROOT, env=worker_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        wait_ready(log_path, worker)
        time.sleep(2)
        total, _largest = tree_rss(worker.pid)
        print(f"{name}_rss_mib_before_jobs: {total / MIB:.1f}", flush=True)
        dataset = Dataset.objects.get()
        hyperparameters = {"epochs": 1, "max_steps": steps, "batch_size": 4, "max_length": 64, "eval_every": 0}
        for index in range(1, jobs + 1):
            job = services.training_start(
                dataset.task, dataset_ids=[dataset.pk], warm_start=False, hyperparameters=hyperparameters, user=SYSTEM
            )
            peak = 0
            started = time.monotonic()
            while True:
                job.refresh_from_db()
                if job.is_final:
                    break
                peak = max(peak, tree_rss(worker.pid)[0])
                time.sleep(0.5)
            if job.state != TrainingJob.State.SUCCEEDED:
                raise RuntimeError(f"job {job.pk} ended {job.state}: {job.error}")
            # Let a recycled pool process exit and its replacement start.
            time.sleep(3)
            total, largest = tree_rss(worker.pid)
            print(f"{name}_job{index}_seconds: {time.monotonic() - started:.1f}", flush=True)
            print(f"{name}_job{index}_peak_rss_mib: {peak / MIB:.1f}", flush=True)
            print(f"{name}_job{index}_rss_mib_after: {total / MIB:.1f}", flush=True)
            print(f"{name}_job{index}_largest_process_mib_after: {largest / MIB:.1f}", flush=True)
    finally:
        os.killpg(worker.pid, 15)
        worker.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("gpt2-random", "tiny"), default="gpt2-random")
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    arguments = parser.parse_args()
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is needed: the benchmark runs a private one")

    folder = Path(tempfile.mkdtemp(prefix="loraweb-worker-memory-"))
    port = free_port()
    redis_server = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", str(folder)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        base = folder / "base"
        build_base(arguments.model, base)
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "loraweb.settings",
            "LORAWEB_VAR_DIR": str(folder),
            "LORAWEB_SQLITE_PATH": str(folder / "bench.sqlite3"),
            "LORAWEB_BASE_MODEL": str(base),
            "LORAWEB_REDIS_URL": f"redis://127.0.0.1:{port}/0",
            "LORAWEB_CELERY_QUEUE": "bench",
            "LORAWEB_TORCH_THREADS": str(os.cpu_count() or 1),
        }
        env.pop("DATABASE_URL", None)
        os.environ.update(env)
        subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=REPO_ROOT, env=env, check=True)

        import django

        django.setup()
        from adapters_app.roles import SYSTEM
        from adapters_app.services import task_create
        from training_app import demo_data, services

        files = demo_data.write_demo_datasets(folder / "data")
        task = task_create(slug="memory", name="Memory", user=SYSTEM)
        with files["spell_digits_A1"].open("rb") as handle:
            services.dataset_upload(task, handle, original_name="a1.jsonl", user=SYSTEM)

        import torch

        print(f"model: {arguments.model}", flush=True)
        print(f"jobs: {arguments.jobs} x {arguments.steps} steps, batch 4, max_length 64, then evaluation and golden prompts")
        print(f"cpus: {os.cpu_count()}, python {platform.python_version()}, torch {torch.__version__}", flush=True)
        for name in SETTINGS:
            run_setting(name, env, folder, arguments.jobs, arguments.steps)
    finally:
        redis_server.terminate()
        redis_server.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
