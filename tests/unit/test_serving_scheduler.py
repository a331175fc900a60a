"""The continuous-batching scheduler on the tiny GPT-2: batching, leaving, joining, limits."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import torch

from adapters_app.serving.base import BaseModel, load_base_model
from adapters_app.serving.engine import Engine, GenerationError, GenerationRequest, GenerationResult
from adapters_app.serving.scheduler import (
    AsyncEvents,
    GenerationCancelled,
    GenerationTimeout,
    QueueFull,
    Scheduler,
    wait_for_result,
)
from tests.unit.test_serving_adapters import save_lora_adapter

ADAPTER_SPECS = {
    "rank2": {"rank": 2, "target_modules": ["c_attn"], "seed": 41},
    "rank4": {"rank": 4, "target_modules": ["c_attn", "c_proj", "c_fc"], "seed": 42},
    "rank8": {"rank": 8, "target_modules": ["c_fc", "c_proj"], "seed": 43},
}


@pytest.fixture(scope="module")
def tiny_base(tiny_base_dir: Path) -> BaseModel:
    return load_base_model(str(tiny_base_dir))


@pytest.fixture(scope="module")
def engine(tiny_base: BaseModel):
    serving_engine = Engine(tiny_base)
    yield serving_engine
    serving_engine.close()


@pytest.fixture
def scheduler(engine: Engine):
    running = Scheduler(engine, batch_window_ms=20, max_batch_size=8, max_queue=16).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def adapter_dirs(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scheduler_adapters")
    return {name: save_lora_adapter(tiny_base_dir, root / name, **spec) for name, spec in ADAPTER_SPECS.items()}


@pytest.fixture
def batch_sizes(tiny_base: BaseModel):
    """Record the batch size of every forward pass of the base model."""
    sizes: list[int] = []

    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        sizes.append(int(input_ids.shape[0]))

    handle = tiny_base.model.transformer.register_forward_pre_hook(record, with_kwargs=True)
    yield sizes
    handle.remove()


def request_for(adapter_dirs: dict[str, Path], adapter: str | None, prompt: str, **settings) -> GenerationRequest:
    return GenerationRequest(
        prompt=prompt,
        adapter_key=adapter,
        adapter_path=adapter_dirs[adapter] if adapter else None,
        **settings,
    )


def output_of(result: GenerationResult) -> tuple[str, int, str]:
    return result.text, result.completion_tokens, result.finish_reason


def test_threads_for_different_adapters_match_alone(
    engine: Engine, scheduler: Scheduler, adapter_dirs: dict[str, Path]
) -> None:
    adapters = [None, "rank2", "rank4", "rank8"]
    requests = [
        request_for(adapter_dirs, adapters[index % 4], f"Thread {index} says", max_new_tokens=4 + index % 5)
        for index in range(12)
    ]
    alone = [engine.generate_one(request) for request in requests]
    results: dict[int, GenerationResult] = {}
    errors: list[BaseException] = []

    def serve(index: int) -> None:
        try:
            results[index] = scheduler.submit(requests[index]).result(timeout=60)
        except BaseException as error:  # noqa: BLE001 - reported by the assert below
            errors.append(error)

    threads = [threading.Thread(target=serve, args=(index,)) for index in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert errors == []
    for index, expected in enumerate(alone):
        assert output_of(results[index]) == output_of(expected), f"request {index}"
        assert results[index].adapter_key == requests[index].adapter_key
    stats = scheduler.stats()
    assert stats.completed == len(requests)
    assert stats.max_running > 1, "no two requests ever shared a batch"


def test_finished_rows_leave_batch(
    scheduler: Scheduler, adapter_dirs: dict[str, Path], batch_sizes: list[int]
) -> None:
    requests = [
        request_for(adapter_dirs, "rank2", "Short", max_new_tokens=2, ignore_eos=True),
        request_for(adapter_dirs, "rank4", "Medium", max_new_tokens=5, ignore_eos=True),
        request_for(adapter_dirs, None, "Long", max_new_tokens=9, ignore_eos=True),
    ]

    handles = scheduler.submit_group(requests)
    results = [handle.result(timeout=60) for handle in handles]

    assert [result.completion_tokens for result in results] == [2, 5, 9]
    # One prefill of 3 rows, then one step per further token of the longest row. Each row
    # leaves right after its last token, so later steps run with fewer rows.
    assert batch_sizes == [3, 3, 2, 2, 2, 1, 1, 1, 1]


def test_request_joins_running_batch(
    engine: Engine, scheduler: Scheduler, adapter_dirs: dict[str, Path], batch_sizes: list[int]
) -> None:
    first_token = threading.Event()
    long_request = request_for(
        adapter_dirs, "rank8", "A long answer", max_new_tokens=40, ignore_eos=True,
        on_token=lambda piece: first_token.set(),
    )
    late_request = request_for(adapter_dirs, "rank4", "Joining late", max_new_tokens=6)
    expected_long = engine.generate_one(request_for(adapter_dirs, "rank8", "A long answer", max_new_tokens=40, ignore_eos=True))
    expected_late = engine.generate_one(late_request)
    batch_sizes.clear()

    long_handle = scheduler.submit(long_request)
    assert first_token.wait(timeout=30)
    late_handle = scheduler.submit(late_request)
    long_result = long_handle.result(timeout=60)
    late_result = late_handle.result(timeout=60)

    assert output_of(long_result) == output_of(expected_long)
    assert output_of(late_result) == output_of(expected_late)
    assert 2 in batch_sizes, "the late request never decoded in the same batch"
    assert batch_sizes[-1] == 1


def test_full_queue_raises_queue_full(engine: Engine, adapter_dirs: dict[str, Path]) -> None:
    scheduler = Scheduler(engine, batch_window_ms=0, max_batch_size=1, max_queue=1).start()
    try:
        with engine.lock:
            # The scheduler takes the first request off the queue, then waits for the lock.
            first = scheduler.submit(request_for(adapter_dirs, None, "First", max_new_tokens=2))
            deadline = time.monotonic() + 10
            while scheduler.stats().waiting and time.monotonic() < deadline:
                time.sleep(0.01)
            second = scheduler.submit(request_for(adapter_dirs, None, "Second", max_new_tokens=2))

            with pytest.raises(QueueFull) as raised:
                scheduler.submit(request_for(adapter_dirs, "rank2", "Third", max_new_tokens=2))

        assert raised.value.retry_after_s >= 1
        assert "queue is full" in str(raised.value)
        assert first.result(timeout=30).completion_tokens == 2
        assert second.result(timeout=30).completion_tokens == 2
        assert scheduler.stats().rejected == 1
    finally:
        scheduler.stop()


def test_invalid_request_raises_at_submit(scheduler: Scheduler) -> None:
    with pytest.raises(GenerationError, match="top_k=-1"):
        scheduler.submit(GenerationRequest(prompt="Hello", top_k=-1))

    assert scheduler.stats().submitted == 0


def test_running_request_times_out(scheduler: Scheduler, adapter_dirs: dict[str, Path]) -> None:
    request = request_for(
        adapter_dirs, "rank4", "Never ending", max_new_tokens=1000, ignore_eos=True, timeout_s=0.3
    )

    handle = scheduler.submit(request)

    with pytest.raises(GenerationTimeout, match="timeout of 0.3 s"):
        handle.result(timeout=30)
    assert scheduler.stats().timed_out == 1
    assert scheduler.stats().running == 0


def test_cancel_stops_streaming_request(scheduler: Scheduler, adapter_dirs: dict[str, Path]) -> None:
    pieces: list[str] = []
    started = threading.Event()

    def collect(piece: str) -> None:
        pieces.append(piece)
        started.set()

    handle = scheduler.submit(
        request_for(adapter_dirs, "rank2", "Cancel me", max_new_tokens=1000, ignore_eos=True, on_token=collect)
    )
    assert started.wait(timeout=30)
    handle.cancel()

    with pytest.raises(GenerationCancelled):
        handle.result(timeout=30)
    assert 0 < len(pieces) < 1000
    assert scheduler.stats().cancelled == 1


def test_async_events_bridge_tokens(scheduler: Scheduler, engine: Engine, adapter_dirs: dict[str, Path]) -> None:
    expected = engine.generate_one(request_for(adapter_dirs, "rank4", "Async", max_new_tokens=8))

    async def stream() -> tuple[str, GenerationResult]:
        events = AsyncEvents()
        request = request_for(adapter_dirs, "rank4", "Async", max_new_tokens=8, on_token=events.on_token(0))
        handle = await asyncio.to_thread(scheduler.submit, request)
        events.watch(0, handle)
        text = ""
        while True:
            kind, _index, payload = await events.get()
            if kind == "done":
                return text, await wait_for_result(payload)
            text += payload

    text, result = asyncio.run(stream())

    assert text == expected.text
    assert output_of(result) == output_of(expected)
