"""`Scheduler`: the one thread that drives an engine for many callers. Requests wait in a bounded
queue (full: `QueueFullError` at once). Up to ``max_batch`` generations run together: between
two decode steps one waiting item is taken (a generation is planned and fused, then joins the
batch; any other engine call simply runs), and every step is one batched forward over all running
generations. The fused caches of running generations live in a `KVPool` (a byte budget): a
generation that does not fit yet waits at the head of the queue, one that never can is refused.
Cancelling a request skips it while it waits and ends it at its next step once it runs."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from chunkcache.blend.pool import KVPool
from chunkcache.errors import ChunkCacheError, ContextTooLongError
from chunkcache.generation import Answer, Generation, Plan

log = logging.getLogger(__name__)
T = TypeVar("T")


class QueueFullError(ChunkCacheError):
    """Too many requests are waiting for the engine (HTTP 429)."""


class CancelledRequestError(ChunkCacheError):
    """The request was cancelled (its client went away) before it ran."""


class KVBudgetError(ContextTooLongError):
    """A request whose fused cache is larger than the server's whole KV budget (HTTP 413)."""


class Engine(Protocol):
    """What the scheduler needs of `ChunkCacheEngine`."""

    def begin(self, plan: Plan, buffer: torch.Tensor | None = None) -> Generation: ...

    def decode_step(self, generations: list[Generation]) -> None: ...


@dataclass(eq=False)
class _Item:
    future: Future[Any]
    cancelled: threading.Event
    call: Callable[[], Any] | None = None  # any engine work
    plan_fn: Callable[[], Plan] | None = None  # a generation: plans it on the engine thread
    plan: Plan | None = None
    generation: Generation | None = None
    buffer: torch.Tensor | None = None  # its fused cache, from the pool


_STOP = object()


