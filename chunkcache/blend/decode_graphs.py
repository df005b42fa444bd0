"""Decode steps with one attention call a layer for the whole batch (`model.decode_attention`),
every input of a step held in fixed device buffers, so that on CUDA a step is captured once as a
CUDA graph and replayed: per batch bucket (the batch size rounded up to a power of two; padding
rows write into a one-token scratch cache and are dropped) and split bucket (the largest
capacity's key splits, a power of two). Between replays the host fills one pinned row block
(tokens, positions, write indices, buffer addresses and capacities) and copies it in with one
asynchronous copy; the graph then runs the embedding, every layer and the logits without the host.

`decode_mode` (a setting) chooses: ``auto`` (graphs on CUDA with Triton, the per-sequence loop of
`blend.decode.advance` elsewhere), ``graphs``, ``kernel`` (the batched call without capture: on
the CPU only under Triton's interpreter, which the tests use) or ``loop``. A capture that fails
is reported once and steps run without graphs from then on; kernels that fail on their first
step hand over to the loop for good. APE's attention is its own: a batch holding an APE sequence
is stepped by the loop. Steps run on one stream, the engine thread's: the buckets' buffers and
the graphs' shared memory pool assume it."""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from chunkcache.blend.layout import FusedCache
from chunkcache.blend.buckets import next_power_of_two
from chunkcache.blend.per_executor import ExecutorBound, PerExecutor
from chunkcache.device import cuda_runtime, upload_into
from chunkcache.errors import InvalidInputError
from chunkcache.model import decode_attention
from chunkcache.model.decode_attention import DecodeTable, splits_for, table_of
from chunkcache.model.executor import LayerExecutor
from chunkcache.triton_jit import interpreter_active, triton_available

DECODE_MODES = ("auto", "graphs", "kernel", "loop")


class Stepped(Protocol):
    """What a decoded sequence shows the batched step: its cache and its last accepted token."""

    last: int

    @property
    def cache(self) -> Any: ...  # `FusedCache`


class _Warm:
    """A made-up sequence for `TableDecoder.warm`: token 0 into an empty cache."""

    last = 0

    def __init__(self, kv: torch.Tensor) -> None:
        self.cache = FusedCache(kv, 0, 0)


def batch_bucket(n: int) -> int:
    """The batch size a step of ``n`` sequences runs at: the next power of two."""
    return next_power_of_two(n)


@dataclass
class _Bucket:
    inputs: torch.Tensor  # [5, size] int64 on the device: tokens, positions, at, base, capacity
    splits: int
    graph: Any = None
    logits: torch.Tensor | None = None  # the graph's output [size, vocab]
    capture_s: float = 0.0


@dataclass
class DecodeStats:
    """Steps run by the batched call, graphs captured and their capture time (a bucket's first
    step pays it: reported apart from the steady state)."""

    steps: int = 0
    replays: int = 0
    captures: int = 0
    capture_s: float = 0.0
    failures: list[str] = field(default_factory=list)


