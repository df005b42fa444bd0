"""`Scheduler`: the one thread that drives an engine for many callers. Requests wait in a bounded
queue (full: `QueueFullError` at once). Up to ``max_batch`` generations run together: between
two decode steps one waiting item is taken (a generation is planned and fused, then joins the
batch; any other engine call simply runs), and every step is one batched forward over all running
generations. The fused caches of running generations live in a `KVPool` (a byte budget): a
generation that does not fit yet waits at the head of the queue, one that never can is refused.
Cancelling a request skips it while it waits and ends it at its next step once it runs.

With ``admitters``, threads of their own admit (plan and fuse generations, several at once; run
calls, one alone) while the engine thread goes on stepping the batch: on a CPU, where a fusion
would otherwise stall every running request for its whole length, they share the cores (the
service does so there; on a GPU they would only contend for one device queue, and CUDA graph
captures want the device to themselves)."""

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
from chunkcache.errors import ChunkCacheError, ContextTooLongError, InvalidInputError
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
    ticket: int = -1  # its place in the queue (admitters: memory goes to the earliest first)


_STOP = object()


class _Turns:
    """Fusions may run together; a call runs alone (it may write the store or the index that
    fusions read). Taken in queue order: the admitting threads enter under one lock."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._together = 0
        self._alone = False

    def enter(self, alone: bool) -> None:
        with self._cv:
            while self._alone or (alone and self._together):
                self._cv.wait()
            if alone:
                self._alone = True
            else:
                self._together += 1

    def leave(self, alone: bool) -> None:
        with self._cv:
            if alone:
                self._alone = False
            else:
                self._together -= 1
            self._cv.notify_all()


class Scheduler:
    """Runs an engine's work on its own thread: generations batched, everything else in turn."""

    def __init__(self, engine: Engine, pool: KVPool | None, max_batch: int = 16, max_queue: int = 32,
                 name: str = "chunkcache-engine", admitters: int = 0) -> None:
        """``pool`` holds the running generations' caches (None: this scheduler only runs calls);
        ``admitters``: threads that admit (plan and fuse generations, run calls) beside the decode
        steps; 0: the engine thread admits one item between two steps."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        if admitters < 0:
            raise ValueError(f"admitters must be at least 0, got {admitters}")
        self.engine, self.max_batch = engine, max_batch
        self.pool = pool
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._running: list[_Item] = []
        self._held: _Item | None = None  # a planned generation waiting for KV memory (no admitters)
        self._calling = 0  # threads in a call, a plan or a fusion
        self._closing = False
        # With admitters: fused generations are handed over in `_ready`; `_cv` guards it, the
        # running list, the slots admitters have taken and the pool, and wakes who waits on them.
        self._cv = threading.Condition()
        self._ready: list[_Item] = []
        self._in_hand = 0  # slots admitters hold: taking an item or admitting it
        self._memory_waits = 0  # admitters whose generation waits for KV memory
        self._entering = 0  # items admitters took that wait for their turn: still queued
        self._take_lock = threading.Lock()
        self._turns = _Turns()
        self._tickets = 0  # handed out in queue order as admitters take items
        self._passed: set[int] = set()  # tickets past memory admission (or out of the running)
        self._low = 0  # every ticket below it has passed
        self._admitters = [threading.Thread(target=self._admit, name=f"{name}-admit-{i}", daemon=True)
                           for i in range(admitters)]
        self._live = admitters
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        for thread in self._admitters:
            thread.start()

    # --- what callers see ------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return self._queue.qsize() + self._entering + (self._held is not None) + self._memory_waits

    @property
    def running(self) -> int:
        return len(self._running) + len(self._ready)

    @property
    def admitters(self) -> int:
        """Threads admitting beside the decode steps (0: the engine thread admits between them)."""
        return len(self._admitters)

    @property
    def busy(self) -> bool:
        """Working on something: a call, a generation's fusion (its plan) or decode steps."""
        return self._calling > 0 or bool(self._running) or bool(self._ready)

    def call(self, fn: Callable[[], T], cancelled: threading.Event | None = None) -> Future[T]:
        """Run ``fn`` on the engine thread between two decode steps (with admitters: on one of
        them, while no fusion runs); its result (or exception) arrives in the future. Setting
        ``cancelled`` before it starts skips it."""
        return self._put(_Item(Future(), cancelled or threading.Event(), call=fn))

    def generate(self, plan: Callable[[], Plan], cancelled: threading.Event | None = None) -> Future[Answer]:
        """Answer a request: ``plan`` runs on the engine thread or an admitter (retrieval may go
        there), its generation joins the running batch when a slot and KV memory are free. Setting
        ``cancelled`` skips it while it waits, or ends it at its next step (the future then gets
        the answer so far)."""
        return self._put(_Item(Future(), cancelled or threading.Event(), plan_fn=plan))

    def close(self, timeout: float = 120.0) -> bool:
        """Refuse what waits, end what runs at its next step, stop the threads. Returns whether
        they stopped within ``timeout`` seconds."""
        threads = self._admitters + [self._thread]
        if not any(thread.is_alive() for thread in threads):
            return True  # closed already
        with self._cv:  # running generations stop at their next step, waiting ones fail (`_start`)
            self._closing = True
            self._cv.notify_all()
        self._refuse_queued()
        for _ in range(sum(t.is_alive() for t in self._admitters) or 1):  # a stop for each thread taking items
            try:
                self._queue.put(_STOP, timeout=timeout)
            except queue.Full:
                pass
        for thread in threads:
            thread.join(timeout)
        return not any(thread.is_alive() for thread in threads)

    def _put(self, item: _Item) -> Future[Any]:
        if self._closing:
            raise CancelledRequestError("the server is shutting down")
        try:
            if self._queue.qsize() + self._entering >= self._queue.maxsize:
                raise queue.Full
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
            with self._cv:  # whatever stopped the thread, nobody waits for it in vain
                self._closing = True
                self._cv.notify_all()
            for thread in self._admitters:
                thread.join(60)  # each stops after the item in its hands (it took a stop)
            for item in self._running + self._ready:
                self._release(item)
                _fail(item, CancelledRequestError("the server is shutting down"))
            if self._held is not None:
                _fail(self._held, CancelledRequestError("the server is shutting down"))
            self._running, self._ready, self._held = [], [], None
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
        """Drop what was cancelled, admit one item (with admitters: take what they have fused),
        run one decode step. False: stop."""
        if self._admitters:
            with self._cv:
                self._running += self._ready
                self._ready = []
                if not self._running:
                    if not self._live:
                        return False
                    self._cv.wait()
                    return True
        self._drop_cancelled()
        if not self._admitters:
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

    # --- admitting threads -----------------------------------------------------------------
    def _admit(self) -> None:
        """An admitting thread: takes items in queue order while the batch has a free slot."""
        try:
            self._admit_items()
        finally:  # however it ends, the engine thread must learn that one admitter fewer is left
            with self._cv:
                self._live -= 1
                self._cv.notify_all()

    def _admit_items(self) -> None:
        while True:
            with self._cv:
                while len(self._running) + len(self._ready) + self._in_hand >= self.max_batch and not self._closing:
                    self._cv.wait()
                self._in_hand += 1
            with self._take_lock:
                item = self._queue.get()
                alone = item is not _STOP and item.call is not None
                if item is not _STOP:
                    item.ticket, self._tickets = self._tickets, self._tickets + 1
                    self._entering += 1
                    try:
                        self._turns.enter(alone)
                    finally:
                        self._entering -= 1
            if item is _STOP:
                with self._cv:
                    self._in_hand -= 1
                return
            try:
                self._take(item)
            except Exception:  # noqa: BLE001 - as the engine thread: keep admitting
                log.exception("admitting a request failed outside its own work; admission goes on")
                _fail(item, RuntimeError("the server failed to admit this request"))
            except BaseException as exc:
                _fail(item, CancelledRequestError(f"the server stopped admitting: {type(exc).__name__}"))
                raise
            finally:
                self._turns.leave(alone)
                with self._cv:
                    self._pass(item.ticket)
                    self._in_hand -= 1
                    self._cv.notify_all()

    def _pass(self, ticket: int) -> None:
        """The item of ``ticket`` no longer waits for memory (call with ``_cv`` held)."""
        if ticket >= self._low:
            self._passed.add(ticket)
        while self._low in self._passed:
            self._passed.remove(self._low)
            self._low += 1

    # --- admitting an item (engine thread or an admitter) ----------------------------------
    def _take(self, item: _Item) -> None:
        if item.cancelled.is_set() or not item.future.set_running_or_notify_cancel():
            _fail(item, CancelledRequestError("cancelled before it ran"))
            return
        if item.call is not None:
            _settle(item, *self._attempt_busy(item.call))
            return
        if self.pool is None:
            _fail(item, RuntimeError("this scheduler has no KV pool: it cannot run generations"))
            return
        # planning (and retrieval) can take longer than many decode steps
        plan, error = self._attempt_busy(item.plan_fn)  # type: ignore[arg-type]
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
        if self._admitters:
            self._start(item)
        else:
            self._held = item
            self._start_held()

    def _attempt_busy(self, fn: Callable[[], T]) -> tuple[T | None, BaseException | None]:
        with self._cv:
            self._calling += 1
        try:
            return _attempt(fn)
        finally:
            with self._cv:
                self._calling -= 1

    def _start_held(self) -> None:
        if self._held is not None and self._start(self._held):
            self._held = None

    def _start(self, item: _Item) -> bool:
        """Fuse a planned generation once its cache fits; False: it must wait for memory (the
        engine thread tries again after a step; an admitter waits here, and drops one cancelled
        meanwhile within the wait's poll)."""
        pool = self.pool
        if item.plan is None or pool is None:
            return True
        with self._cv:
            waited = False
            # with admitters, memory goes in queue order: not to a later request that happened
            # to be planned first
            while not (item.cancelled.is_set() or self._closing or
                       (pool.fits(item.plan.kv_tokens) and (not self._admitters or item.ticket == self._low))):
                if not self._admitters:
                    return False  # until running generations give memory back
                if not waited:
                    self._memory_waits, waited = self._memory_waits + 1, True
                self._cv.wait(0.05)
            if waited:
                self._memory_waits -= 1
            if item.cancelled.is_set() or self._closing:
                error: BaseException | None = CancelledRequestError("cancelled before it ran")
            else:
                item.buffer, error = _attempt(lambda: pool.acquire(item.plan.kv_tokens))  # type: ignore[union-attr]
            if self._admitters:
                self._pass(item.ticket)
                self._cv.notify_all()
        if error is None:
            item.generation, error = self._attempt_busy(lambda: self.engine.begin(item.plan, item.buffer))  # type: ignore[arg-type]
        if error is not None:
            self._release(item)
            _fail(item, error)
            return True
        with self._cv:
            (self._ready if self._admitters else self._running).append(item)
            self._cv.notify_all()
        return True

    # --- running generations (engine thread) -----------------------------------------------
    def _drop_cancelled(self) -> None:
        if not self._admitters and self._held is not None and self._held.cancelled.is_set():
            self._start_held()  # fails it: it never started
        for item in self._running:  # closing: every one ends at this step
            if (item.cancelled.is_set() or self._closing) and item.generation is not None:
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
            self._keep([])
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
        self._keep(still)

    def _keep(self, running: list[_Item]) -> None:
        with self._cv:  # a slot may be free now: wake an admitter that waits for one
            self._running = running
            self._cv.notify_all()

    def _release(self, item: _Item) -> None:
        """Give the item's cache back; wakes an admitter waiting for room."""
        with self._cv:
            if item.buffer is not None and self.pool is not None:
                self.pool.release(item.buffer)
            item.buffer, item.generation = None, None
            self._cv.notify_all()


# three fusing threads beside the decoding one beat two (3.14x vs 2.82x the requests/s of one
# request at a time, SmolLM2 on two cores, docs/results.md): the decoding thread's steps are
# cheap per token only in large batches, so fusing gets the larger share of the cores
AUTO_CPU_ADMITTERS = 3


def admitters_for(fusion_workers: int, device: torch.device, max_batch: int) -> int:
    """How many threads admit beside the decode steps (the ``fusion_workers`` setting): -1 (auto)
    is three on the CPU when requests are batched at all, none on a GPU."""
    if fusion_workers < -1:
        raise InvalidInputError(f"fusion_workers must be -1 (auto) or at least 0, got {fusion_workers}")
    if fusion_workers == -1:
        return AUTO_CPU_ADMITTERS if device.type == "cpu" and max_batch > 1 else 0
    if fusion_workers and device.type != "cpu":
        # attention backends are chosen by process-wide switches that a call sets and restores,
        # and a CUDA graph capture must not see another thread's launches
        raise InvalidInputError(f"fusion_workers {fusion_workers} is for a model on the CPU; on {device.type} "
                                "set it to 0 or -1 (fusion between decode steps)")
    return fusion_workers


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
