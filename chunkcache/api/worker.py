"""`EngineWorker`: the one thread that runs an engine for the service. Requests queue in front of
it (bounded: a full queue is refused at once), run one at a time, so no two requests touch the
engine's model or caches together, and can be cancelled while waiting or while generating."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from chunkcache.errors import ChunkCacheError

log = logging.getLogger(__name__)
T = TypeVar("T")


class QueueFullError(ChunkCacheError):
    """Too many requests are waiting for the engine (HTTP 429)."""


class CancelledRequestError(ChunkCacheError):
    """The request was cancelled (its client went away) before it ran."""


@dataclass
class Job:
    fn: Callable[[], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    cancelled: threading.Event = field(default_factory=threading.Event)


class EngineWorker:
    """Runs submitted callables one at a time on its own thread, in arrival order."""

    def __init__(self, max_queue: int, name: str = "chunkcache-engine") -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._running: Job | None = None
        self.busy = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def submit(self, fn: Callable[[], T], cancelled: threading.Event | None = None) -> asyncio.Future[T]:
        """Queue ``fn``; its result (or exception) arrives in the returned future. Raises
        `QueueFullError` at once when the queue is full. Setting ``cancelled`` before ``fn``
        starts skips it (the future gets `CancelledRequestError`)."""
        loop = asyncio.get_running_loop()
        job = Job(fn, loop.create_future(), loop, cancelled or threading.Event())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFullError(
                f"the server is busy: {self._queue.maxsize} requests are already waiting; retry later"
            ) from None
        return job.future

    def close(self, timeout: float = 120.0) -> bool:
        """Cancel the queued jobs and the running one (a generation stops at its next token),
        then stop the thread. Returns whether it stopped within ``timeout`` seconds."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancelled.set()
                _deliver(job, None, CancelledRequestError("the server is shutting down"))
        if self._running is not None:
            self._running.cancelled.set()
        self._queue.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled.is_set():
                _deliver(job, None, CancelledRequestError("cancelled before it ran"))
                continue
            self.busy, self._running = True, job
            try:
                result, error = job.fn(), None
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
                result, error = None, exc
            finally:
                self.busy, self._running = False, None
            _deliver(job, result, error)


def _deliver(job: Job, result: Any, error: BaseException | None) -> None:
    def settle() -> None:
        if job.future.done():  # the request stopped waiting
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    try:
        job.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the event loop is gone (server shutting down)
        log.debug("dropped a result: the event loop is closed")