class TableDecoder(ExecutorBound):
    """Batched decode steps for one model (one executor): static buffers per bucket, graphs on CUDA."""

    def __init__(self, executor: LayerExecutor, graphs: bool) -> None:
        super().__init__(executor)
        self.graphs = graphs and cuda_runtime(executor.device)
        self.stats = DecodeStats()
        self._scratch = executor.empty_kv(1)  # padding rows write their K/V here, at index 0
        self._buckets: dict[tuple[int, int], _Bucket] = {}
        self._pool: Any = torch.cuda.graph_pool_handle() if self.graphs else None
        self._lock = threading.Lock()  # one step at a time: the buckets' buffers are shared
        self.disabled = False
        # kernel variants (split or not) that have run: from then on an error is the request's
        self._proven: set[bool] = set()

    def takes(self, seqs: Sequence[Stepped]) -> bool:
        """Whether these sequences can share the batched call (no APE, buffers of this model)."""
        if self.disabled:
            return False
        ex = self.executor
        shape = (ex.num_layers, 2, ex.num_kv_heads)
        return all(s.cache.ape is None and s.cache.kv.dtype == ex.dtype and tuple(s.cache.kv.shape[:3]) == shape
                   and decode_attention.fits(s.cache.kv) and s.cache.kv.device == ex.device
                   and s.cache.length < s.cache.capacity for s in seqs)

    def step(self, seqs: Sequence[Stepped]) -> torch.Tensor | None:
        """Feed every sequence its last token (written at its cache's length, at its next
        position); their next-token logits [len(seqs), vocab]. Lengths are not advanced here.
        None when the kernels fail before any step has run here (they cannot compile or launch
        on this device): reported once, and the per-sequence loop takes over for good (the K/V
        the failed step may have written are the same values the loop writes again)."""
        splits = splits_for(max(s.cache.capacity for s in seqs))
        variant = splits > 1
        if variant in self._proven:
            return self._step(seqs, splits)
        try:
            out = self._step(seqs, splits)
        except Exception as exc:  # noqa: BLE001 - the loop still answers; the reason is kept and shown
            self.disabled = True
            message = f"batched decode attention failed on its first step ({type(exc).__name__}: {exc})"
            self.stats.failures.append(message)
            warnings.warn(message + "; decoding one sequence at a time", RuntimeWarning, stacklevel=3)
            return None
        self._proven.add(variant)
        return out

    def _step(self, seqs: Sequence[Stepped], splits: int) -> torch.Tensor:
        n = len(seqs)
        size = batch_bucket(n)
        pad = size - n
        at, base, capacity = table_of([s.cache.kv for s in seqs] + [self._scratch] * pad,
                                      [s.cache.length for s in seqs] + [0] * pad)
        host = torch.tensor([[s.last for s in seqs] + [0] * pad,
                             [s.cache.next_position for s in seqs] + [0] * pad, at, base, capacity], dtype=torch.long)
        with self._lock:
            bucket = self._bucket(size, splits)
            # one asynchronous copy from pinned memory; the graph reads the buffer it was captured with
            upload_into(bucket.inputs, host)
            self.stats.steps += 1
            if self.graphs and bucket.graph is None:
                self._capture(bucket)
            if bucket.graph is not None:
                bucket.graph.replay()
                self.stats.replays += 1
                # the next replay overwrites the graph's output: each step's logits are their own
                return bucket.logits[:n].clone()  # type: ignore[index]
            return self._body(bucket)[:n]

    def warm(self, max_batch: int, capacity: int = 256) -> int:
        """Run one step at every batch bucket up to ``max_batch`` over zeroed caches of
        ``capacity`` tokens, so those buckets' graphs are captured before a user waits, and one
        over a cache long enough to split its keys (other split buckets are captured when first
        met). Returns the steps run."""
        ex = self.executor
        sizes = sorted({batch_bucket(n) for n in range(1, max(1, max_batch) + 1)})
        # and one step over a longer cache: the split kernels compiled (and proven) too
        runs = [(size, capacity) for size in sizes] + [(1, 2 * decode_attention.SPLIT_KEYS)]
        for i, (size, tokens) in enumerate(runs):
            if self.disabled:  # the kernels cannot run here: the loop decodes, nothing to warm
                return i
            self.step([_Warm(ex.empty_kv(tokens)) for _ in range(size)])
        return len(runs)

    def _bucket(self, size: int, splits: int) -> _Bucket:
        key = (size, splits)
        if key not in self._buckets:
            inputs = torch.zeros(5, size, dtype=torch.long, device=self.executor.device)
            self._buckets[key] = _Bucket(inputs, splits)
        return self._buckets[key]

    def _body(self, bucket: _Bucket) -> torch.Tensor:
        """The step itself: reads only the bucket's buffers (and the buffers they point at)."""
        ex = self.executor
        tokens, positions, at, base, capacity = bucket.inputs.unbind(0)
        table = DecodeTable(at, base, capacity, bucket.splits)
        hidden = ex.embed(tokens)
        rows = ex.rows(at, positions)
        for layer in range(ex.num_layers):
            hidden = ex.decode_table_layer(layer, hidden, rows, table)
        return ex.logits(hidden)

    def _capture(self, bucket: _Bucket) -> None:
        """Run the step once on a side stream (kernels compiled, libraries set up), then capture it.
        The run already does the step's work; replaying it writes the same K/V again."""
        device = self.executor.device
        start = time.perf_counter()
        try:
            with torch.cuda.device(device):  # the capture stream and the graph on the model's device
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    self._body(bucket)
                torch.cuda.current_stream(device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool, stream=torch.cuda.Stream(device),
                                      capture_error_mode="thread_local"):
                    bucket.logits = self._body(bucket)
            bucket.graph = graph
        except Exception as exc:  # noqa: BLE001 - a capture that fails costs speed, never an answer
            message = f"decode step not captured for batch {bucket.inputs.shape[1]}, {bucket.splits} splits: {exc}"
            self.stats.failures.append(message)
            warnings.warn(message + "; decode steps run without CUDA graphs from now on", RuntimeWarning,
                          stacklevel=3)
            self.graphs = False
            return
        torch.cuda.synchronize(device)
        bucket.capture_s = time.perf_counter() - start
        self.stats.captures += 1
        self.stats.capture_s += bucket.capture_s


def use_decode_mode(executor: LayerExecutor, mode: str) -> TableDecoder | None:
    """Set how ``executor``'s decode steps run (``Settings.decode_mode``); the batched decoder,
    or None when steps loop over the sequences."""
    if mode not in DECODE_MODES:
        raise InvalidInputError(f"decode_mode must be one of {', '.join(DECODE_MODES)}, got {mode!r}")
    usable = triton_available() and decode_attention.supports(executor.head_dim, executor.dtype)
    device_ok = cuda_runtime(executor.device) or (executor.device.type == "cpu" and interpreter_active())
    if mode in ("graphs", "kernel") and not (usable and device_ok):
        raise InvalidInputError(
            f"decode_mode {mode!r} needs triton, a head size that is a power of two from 16 to 256 and CUDA "
            "(or TRITON_INTERPRET=1 on the CPU, for tests); use 'auto' or 'loop'")
    loop = mode == "loop" or (mode == "auto" and not (usable and cuda_runtime(executor.device)))
    return _decoders.set(executor, None if loop else TableDecoder(executor, graphs=mode in ("auto", "graphs")))


_decoders: PerExecutor[TableDecoder | None] = PerExecutor(lambda executor: use_decode_mode(executor, "auto"))


def table_decoder(executor: LayerExecutor) -> TableDecoder | None:
    """The batched decoder of ``executor`` (set up as ``auto`` on first use)."""
    return _decoders.get(executor)
