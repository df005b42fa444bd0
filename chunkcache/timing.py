"""Per-request stage timings: any part may time a stage; the engine collects them per request.

Stages nest: only the outermost running stage is charged, so time is never counted twice
(a chunk prefilled on a cache miss counts as ``miss_prefill_s``, not also as ``recompute_s``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_collector: ContextVar[dict[str, float] | None] = ContextVar("chunkcache_timings", default=None)
_depth: ContextVar[int] = ContextVar("chunkcache_timing_depth", default=0)


@contextmanager
def collect() -> Iterator[dict[str, float]]:
    """Collect the stages timed inside this block into the yielded dict (seconds)."""
    token = _collector.set({})
    try:
        yield _collector.get()  # type: ignore[misc]
    finally:
        _collector.reset(token)


@contextmanager
def stage(name: str) -> Iterator[None]:
    times = _collector.get()
    depth = _depth.get()
    if times is None or depth:
        token = _depth.set(depth + 1)
        try:
            yield
        finally:
            _depth.reset(token)
        return
    token = _depth.set(1)
    start = time.perf_counter()
    try:
        yield
    finally:
        times[name] = times.get(name, 0.0) + time.perf_counter() - start
        _depth.reset(token)
