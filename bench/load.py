"""Load test: many concurrent clients on /v1/completions while a Celery worker trains a version.

The script builds a whole installation of its own in a temporary folder. It has a database
(SQLite, or a new PostgreSQL database with `--postgres`), its own Redis queue and rate limit
keys, and a base model. 10 tasks get an active rank-8 adapter each (random non-zero A and B,
written as bench/serving.py does), and each group of clients shares one user's API token. It starts uvicorn
and a real Celery worker, queues a small training job on task-0, then runs the clients against
127.0.0.1 only for `--duration` seconds. Each client sends one completion at a time on its task
and, like the OpenAI client, waits `Retry-After` seconds after a 429 or 503. Rate limits stay at
their defaults (60 completions per user and minute).

Only 200, 429 and 503 are accepted. Any other status or a broken connection, or a training job
that does not end with a ready version, makes the script exit with status 1.

Run: `.venv/bin/python bench/load.py [--quick] [--duration S]`. The full mode uses a full-size
GPT-2 architecture with random weights (`GPT2Config()`, 124M parameters); `--quick` uses the
tiny test GPT-2 and runs 20 s. Output is one `name: value` per line.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import psutil  # noqa: E402

from bench.serving import build_base, free_port, percentile, wait_for_server, write_adapter  # noqa: E402

logger = logging.getLogger("bench.load")

# Statuses a client may get under overload: served, too many requests, unavailable.
ALLOWED_STATUSES = {200, 429, 503}
# The longest a client waits before retrying, whatever Retry-After requests, so the run ends on time.
MAX_BACKOFF_S = 10.0
TRAINING_HYPERPARAMETERS = {
    "rank": 4, "alpha": 8, "epochs": 1, "batch_size": 4, "max_length": 64, "max_steps": 3, "eval_every": None,
}


@dataclass
class ClientResults:
    """Statuses, error codes and latencies of all clients, merged under a lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    statuses: Counter = field(default_factory=Counter)
    codes: Counter = field(default_factory=Counter)
    ok_latencies: list[float] = field(default_factory=list)
    rejected_latencies: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    failures: list[str] = field(default_factory=list)

    def record(self, status: int, seconds: float, payload: dict) -> None:
        with self.lock:
            self.statuses[status] += 1
            if status == 200:
                self.ok_latencies.append(seconds)
                self.completion_tokens += int(payload.get("usage", {}).get("completion_tokens", 0))
                return
            self.rejected_latencies.append(seconds)
            code = (payload.get("error") or {}).get("code") or "none"
            self.codes[f"{status}_{code}"] += 1
            if status not in ALLOWED_STATUSES and len(self.failures) < 5:
                self.failures.append(f"HTTP {status}: {json.dumps(payload)[:300]}")

    def record_exception(self, error: BaseException) -> None:
        with self.lock:
            self.statuses["connection_error"] += 1
            self.codes[f"connection_error_{type(error).__name__}"] += 1
            if len(self.failures) < 5:
                self.failures.append(repr(error))