class Scheduler:
    """Runs an engine's work on its own thread: generations batched, everything else in turn."""

    def __init__(self, engine: Engine, pool: KVPool | None, max_batch: int = 16, max_queue: int = 32,
                 name: str = "chunkcache-engine") -> None:
        """``pool`` holds the running generations' caches (None: this scheduler only runs calls)."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.engine, self.max_batch = engine, max_batch
        self.pool = pool
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._running: list[_Item] = []
        self._held: _Item | None = None  # a planned generation waiting for KV memory
        self._calling = False
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # --- what callers see ------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return self._queue.qsize() + (self._held is not None)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def busy(self) -> bool:
        """Working on something: a call, a generation's fusion (its plan) or decode steps."""
        return self._calling or bool(self._running)

    def call(self, fn: Callable[[], T], cancelled: threading.Event | None = None) -> Future[T]:
        """Run ``fn`` on the engine thread between two decode steps; its result (or exception)
        arrives in the future. Setting ``cancelled`` before it starts skips it."""
        return self._put(_Item(Future(), cancelled or threading.Event(), call=fn))

    def generate(self, plan: Callable[[], Plan], cancelled: threading.Event | None = None) -> Future[Answer]:
        """Answer a request: ``plan`` runs on the engine thread (retrieval may go there), its
        generation joins the running batch when a slot and KV memory are free. Setting
        ``cancelled`` skips it while it waits, or ends it at its next step (the future then gets
        the answer so far)."""
        return self._put(_Item(Future(), cancelled or threading.Event(), plan_fn=plan))

    def close(self, timeout: float = 120.0) -> bool:
        """Refuse what waits, end what runs at its next step, stop the thread. Returns whether it
        stopped within ``timeout`` seconds."""
        self._closing = True
        self._refuse_queued()
        for item in list(self._running) + ([self._held] if self._held is not None else []):
            item.cancelled.set()
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _put(self, item: _Item) -> Future[Any]:
        if self._closing:
            raise CancelledRequestError("the server is shutting down")
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            raise QueueFullError(
                f"the server is busy: {self._queue.maxsize} requests are already waiting; retry later"
            ) from None
        return item.future

    # --- the engine thread -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                try:
                    if not self._turn():
                        return
                except Exception:  # noqa: BLE001 - a fault outside any one request's work: keep serving
                    log.exception("the engine thread hit an error between requests; it goes on")
        finally:
            self._closing = True  # whatever stopped the thread, nobody waits for it in vain
            for item in self._running:
                self._release(item)
                _fail(item, CancelledRequestError("the server is shutting down"))
            if self._held is not None:
                _fail(self._held, CancelledRequestError("the server is shutting down"))
            self._running, self._held = [], None
            self._refuse_queued()

    def _refuse_queued(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                _fail(item, CancelledRequestError("the server is shutting down"))

    def _turn(self) -> bool:
        """Drop what was cancelled, admit one item, run one decode step. False: stop."""
        self._drop_cancelled()
        if self._held is not None:
            self._start_held()
        if self._held is None and len(self._running) < self.max_batch:
            item = self._next(block=not self._running)
            if item is _STOP:
                return False
            if item is not None:
                self._take(item)
        if self._running:
            self._step()
        return True

    def _next(self, block: bool) -> Any:
        try:
            return self._queue.get(block=block)
        except queue.Empty:
            return None

    def _take(self, item: _Item) -> None:
        if item.cancelled.is_set() or not item.future.set_running_or_notify_cancel():
            _fail(item, CancelledRequestError("cancelled before it ran"))
            return
        if item.call is not None:
            self._calling = True
            try:
                _settle(item, *_attempt(item.call))
            finally:
                self._calling = False
            return
        if self.pool is None:
            _fail(item, RuntimeError("this scheduler has no KV pool: it cannot run generations"))
            return
        self._calling = True  # fusing the prompt can take longer than many decode steps
        try:
            plan, error = _attempt(item.plan_fn)  # type: ignore[arg-type]
        finally:
            self._calling = False
        if error is None and self.pool.bytes_for(plan.kv_tokens) > self.pool.total:
            error = KVBudgetError(
                f"this request's cache needs {self.pool.bytes_for(plan.kv_tokens) / 2**20:.1f} MiB "
                f"({plan.pieces.total} prompt tokens + {plan.max_new_tokens} new ones) but the server's whole KV "
                f"budget is {self.pool.total / 2**20:.1f} MiB: send fewer or shorter chunks or ask for fewer "
                "tokens (or raise the kv_budget setting)"
            )
        if error is not None:
            _fail(item, error)
            return
        item.plan = plan
        self._held = item
        self._start_held()

    def _start_held(self) -> None:
        item, pool = self._held, self.pool
        if item is None or item.plan is None or pool is None:
            return
        if item.cancelled.is_set() or self._closing:
            self._held = None
            _fail(item, CancelledRequestError("cancelled before it ran"))
            return
        if not pool.fits(item.plan.kv_tokens):
            return  # until running generations give memory back
        self._held = None
        item.buffer, error = _attempt(lambda: pool.acquire(item.plan.kv_tokens))  # type: ignore[union-attr]
        if error is None:
            item.generation, error = _attempt(lambda: self.engine.begin(item.plan, item.buffer))  # type: ignore[arg-type]
        if error is not None:
            self._release(item)
            _fail(item, error)
            return
        self._running.append(item)

    def _drop_cancelled(self) -> None:
        if self._held is not None and self._held.cancelled.is_set():
            self._start_held()  # fails it: it never started
        for item in self._running:
            if item.cancelled.is_set() and item.generation is not None:
                item.generation.stop()
        self._finish_done()

    def _step(self) -> None:
        generations = [item.generation for item in self._running if item.generation is not None]
        _, error = _attempt(lambda: self.engine.decode_step(generations))
        if error is not None:  # a failed forward leaves every running cache in doubt
            log.error("a decode step failed", exc_info=error)
            for item in self._running:
                self._release(item)
                _fail(item, error)
            self._running = []
            return
        self._finish_done()

    def _finish_done(self) -> None:
        still = []
        for item in self._running:
            generation = item.generation
            if generation is not None and generation.done:
                self._release(item)
                if generation.error is not None:  # its own callback failed; the others go on
                    _fail(item, generation.error)
                else:
                    _settle(item, *_attempt(generation.answer))
            else:
                still.append(item)
        self._running = still

    def _release(self, item: _Item) -> None:
        if item.buffer is not None and self.pool is not None:
            self.pool.release(item.buffer)
        item.buffer, item.generation = None, None


def _attempt(fn: Callable[[], T]) -> tuple[T | None, BaseException | None]:
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001 - handed to the waiting request
        return None, exc


def _settle(item: _Item, result: Any, error: BaseException | None) -> None:
    """Deliver to the waiting caller; a caller that stopped waiting (its future cancelled) is skipped."""
    try:
        if error is not None:
            item.future.set_exception(error)
        else:
            item.future.set_result(result)
    except InvalidStateError:
        pass


def _fail(item: _Item, error: BaseException) -> None:
    _settle(item, None, error)
