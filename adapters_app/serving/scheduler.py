"""Continuous batching: one thread serves queued requests through the engine.

Callers `submit` requests from any thread. Submission tokenizes, validates and loads the
adapter in the caller's thread, so errors surface there and a cold adapter load never stalls
the running batch. The scheduler thread waits `batch_window_ms` after the first request reaches
an idle engine, so requests that arrive together start in one prefill. While a batch runs, it
admits waiting requests between decode steps: their prefill runs as a batch of its own, then
their rows join the running batch. Rows leave the batch as soon as they finish, time out or
are cancelled.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .batch import RowState, RunningBatch, row_result
from .engine import Engine, GenerationRequest, GenerationResult
from .handles import (  # noqa: F401  (re-exported: callers import them from the scheduler)
    AsyncEvents,
    GenerationCancelled,
    GenerationHandle,
    GenerationTimeout,
    QueueFull,
    SchedulerStopped,
    wait_for_result,
)

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class SchedulerStats:
    """Counters since the scheduler started, and the current queue and batch sizes."""

    waiting: int
    running: int
    submitted: int
    completed: int
    failed: int
    rejected: int
    cancelled: int
    timed_out: int
    prefills: int
    decode_steps: int
    max_running: int
    # Tokens sampled by prefills and decode steps, end-of-text tokens and tokens of rows that
    # were later cancelled or timed out included.
    generated_tokens: int = 0
    # Rows per forward pass -> number of such passes, one table per phase.
    prefill_batch_sizes: dict[int, int] = field(default_factory=dict)
    decode_batch_sizes: dict[int, int] = field(default_factory=dict)


class Scheduler:
    """A thread that batches submitted requests on `engine` (see the module docstring).

    `max_batch_size` bounds the rows decoding together, `max_queue` the requests waiting to
    join, and a submission beyond that raises QueueFull. `request_timeout_s` is the default
    time a request may take from submission to its last token.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        batch_window_ms: float = 5.0,
        max_batch_size: int = 16,
        max_queue: int = 64,
        request_timeout_s: float = 120.0,
    ) -> None:
        if batch_window_ms < 0:
            raise ValueError(f"batch_window_ms must be 0 or more, got {batch_window_ms}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be 0 or more, got {max_queue}")
        if request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be positive, got {request_timeout_s}")
        self.engine = engine
        self.batch_window_s = batch_window_ms / 1000
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.request_timeout_s = request_timeout_s

        self._condition = threading.Condition()
        self._waiting: deque[GenerationHandle] = deque()
        self._batch = RunningBatch(engine)
        self._running: dict[int, GenerationHandle] = {}  # id(prepared) -> handle of a batch row
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._counts = dict.fromkeys(
            ("submitted", "completed", "failed", "rejected", "cancelled", "timed_out"), 0
        )
        self._prefills = 0
        self._decode_steps = 0
        self._max_running = 0
        self._generated_tokens = 0
        # Keys are at most max_batch_size, so these tables stay small.
        self._prefill_batch_sizes: Counter[int] = Counter()
        self._decode_batch_sizes: Counter[int] = Counter()
        # Moving average of request durations, the basis of the Retry-After estimate.
        self._average_seconds = 1.0

    def start(self) -> Scheduler:
        """Start the scheduler thread (again after `stop` is not supported)."""
        with self._condition:
            if self._stopping:
                raise SchedulerStopped("The scheduler was stopped; create a new one")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="generation-scheduler", daemon=True)
                self._thread.start()
                logger.info(
                    "Scheduler started: batch window %.1f ms, max batch %d, max queue %d, timeout %.0f s",
                    self.batch_window_s * 1000,
                    self.max_batch_size,
                    self.max_queue,
                    self.request_timeout_s,
                )
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread after its current step; waiting and running requests get SchedulerStopped."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        error = SchedulerStopped("The server is shutting down; send the request again")
        with self._condition:
            waiting, self._waiting = list(self._waiting), deque()
        for handle in waiting:
            handle._resolve(None, error)
        with self.engine.lock:
            for handle in self._running.values():
                handle._resolve(None, error)
            self._running.clear()
            self._batch = RunningBatch(self.engine)
        logger.info("Scheduler stopped")

    def submit(self, request: GenerationRequest) -> GenerationHandle:
        """Queue one request and return its handle (see `submit_group`)."""
        return self.submit_group([request])[0]

    def submit_group(self, requests: Sequence[GenerationRequest]) -> list[GenerationHandle]:
        """Queue requests that should start in the same prefill, and return their handles.

        Raises QueueFull when the queue has no room for all of them, GenerationError for an
        invalid request and AdapterError for an adapter that cannot be loaded. Nothing is
        queued unless every request is accepted.
        """
        if not requests:
            return []
        self._check_room(len(requests))
        prepared = [self.engine.prepare(request) for request in requests]

        handles = []
        for item in prepared:
            timeout = item.request.timeout_s or self.request_timeout_s
            handles.append(GenerationHandle(item, deadline=item.submitted_at + timeout))
        with self._condition:
            self._check_room(len(handles), locked=True)
            self._waiting.extend(handles)
            self._counts["submitted"] += len(handles)
            self._condition.notify_all()
        if self._thread is None:
            self.start()
        return handles

    def stats(self) -> SchedulerStats:
        with self._condition:
            return SchedulerStats(
                waiting=len(self._waiting),
                running=len(self._running),
                prefills=self._prefills,
                decode_steps=self._decode_steps,
                max_running=self._max_running,
                generated_tokens=self._generated_tokens,
                prefill_batch_sizes=dict(self._prefill_batch_sizes),
                decode_batch_sizes=dict(self._decode_batch_sizes),
                **self._counts,
            )

    def _check_room(self, count: int, *, locked: bool = False) -> None:
        if not locked:
            with self._condition:
                self._check_room(count, locked=True)
            return
        if self._stopping:
            raise SchedulerStopped("The server is shutting down; send the request again")
        if len(self._waiting) + count > self.max_queue:
            self._counts["rejected"] += count
            retry_after = max(1, math.ceil(self._average_seconds))
            raise QueueFull(
                f"The generation queue is full ({len(self._waiting)} waiting, at most "
                f"{self.max_queue}). Retry in about {retry_after} s",
                retry_after_s=retry_after,
            )

    def _run(self) -> None:
        while True:
            admitted = self._next_admissions()
            if admitted is None:
                return
            try:
                with self.engine.lock, torch.inference_mode():
                    if admitted:
                        self._admit(admitted)
                    self._stop_cancelled_and_late_rows()
                    if self._batch.rows:
                        rows = len(self._batch.rows)
                        self._batch.step()
                        self._record_forward(self._decode_batch_sizes, rows)
                        self._decode_steps += 1
                    self._complete(self._batch.drop_finished())
            except Exception as error:
                # A failing forward pass (out of memory, a bug) fails the requests in the batch,
                # not the scheduler: later requests start on a fresh batch.
                keys = sorted({str(handle.prepared.adapter_key) for handle in self._running.values()})
                logger.exception("Generation failed for %d requests (adapters %s)", len(self._running), ", ".join(keys) or "none")
                self._fail_running(error)

    def _next_admissions(self) -> list[GenerationHandle] | None:
        """Wait for work, and return the waiting handles to admit now (None: stop)."""
        with self._condition:
            while not self._stopping and not self._waiting and not self._batch.rows:
                self._condition.wait()
            if self._stopping:
                return None

            # An idle engine waits briefly, so that requests arriving together share a prefill.
            if not self._batch.rows and self._waiting:
                window_end = self._waiting[0].prepared.submitted_at + self.batch_window_s
                while not self._stopping and len(self._waiting) < self.max_batch_size:
                    remaining = window_end - time.perf_counter()
                    if remaining <= 0:
                        break
                    self._condition.wait(remaining)

            free = self.max_batch_size - len(self._batch.rows)
            admitted = []
            while self._waiting and len(admitted) < free:
                admitted.append(self._waiting.popleft())
            return admitted

    def _admit(self, handles: list[GenerationHandle]) -> None:
        """Prefill the admitted requests and add their rows to the running batch."""
        now = time.perf_counter()
        ready = []
        for handle in handles:
            if handle.cancel_requested:
                self._resolve(handle, error=GenerationCancelled("The request was cancelled"))
            elif now > handle.deadline:
                self._resolve(handle, error=self._timeout_error(handle))
            else:
                ready.append(handle)
        if not ready:
            return

        for handle in ready:
            self._running[id(handle.prepared)] = handle
        joining = RunningBatch(self.engine)
        joining.prefill([handle.prepared for handle in ready])
        self._record_forward(self._prefill_batch_sizes, len(ready))
        self._prefills += 1
        self._complete(joining.drop_finished())
        self._batch.absorb(joining)
        self._max_running = max(self._max_running, len(self._batch.rows))
        logger.debug("Admitted %d requests, %d rows now decode together", len(ready), len(self._batch.rows))

    def _record_forward(self, sizes: Counter[int], rows: int) -> None:
        # Each forward pass samples one token for every row it ran.
        with self._condition:
            sizes[rows] += 1
            self._generated_tokens += rows

    def _stop_cancelled_and_late_rows(self) -> None:
        now = time.perf_counter()
        for row in self._batch.rows:
            handle = self._running[id(row.prepared)]
            if handle.cancel_requested:
                self._batch.finish_row(row, "cancelled", GenerationCancelled("The request was cancelled"))
            elif now > handle.deadline:
                self._batch.finish_row(row, "timeout", self._timeout_error(handle))

    def _complete(self, rows: list[RowState]) -> None:
        for row in rows:
            handle = self._running.pop(id(row.prepared))
            if row.error is not None:
                self._resolve(handle, error=row.error)
            else:
                self._resolve(handle, result=row_result(row))

    def _fail_running(self, error: Exception) -> None:
        failure = RuntimeError(f"Generation failed: {error}")
        for handle in list(self._running.values()):
            self._resolve(handle, error=failure)
        self._running.clear()
        self._batch = RunningBatch(self.engine)

    def _resolve(
        self,
        handle: GenerationHandle,
        *,
        result: GenerationResult | None = None,
        error: BaseException | None = None,
    ) -> None:
        with self._condition:
            if error is None:
                self._counts["completed"] += 1
                seconds = (time.perf_counter() - handle.prepared.submitted_at)
                self._average_seconds = 0.9 * self._average_seconds + 0.1 * seconds
            elif isinstance(error, GenerationCancelled):
                self._counts["cancelled"] += 1
            elif isinstance(error, GenerationTimeout):
                self._counts["timed_out"] += 1
            else:
                self._counts["failed"] += 1
        if isinstance(error, GenerationTimeout):
            logger.warning("Request for adapter %s timed out", handle.prepared.adapter_key)
        handle._resolve(result, error)

    def _timeout_error(self, handle: GenerationHandle) -> GenerationTimeout:
        timeout = handle.deadline - handle.prepared.submitted_at
        return GenerationTimeout(
            f"The request did not finish within its timeout of {timeout:g} s. "
            "Ask for fewer tokens or retry when the server is less busy"
        )