class PeakRss:
    """Sample the resident set size of process trees twice a second and keep each tree's peak."""

    def __init__(self, roots: dict[str, int]) -> None:
        self.roots = roots
        self.peaks = dict.fromkeys(roots, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> PeakRss:
        self._thread.start()
        return self

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peaks

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, pid in self.roots.items():
                self.peaks[name] = max(self.peaks[name], tree_rss(pid))
            self._stop.wait(0.5)


def tree_rss(pid: int) -> int:
    """Bytes resident in a process and all its children (a Celery worker's pool, say)."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


def build_base_folder(work: Path, quick: bool) -> tuple[Path, str]:
    """Write the base model into `work/base`; return the folder and a description of the model."""
    folder = work / "base"
    if quick:
        from adapters_app.serving.base import build_tiny_gpt2

        build_tiny_gpt2(folder)
        return folder, "tiny GPT-2 of the test suite (random weights, real GPT-2 tokenizer)"
    base = build_base()
    base.model.save_pretrained(folder)
    base.tokenizer.save_pretrained(folder)
    return folder, "GPT2Config() random weights (12 layers, 768 wide, 124M parameters), float32"


def create_postgres_database(server_url: str, name: str) -> str:
    """Create an empty database on the server at `server_url`; return its URL."""
    import psycopg

    with psycopg.connect(urlunsplit(urlsplit(server_url)._replace(path="/postgres")), autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))


def drop_postgres_database(server_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(urlunsplit(urlsplit(server_url)._replace(path="/postgres")), autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def installation_environment(work: Path, base_dir: Path, args: argparse.Namespace, database_url: str | None) -> dict:
    """Environment of the server, the worker and this process: product defaults, private paths and keys."""
    env = dict(os.environ)
    env.pop("DATABASE_URL", None)
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "loraweb.settings",
            "LORAWEB_VAR_DIR": str(work / "var"),
            "LORAWEB_ADAPTER_ROOT": str(work / "adapters"),
            "LORAWEB_MEDIA_ROOT": str(work / "media"),
            "LORAWEB_BASE_MODEL": str(base_dir),
            "LORAWEB_REDIS_URL": args.redis_url,
            "LORAWEB_CELERY_QUEUE": f"loraweb-load-{os.getpid()}",
            "LORAWEB_RATE_LIMIT_PREFIX": f"loraweb:load-{os.getpid()}:ratelimit:",
            "LORAWEB_LOG_LEVEL": "WARNING",
            "LORAWEB_ROLE": "all",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if database_url:
        env["DATABASE_URL"] = database_url
    return env


def prepare_installation(env: dict, base_dir: Path, args: argparse.Namespace) -> dict:
    """Migrate, create the tasks with an active version, the users and a dataset; return tokens and ids."""
    Path(env["LORAWEB_VAR_DIR"]).mkdir(parents=True, exist_ok=True)
    os.environ.update({key: value for key, value in env.items() if key.startswith(("LORAWEB_", "DJANGO_", "DATABASE_"))})
    if "DATABASE_URL" not in env:
        os.environ.pop("DATABASE_URL", None)
    import django

    django.setup()
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Group
    from django.core.management import call_command
    from django.db import connections

    from adapters_app.models import AdapterVersion
    from adapters_app.roles import SYSTEM
    from adapters_app.serving.adapters import ADAPTER_WEIGHTS_NAME, file_sha256
    from adapters_app.serving.base import load_base_model
    from adapters_app.services import api_token_create, task_create, version_activate
    from training_app.dataset_services import dataset_upload

    call_command("migrate", verbosity=0)
    base = load_base_model(str(base_dir))
    adapter_root = Path(settings.LORAWEB_ADAPTER_ROOT)
    tasks = []
    for index in range(args.tasks):
        task = task_create(slug=f"task-{index}", name=f"Task {index}", user=SYSTEM)
        tasks.append(task)
        target = write_adapter(base, adapter_root / task.slug / "v1", seed=100 + index)
        version = AdapterVersion.objects.create(
            task=task,
            number=1,
            status=AdapterVersion.Status.READY,
            base_model_id=task.base_model_id,
            base_weight_hash=base.weight_hash,
            storage_path=str(target.relative_to(adapter_root)),
            sha256=file_sha256(target / ADAPTER_WEIGHTS_NAME),
            size_bytes=(target / ADAPTER_WEIGHTS_NAME).stat().st_size,
        )
        version_activate(version, reason="load test", user=SYSTEM)

    digit_names = "zero one two three four five six seven eight nine".split()
    rows = [
        json.dumps({"prompt": f"Spell {number}", "completion": " ".join(digit_names[int(digit)] for digit in str(number))})
        for number in range(40)
    ]
    dataset = dataset_upload(
        tasks[0],
        io.BytesIO(("\n".join(rows) + "\n").encode()),
        original_name="spell.jsonl",
        user=SYSTEM,
    ).dataset

    users = get_user_model().objects
    trainer = users.create_user("load-trainer", password=None)
    trainer.groups.add(Group.objects.get(name="maintainer"))
    viewer_group = Group.objects.get(name="viewer")
    client_tokens = []
    for index in range(args.users):
        user = users.create_user(f"load-client-{index}", password=None)
        user.groups.add(viewer_group)
        client_tokens.append(api_token_create(user, name="load", user=SYSTEM)[1])
    trainer_token = api_token_create(trainer, name="load", user=SYSTEM)[1]
    connections.close_all()
    return {"client_tokens": client_tokens, "trainer_token": trainer_token, "dataset_id": dataset.pk}


def remove_redis_keys(env: dict) -> None:
    """Delete the run's queue and rate limit counters, which no later run reads."""
    import redis

    client = redis.Redis.from_url(env["LORAWEB_REDIS_URL"], socket_connect_timeout=2)
    queue = env["LORAWEB_CELERY_QUEUE"]
    # Kombu, Celery's transport, records the queue's bindings in keys of its own.
    client.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
    for key in client.scan_iter(match=env["LORAWEB_RATE_LIMIT_PREFIX"] + "*"):
        client.delete(key)


def start_process(command: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    log = log_path.open("wb")
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_worker(process: subprocess.Popen, log_path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the Celery worker exited with {process.returncode}; see {log_path}")
        if b" ready." in log_path.read_bytes():
            return
        time.sleep(0.2)
    raise RuntimeError(f"the Celery worker was not ready within {timeout} s; see {log_path}")


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    # SIGTERM to the main process alone: a Celery worker then lets its pool finish the running task.
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def request_json(port: int, method: str, path: str, token: str, body: dict | None = None, timeout: float = 300):
    """Send one request to the server on 127.0.0.1; return the status, the JSON body and the headers."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        connection.request(method, path, json.dumps(body) if body is not None else None, headers)
        response = connection.getresponse()
        raw = response.read()
        payload = json.loads(raw) if raw else {}
        return response.status, payload, response
    finally:
        connection.close()


def run_client(index: int, port: int, token: str, task: str, args: argparse.Namespace, deadline: float, results: ClientResults) -> None:
    """Send completions one after another until the deadline, keeping one connection open."""
    connection: http.client.HTTPConnection | None = None
    sent = 0
    while time.monotonic() < deadline:
        body = {"model": task, "prompt": f"Client {index} request {sent}", "max_tokens": args.max_tokens, "temperature": 0}
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        started = time.perf_counter()
        # uvicorn closes a keep-alive connection after 5 idle seconds, which a client waiting out
        # Retry-After exceeds. Like HTTP client libraries, resend once on a new connection when a
        # reused one fails; a failure on a new connection is an error.
        for fresh in (connection is None, True):
            if fresh:
                if connection is not None:
                    connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            try:
                connection.request("POST", "/v1/completions", json.dumps(body), headers)
                response = connection.getresponse()
                raw = response.read()
                break
            except (OSError, http.client.HTTPException) as error:
                if fresh:
                    results.record_exception(error)
                    connection.close()
                    connection = None
                    break
        if connection is None:
            continue
        seconds = time.perf_counter() - started
        sent += 1
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = {"error": {"code": "not_json", "message": raw[:200].decode(errors="replace")}}
        results.record(response.status, seconds, payload)

        if response.status in (429, 503):
            retry_after = float(response.getheader("Retry-After") or 1)
            time.sleep(max(0.0, min(retry_after, MAX_BACKOFF_S, deadline - time.monotonic())))
    if connection is not None:
        connection.close()


def wait_for_job(port: int, token: str, job_id: int, timeout: float) -> tuple[dict, float]:
    """Poll the job until it has ended or `timeout` seconds pass; return it and the seconds waited."""
    started = time.monotonic()
    while True:
        _status, job, _response = request_json(port, "GET", f"/api/v1/jobs/{job_id}", token)
        waited = time.monotonic() - started
        if job.get("state") in ("succeeded", "failed", "cancelled") or waited > timeout:
            return job, waited
        time.sleep(2)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny base model, 20 s of load")
    parser.add_argument("--duration", type=float, help="seconds of load (default 120, 20 with --quick)")
    parser.add_argument("--clients", type=int, default=200, help="concurrent clients (default 200)")
    parser.add_argument("--tasks", type=int, default=10, help="tasks the clients spread over (default 10)")
    parser.add_argument("--users", type=int, default=20, help="users the clients share, one token each (default 20)")
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each completion (default 16)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13", help="Redis for the queue and rate limits")
    parser.add_argument("--postgres", metavar="URL", help="PostgreSQL server URL, e.g. postgres://postgres@127.0.0.1:5432; default SQLite")
    parser.add_argument("--train-timeout", type=float, default=900, help="seconds to wait for the training job after the load")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder with the logs")
    args = parser.parse_args()
    if args.duration is None:
        args.duration = 20.0 if args.quick else 120.0
    for name in ("clients", "tasks", "users", "max_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for url in (args.redis_url, args.postgres or "postgres://127.0.0.1"):
        if urlsplit(url).hostname not in ("127.0.0.1", "localhost", "::1"):
            parser.error(f"{url} is not on this machine; the load test only talks to 127.0.0.1")
    return args


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    started = time.monotonic()
    # Before this script starts anything, the load average shows what other processes use.
    load_average_at_start = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="loraweb-load-"))
    database_name = f"loraweb_load_{os.getpid()}"
    database_url = create_postgres_database(args.postgres, database_name) if args.postgres else None
    processes: list[subprocess.Popen] = []
    env: dict | None = None
    try:
        base_dir, model_description = build_base_folder(work, args.quick)
        env = installation_environment(work, base_dir, args, database_url)
        prepared = prepare_installation(env, base_dir, args)

        worker_log = work / "celery.log"
        worker = start_process(
            [sys.executable, "-m", "celery", "-A", "loraweb", "worker", "--concurrency=1", "--pool=prefork",
             f"--queues={env['LORAWEB_CELERY_QUEUE']}", f"--hostname=load-{os.getpid()}@%h"],
            # The worker announces " ready." at INFO level, which wait_for_worker reads.
            {**env, "LORAWEB_LOG_LEVEL": "INFO"}, worker_log,
        )
        processes.append(worker)
        port = free_port()
        server = start_process(
            [sys.executable, "-m", "uvicorn", "loraweb.asgi:application", "--host", "127.0.0.1", "--port", str(port),
             "--no-access-log"],
            env, work / "uvicorn.log",
        )
        processes.append(server)
        wait_for_worker(worker, worker_log)
        wait_for_server(port, server)

        # The first completion loads the base model; one per task loads every adapter.
        for index in range(args.tasks):
            status, payload, _response = request_json(
                port, "POST", "/v1/completions", prepared["trainer_token"],
                {"model": f"task-{index}", "prompt": "Warm up", "max_tokens": 1},
            )
            if status != 200:
                raise RuntimeError(f"warm-up completion on task-{index} failed with HTTP {status}: {payload}")

        status, training, _response = request_json(
            port, "POST", "/api/v1/tasks/task-0/versions", prepared["trainer_token"],
            {"dataset_ids": [prepared["dataset_id"]], "warm_start": False, "hyperparameters": TRAINING_HYPERPARAMETERS},
        )
        if status != 202:
            raise RuntimeError(f"starting the training job failed with HTTP {status}: {training}")

        load_average_before = os.getloadavg()[0]
        rss = PeakRss({"server": server.pid, "worker": worker.pid}).start()
        results = ClientResults()
        load_started = time.monotonic()
        deadline = load_started + args.duration
        threads = [
            threading.Thread(
                target=run_client,
                args=(index, port, prepared["client_tokens"][index % args.users], f"task-{index % args.tasks}",
                      args, deadline, results),
                daemon=True,
            )
            for index in range(args.clients)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            # A request in flight at the deadline may take the server's 120 s timeout to end.
            thread.join(timeout=max(0.0, deadline - time.monotonic()) + 180)
        load_seconds = time.monotonic() - load_started
        load_average_after = os.getloadavg()[0]
        stuck_clients = sum(thread.is_alive() for thread in threads)

        job, waited = wait_for_job(port, prepared["trainer_token"], training["job_id"], args.train_timeout)
        peaks = rss.stop()
        _status, version, _response = request_json(
            port, "GET", f"/api/v1/tasks/task-0/versions/{training['version']}", prepared["trainer_token"]
        )

        served = results.statuses[200]
        figures = {
            "model": model_description,
            "database": "postgresql" if database_url else "sqlite",
            "workload": f"{args.clients} clients over {args.tasks} tasks, {args.users} users, "
                        f"max_tokens {args.max_tokens}, greedy, rate limit default",
            "cpu_count": os.cpu_count(),
            "load_average_1m_at_start": f"{load_average_at_start:.2f}",
            "load_average_1m_before_load": f"{load_average_before:.2f}",
            "load_average_1m_after": f"{load_average_after:.2f}",
            "python": platform.python_version(),
            "load_seconds": f"{load_seconds:.1f}",
            "requests_total": sum(value for key, value in results.statuses.items()),
            "requests_served": served,
            "served_per_second": f"{served / load_seconds:.2f}",
            "completion_tokens_per_second": f"{results.completion_tokens / load_seconds:.1f}",
            "latency_ok_p50_ms": f"{percentile(results.ok_latencies, 0.5) * 1000:.0f}" if served else "n/a",
            "latency_ok_p95_ms": f"{percentile(results.ok_latencies, 0.95) * 1000:.0f}" if served else "n/a",
            "latency_ok_max_ms": f"{max(results.ok_latencies) * 1000:.0f}" if served else "n/a",
            "latency_rejected_p50_ms": f"{percentile(results.rejected_latencies, 0.5) * 1000:.0f}"
            if results.rejected_latencies else "n/a",
        }
        for key in sorted(results.codes):
            figures[f"status_{key}"] = results.codes[key]
        figures.update(
            {
                "connection_errors": results.statuses["connection_error"],
                "clients_still_waiting": stuck_clients,
                "server_peak_rss_mib": f"{peaks['server'] / 2**20:.0f}",
                "worker_peak_rss_mib": f"{peaks['worker'] / 2**20:.0f}",
                "training_job_state": job.get("state"),
                "training_version_status": version.get("status"),
                "training_finished_after_load_s": f"{waited:.0f}",
                "training_error": job.get("error") or "none",
                "total_s": f"{time.monotonic() - started:.0f}",
            }
        )
        for name, value in figures.items():
            print(f"{name}: {value}")
        for failure in results.failures:
            print(f"failure: {failure}")

        unexpected = [status for status in results.statuses if status not in ALLOWED_STATUSES]
        return 1 if unexpected or stuck_clients or version.get("status") != "ready" or not served else 0
    finally:
        for process in reversed(processes):
            stop_process(process)
        if env is not None:
            remove_redis_keys(env)
        if database_url:
            drop_postgres_database(args.postgres, database_name)
        if args.keep:
            print(f"logs: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
