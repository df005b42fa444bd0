"""`Scheduler`: batched answers equal answers alone (greedy and seeded sampling, every strategy,
any interleaving), cancellation mid-batch, the KV budget (waits, refusals, no leak), the bounded
queue, and other engine work in arrival order; each with admission between two steps and on a
thread of its own beside the steps (``overlap``)."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import Future
from typing import Any

import pytest
import torch

from chunkcache.blend import Sampling
from chunkcache.config import Settings
from chunkcache.engine import ChunkCacheEngine
from chunkcache.blend.pool import KVPool
from chunkcache.generation import Answer
from chunkcache.model import LoadedModel
from chunkcache.errors import InvalidInputError
from chunkcache.scheduler import CancelledRequestError, KVBudgetError, QueueFullError, Scheduler, admitters_for

PASSAGES = [
    "The river Elbe rises in the Giant Mountains and flows through Dresden and Hamburg to the North Sea.",
    "Hamburg is a port city. Its harbour is one of the largest in Europe and handles containers.",
    "Dresden is known for its baroque churches, the Zwinger palace and its collection of paintings.",
    "The Giant Mountains lie on the border between the Czech Republic and Poland; snow stays until May.",
    "Ships on the Elbe carry grain, coal and cars; the river was a border for part of its course.",
]
# (question, passages, strategy, max_new_tokens, sampling, params)
REQUESTS: list[tuple[str, list[str], str, int, Sampling, dict[str, Any]]] = [
    ("Describe the river Elbe in detail.", PASSAGES[:3], "cacheblend", 14, Sampling(), {}),
    ("Which city has a harbour?", PASSAGES[1:2], "full", 6, Sampling(), {}),
    ("Tell me everything about Dresden.", PASSAGES[2:5], "reuse", 12, Sampling(), {}),
    ("Where do the Giant Mountains lie?", PASSAGES, "ape", 9, Sampling(), {}),
    ("What do ships carry on the Elbe?", PASSAGES[3:], "epic", 11, Sampling(), {}),
    ("Write a story about Hamburg.", PASSAGES[:2], "cacheblend", 13, Sampling(temperature=0.8, top_p=0.9, seed=7),
     {"recompute_ratio": 0.3}),
]


@pytest.fixture(scope="module")
def engine(smollm2: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> ChunkCacheEngine:
    store = tmp_path_factory.mktemp("scheduler") / "store"
    return ChunkCacheEngine(Settings.load(env={}, store_path=store), model=smollm2)


@pytest.fixture(scope="module")
def alone(engine: ChunkCacheEngine) -> list[Answer]:
    """Every request answered by itself (a batch of one), caches already stored."""
    for q, chunks, _, _, _, _ in REQUESTS:
        engine.answer(q, chunks, strategy="reuse", max_new_tokens=1)
    return [engine.answer(q, c, strategy=s, max_new_tokens=n, sampling=sm, **p) for q, c, s, n, sm, p in REQUESTS]


def _pool(engine: ChunkCacheEngine, budget: int = 2**30) -> KVPool:
    return KVPool(engine.model.executor, budget, granule=64)


def _plan(engine: ChunkCacheEngine, i: int, on_text: Any = None) -> Any:
    q, chunks, strategy, n, sampling, params = REQUESTS[i]
    return lambda: engine.plan(q, chunks, strategy, n, sampling, on_text, **params)


def _hold(scheduler: Scheduler) -> threading.Event:
    """Keep the engine thread busy until the returned event is set (requests queue meanwhile)."""
    gate = threading.Event()
    scheduler.call(lambda: gate.wait(30))
    deadline = time.monotonic() + 10
    while not scheduler.busy and time.monotonic() < deadline:
        time.sleep(0.005)
    return gate


@pytest.mark.parametrize("admitters", [0, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_answers_equal_answers_alone(engine: ChunkCacheEngine, alone: list[Answer], seed: int,
                                             admitters: int) -> None:
    rng = random.Random(seed)
    order = rng.sample(range(len(REQUESTS)), len(REQUESTS))
    scheduler = Scheduler(engine, _pool(engine), max_batch=rng.choice([2, 3, 6]), max_queue=16, admitters=admitters)
    biggest = [0]

    def seen(_: str) -> None:
        biggest[0] = max(biggest[0], scheduler.running)

    try:
        gate = _hold(scheduler)  # the first few arrive together; the rest join a running batch
        futures: dict[int, Future[Answer]] = {}
        for k, i in enumerate(order):
            futures[i] = scheduler.generate(_plan(engine, i, seen))
            if k == 2:
                gate.set()
            time.sleep(rng.random() * 0.3)
        answers = {i: f.result(timeout=300) for i, f in futures.items()}
    finally:
        scheduler.close()
    for i, answer in answers.items():
        assert answer.token_ids == alone[i].token_ids, f"request {i} changed in a batch (order {order})"
        assert answer.text == alone[i].text and answer.finish_reason == alone[i].finish_reason
        assert answer.prompt_tokens == alone[i].prompt_tokens
    assert biggest[0] > 1  # they did run together
    assert scheduler.pool.used == 0 and scheduler.running == 0


@pytest.mark.parametrize("admitters", [0, 2])
def test_a_request_cancelled_mid_batch_ends_and_the_others_are_unchanged(engine: ChunkCacheEngine,
                                                                        alone: list[Answer], admitters: int) -> None:
    scheduler = Scheduler(engine, _pool(engine), max_batch=4, max_queue=8, admitters=admitters)
    cancelled = threading.Event()
    pieces: list[str] = []

    def cancel_after_two(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 2:
            cancelled.set()  # as a client that goes away

    try:
        gate = _hold(scheduler)
        gone = scheduler.generate(_plan(engine, 0, cancel_after_two), cancelled)
        others = {i: scheduler.generate(_plan(engine, i)) for i in (2, 4)}
        gate.set()
        cut = gone.result(timeout=300)
        answers = {i: f.result(timeout=300) for i, f in others.items()}
    finally:
        scheduler.close()
    assert cut.finish_reason == "stop" and 2 <= len(cut.token_ids) < len(alone[0].token_ids)
    assert cut.token_ids == alone[0].token_ids[: len(cut.token_ids)]
    for i, answer in answers.items():
        assert answer.token_ids == alone[i].token_ids
    assert scheduler.pool.used == 0 and scheduler.running == 0


@pytest.mark.parametrize("admitters", [0, 2])
def test_the_kv_budget_makes_requests_wait_refuses_what_never_fits_and_never_leaks(engine: ChunkCacheEngine,
                                                                                   alone: list[Answer], admitters: int) -> None:
    pool = _pool(engine)
    one = max(pool.bytes_for(engine.plan(q, c, s, n).kv_tokens) for q, c, s, n, _, _ in REQUESTS[:3])
    pool = _pool(engine, one + one // 2)  # room for one at a time
    scheduler = Scheduler(engine, pool, max_batch=8, max_queue=8, admitters=admitters)
    biggest = [0]

    def seen(_: str) -> None:
        biggest[0] = max(biggest[0], scheduler.running)

    try:
        futures = [scheduler.generate(_plan(engine, i, seen)) for i in range(3)]
        answers = [f.result(timeout=300) for f in futures]
        q, chunks, strategy, _, _, _ = REQUESTS[0]
        too_big = scheduler.generate(lambda: engine.plan(q, chunks * 4, strategy, 2000))
        with pytest.raises(KVBudgetError, match="kv_budget"):
            too_big.result(timeout=60)
    finally:
        scheduler.close()
    assert biggest[0] == 1
    assert [a.token_ids for a in answers] == [a.token_ids for a in alone[:3]]
    assert scheduler.pool.used == 0


@pytest.mark.parametrize("admitters", [0, 2])
def test_calls_run_in_order_one_at_a_time_and_a_full_queue_is_refused(admitters: int) -> None:
    scheduler = Scheduler(engine=None, pool=None, max_queue=2, admitters=admitters)  # type: ignore[arg-type] - no generations here
    gate, running, order = threading.Event(), [], []

    def job(n: int) -> int:
        running.append(n)
        if len(running) > 1 + len(order):
            raise AssertionError("two jobs ran at once")
        gate.wait(10)
        order.append(n)
        return n * 10

    try:
        first = scheduler.call(lambda: job(1))
        deadline = time.monotonic() + 10
        while not scheduler.busy and time.monotonic() < deadline:
            time.sleep(0.005)
        queued = [scheduler.call(lambda: job(2)), scheduler.call(lambda: job(3))]
        with pytest.raises(QueueFullError, match="busy"):
            scheduler.call(lambda: job(4))
        gate.set()
        assert first.result(10) == 10 and [q.result(10) for q in queued] == [20, 30]
        assert order == [1, 2, 3]
        with pytest.raises(ZeroDivisionError):
            scheduler.call(lambda: 1 / 0).result(10)
    finally:
        assert scheduler.close(10)


@pytest.mark.parametrize("admitters", [0, 2])
def test_a_request_cancelled_while_waiting_never_runs_and_close_refuses_the_rest(admitters: int) -> None:
    scheduler = Scheduler(engine=None, pool=None, max_queue=4, admitters=admitters)  # type: ignore[arg-type]
    gate, ran = threading.Event(), []
    blocker = scheduler.call(lambda: gate.wait(10))
    cancelled = threading.Event()
    skipped = scheduler.call(lambda: ran.append("should not run"), cancelled)
    cancelled.set()
    gate.set()
    blocker.result(10)
    with pytest.raises(CancelledRequestError):
        skipped.result(10)
    assert ran == []
    assert scheduler.close(10)
    with pytest.raises(CancelledRequestError, match="shutting down"):
        scheduler.call(lambda: None)


@pytest.mark.parametrize("admitters", [0, 2])
def test_failures_stay_with_their_request(engine: ChunkCacheEngine, alone: list[Answer],
                                          monkeypatch: pytest.MonkeyPatch, admitters: int) -> None:
    """A caller's text callback that raises fails that request only; memory that cannot be had
    fails that request only; a request cancelled while it waits for memory is dropped at once.
    The engine thread serves on after each."""
    pool = _pool(engine)
    one = max(pool.bytes_for(engine.plan(q, c, s, n).kv_tokens) for q, c, s, n, _, _ in REQUESTS[:3])
    scheduler = Scheduler(engine, _pool(engine, one + one // 2), max_batch=4, max_queue=8, admitters=admitters)

    def broken(_: str) -> None:
        raise RuntimeError("the client's socket is gone")

    cancelled, calls_of_fine, fine_done_when_dropped = threading.Event(), [0], []

    def fine_text(_: str) -> None:
        calls_of_fine[0] += 1
        if calls_of_fine[0] == 2:  # `held` was planned a step ago and waits for memory now
            cancelled.set()

    try:
        gate = _hold(scheduler)
        failing = scheduler.generate(_plan(engine, 0, broken))
        gate.set()
        with pytest.raises(RuntimeError, match="socket"):
            failing.result(timeout=300)
        fine = scheduler.generate(_plan(engine, 2, fine_text))
        held = scheduler.generate(_plan(engine, 1), cancelled)  # the budget holds one at a time
        held.add_done_callback(lambda _: fine_done_when_dropped.append(fine.done()))
        with pytest.raises(CancelledRequestError):
            held.result(timeout=300)
        assert fine.result(timeout=300).token_ids == alone[2].token_ids
        assert fine_done_when_dropped == [False]  # dropped at once, not when memory came back

        real = scheduler.pool.acquire  # type: ignore[union-attr]
        calls = [0]

        def out_of_memory(tokens: int) -> Any:
            calls[0] += 1
            if calls[0] == 1:
                raise MemoryError("CUDA out of memory")
            return real(tokens)

        monkeypatch.setattr(scheduler.pool, "acquire", out_of_memory)
        with pytest.raises(MemoryError):
            scheduler.generate(_plan(engine, 1)).result(timeout=300)
        assert scheduler.generate(_plan(engine, 1)).result(timeout=300).token_ids == alone[1].token_ids
    finally:
        scheduler.close()
    assert scheduler.pool is not None and scheduler.pool.used == 0


@pytest.mark.parametrize("admitters", [0, 2])
def test_with_overlap_running_requests_decode_while_the_next_one_is_admitted(
        engine: ChunkCacheEngine, alone: list[Answer], admitters: int) -> None:
    """Admission (here a call that blocks, as a long fusion would) stalls the running batch
    between two steps, and does not with ``overlap``: the running request finishes meanwhile."""
    scheduler = Scheduler(engine, _pool(engine), max_batch=4, max_queue=8, admitters=admitters)
    first_token, gate = threading.Event(), threading.Event()
    try:
        running = scheduler.generate(_plan(engine, 0, lambda _: first_token.set()))
        assert first_token.wait(120)
        blocked = scheduler.call(lambda: gate.wait(60))
        if admitters:  # all its tokens come while the call still blocks the admitting thread
            assert running.result(timeout=60).token_ids == alone[0].token_ids
            assert not blocked.done()
        else:
            time.sleep(1.0)
            assert not running.done()
        gate.set()
        assert blocked.result(timeout=60)
        assert running.result(timeout=120).token_ids == alone[0].token_ids
    finally:
        gate.set()
        scheduler.close()
    assert scheduler.pool is not None and scheduler.pool.used == 0


def test_three_fusing_threads_on_the_cpu_for_batches_only_by_default() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert admitters_for(-1, cpu, 16) == 3 and admitters_for(-1, cpu, 1) == 0
    assert admitters_for(-1, gpu, 16) == 0 and admitters_for(0, gpu, 16) == 0
    assert admitters_for(0, cpu, 16) == 0 and admitters_for(5, cpu, 16) == 5
    with pytest.raises(InvalidInputError, match="fusion_workers must be -1"):
        admitters_for(-2, cpu, 16)
    with pytest.raises(InvalidInputError, match="is for a model on the CPU"):
        admitters_for(2, gpu, 16)


class _CountingEngine:
    """The real engine, counting the fusions (``begin``) in progress at once."""

    def __init__(self, engine: ChunkCacheEngine) -> None:
        self.engine, self.fusing, self.most, self.began = engine, 0, 0, 0
        self.lock = threading.Lock()

    def begin(self, plan: Any, buffer: Any = None) -> Any:
        with self.lock:
            self.fusing += 1
            self.most = max(self.most, self.fusing)
        try:
            time.sleep(0.2)  # a longer fusion: the other admitter's starts meanwhile
            return self.engine.begin(plan, buffer)
        finally:
            with self.lock:
                self.fusing -= 1
                self.began += 1

    def decode_step(self, generations: Any) -> None:
        self.engine.decode_step(generations)


def test_admitters_fuse_together_in_queue_order_and_a_call_runs_alone(engine: ChunkCacheEngine,
                                                                      alone: list[Answer]) -> None:
    counting = _CountingEngine(engine)
    scheduler = Scheduler(counting, _pool(engine), max_batch=6, max_queue=8, admitters=2)  # type: ignore[arg-type]
    try:
        gate = _hold(scheduler)  # everything below is queued before anything is admitted
        first = {i: scheduler.generate(_plan(engine, i)) for i in range(4)}
        seen = scheduler.call(lambda: (counting.fusing, counting.began))
        then = {i: scheduler.generate(_plan(engine, i)) for i in range(4, 6)}
        gate.set()
        answers = {i: f.result(timeout=300) for i, f in {**first, **then}.items()}
        fusing_during_call, begun_before_call = seen.result(timeout=60)
    finally:
        scheduler.close()
    assert counting.most == 2  # two fusions at once
    assert fusing_during_call == 0 and begun_before_call == 4  # alone, and after what came before it
    for i, answer in answers.items():
        assert answer.token_ids == alone[i].token_ids
    assert scheduler.pool is not None and scheduler.pool.used == 0 and scheduler.running == 0
