"""`EngineWorker`: one job at a time in arrival order, a bounded queue, cancellation before a job runs."""

from __future__ import annotations

import asyncio
import threading

import pytest

from chunkcache.api.worker import CancelledRequestError, EngineWorker, QueueFullError


def test_jobs_run_in_order_one_at_a_time_and_a_full_queue_is_refused() -> None:
    async def scenario() -> None:
        worker = EngineWorker(max_queue=2)
        gate, running, order = threading.Event(), [], []

        def job(n: int) -> int:
            running.append(n)
            if len(running) > 1 + len(order):
                raise AssertionError("two jobs ran at once")
            gate.wait(10)
            order.append(n)
            return n * 10

        first = worker.submit(lambda: job(1))
        while not worker.busy:
            await asyncio.sleep(0.01)
        queued = [worker.submit(lambda: job(2)), worker.submit(lambda: job(3))]
        with pytest.raises(QueueFullError, match="busy"):
            worker.submit(lambda: job(4))
        gate.set()
        assert await first == 10 and [await q for q in queued] == [20, 30]
        assert order == [1, 2, 3]
        failing = worker.submit(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            await failing
        worker.close()

    asyncio.run(scenario())


def test_a_request_cancelled_while_waiting_never_runs() -> None:
    async def scenario() -> None:
        worker = EngineWorker(max_queue=4)
        gate, ran = threading.Event(), []
        blocker = worker.submit(lambda: gate.wait(10))
        cancelled = threading.Event()
        skipped = worker.submit(lambda: ran.append("should not run"), cancelled)
        cancelled.set()
        gate.set()
        await blocker
        with pytest.raises(CancelledRequestError):
            await skipped
        assert ran == []
        worker.close()

    asyncio.run(scenario())
