"""Handles of submitted generation requests, and their bridge to asyncio.

Nothing here imports torch, so Django views can import it in a process that never loads the
model.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .batch import PreparedRequest
    from .engine import GenerationResult

logger = logging.getLogger(__name__)

# Extra time a caller waits past a request's deadline for the scheduler to report the timeout
# itself, before giving up on its own.
RESULT_GRACE_SECONDS = 1.0


class QueueFull(RuntimeError):
    """The scheduler's queue has no room, so the request was rejected before any work."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class GenerationTimeout(RuntimeError):
    """A request did not finish within its timeout."""


class GenerationCancelled(RuntimeError):
    """A request was cancelled, usually because its client went away."""


class SchedulerStopped(RuntimeError):
    """The scheduler was stopped before the request finished."""


class GenerationHandle:
    """The pending result of one submitted request, resolved by the scheduler thread."""

    def __init__(self, prepared: PreparedRequest, deadline: float) -> None:
        self.prepared = prepared
        self.deadline = deadline  # time.perf_counter() value
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[GenerationHandle], None]] = []
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None
        self._cancel_requested = False

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested

    def cancel(self) -> None:
        """Ask the scheduler to drop this request at its next step (no effect once done)."""
        self._cancel_requested = True

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for the result and return it, or raise the request's error.

        Without `timeout` the wait ends shortly after the request's own deadline. A caller that
        stops waiting cancels the request and gets GenerationTimeout.
        """
        if timeout is None:
            timeout = max(self.deadline - time.perf_counter(), 0.0) + RESULT_GRACE_SECONDS
        if not self._done.wait(timeout):
            self.cancel()
            raise GenerationTimeout(f"The request did not finish within {timeout:.1f} s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def exception(self) -> BaseException | None:
        """Return the request's error once done, or None."""
        return self._error

    def add_done_callback(self, callback: Callable[[GenerationHandle], None]) -> None:
        """Call `callback(handle)` when the request finishes, at once if it already has.

        Callbacks run in the scheduler thread, so they must return quickly.
        """
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(callback)
                return
        callback(self)

    def _resolve(self, result: GenerationResult | None, error: BaseException | None) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self._result, self._error = result, error
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                logger.exception("A done callback of a generation request failed")


class AsyncEvents:
    """Carries tokens and completions from the scheduler thread to an asyncio consumer.

    Use `on_token(index)` as a request's `on_token` and `watch(index, handle)` after
    submitting. `get()` then returns ("token", index, text) events and, last for each request,
    ("done", index, handle). Events are buffered until read. The consumer's event loop is taken
    when it first awaits `get()`, so the requests may be submitted from another loop or thread,
    as Django's sync test client does when it runs a view and its streamed body in two loops.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: deque[tuple[str, int, Any]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None

    def on_token(self, index: int) -> Callable[[str], None]:
        def put_token(piece: str) -> None:
            self._put(("token", index, piece))

        return put_token

    def watch(self, index: int, handle: GenerationHandle) -> None:
        handle.add_done_callback(lambda done: self._put(("done", index, done)))

    async def get(self) -> tuple[str, int, Any]:
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if self._loop is not loop:
                    self._loop, self._wakeup = loop, asyncio.Event()
                if self._events:
                    return self._events.popleft()
                wakeup = self._wakeup
                wakeup.clear()
            await wakeup.wait()

    def _put(self, event: tuple[str, int, Any]) -> None:
        with self._lock:
            self._events.append(event)
            loop, wakeup = self._loop, self._wakeup
        if loop is None or wakeup is None:
            return
        try:
            loop.call_soon_threadsafe(wakeup.set)
        except RuntimeError:
            # The loop is closed because the client went away, so these events have no reader.
            pass


async def wait_for_result(handle: GenerationHandle) -> GenerationResult:
    """Await a handle from asyncio without blocking the event loop, and return its result.

    Cancelling the awaiting task cancels the request.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()

    def wake(_: GenerationHandle) -> None:
        try:
            loop.call_soon_threadsafe(lambda: future.done() or future.set_result(None))
        except RuntimeError:
            pass

    handle.add_done_callback(wake)
    timeout = max(handle.deadline - time.perf_counter(), 0.0) + RESULT_GRACE_SECONDS
    try:
        await asyncio.wait_for(future, timeout)
    except asyncio.TimeoutError:
        handle.cancel()
        raise GenerationTimeout(f"The request did not finish within {timeout:.1f} s") from None
    except asyncio.CancelledError:
        handle.cancel()
        raise
    return handle.result(timeout=0)
