"""Shape buckets for fused prefills, and running a fusion as segments that CUDA graphs can replay.

A fused prefill's device work depends on the prompt only through its sizes: context tokens,
question tokens, chunks, the selection's size. Rounded up to a bucket (`bucket_of`: eight steps
per octave, at most 1/8 padding), two requests of one bucket launch the same kernels with the same
shapes and the same numbers, reading every per-request value (token ids, positions, which index
belongs to which chunk, the real counts) from one device buffer that one asynchronous copy fills
(`BucketInputs`). Padding rows write their K/V into a scratch index past the prompt, which no real
query sees (attention is causal by index).

`Segments` runs a fusion as a list of segments (device work only) and host steps (placing stored
caches as they arrive, which stays eager): eagerly; eagerly while capturing each segment as a
CUDA graph (a bucket's first request: its own answer comes from the eager run, the captures only
record); or by replaying a bucket's graphs. A capture that fails is reported once and the fusion
goes on eagerly, graphs off from then on.

`fusion_mode` (a setting): ``auto`` (buckets and graphs on CUDA, the request's own shapes
elsewhere), ``graphs``, ``buckets`` (fixed shapes without capture: on any device, the tests'
mode) or ``off``."""

from __future__ import annotations

import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from chunkcache.blend.per_executor import ExecutorBound, PerExecutor
from chunkcache.device import cuda_runtime, upload_into
from chunkcache.errors import InvalidInputError
from chunkcache.model.executor import LayerExecutor

FUSION_MODES = ("auto", "graphs", "buckets", "off")
_GRANULE = 256  # the workspace's length, in tokens, is a multiple of it
_MAX_PROGRAMS = 64  # captured buckets kept; the least recently used one goes first
_STEP_SHIFT = 4  # eight steps per octave: a step is 2 ** (bits - 4) for sizes of that many bits


def next_power_of_two(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for n <= 1)."""
    return 1 << max(0, n - 1).bit_length()


def bucket_of(n: int, minimum: int) -> int:
    """``n`` rounded up to the next of eight steps per octave (``minimum`` at least): at most
    1/8 of a bucket is padding."""
    if n <= minimum:
        return minimum
    step = 1 << max(0, (n - 1).bit_length() - _STEP_SHIFT)
    return -(-n // step) * step


@dataclass(frozen=True)
class BucketInputs:
    """Views into one int64 device buffer holding a request's values for a bucket of ``total``
    sequence indices (the last one the scratch), ``questions`` question rows and ``scalars``
    counts."""

    buffer: torch.Tensor
    total: int
    questions: int

    @staticmethod
    def size(total: int, questions: int, scalars: int) -> int:
        return 4 * total + questions + scalars

    @property
    def ids(self) -> torch.Tensor:
        return self.buffer[: self.total]

    @property
    def positions(self) -> torch.Tensor:
        return self.buffer[self.total : 2 * self.total]

    @property
    def owner(self) -> torch.Tensor:
        """Each index's chunk number (the bucket's chunk count for the head, question and padding)."""
        return self.buffer[2 * self.total : 3 * self.total]

    @property
    def protected(self) -> torch.Tensor:
        """1 where an index is always in the selection (CacheBlend's sinks)."""
        return self.buffer[3 * self.total : 4 * self.total]

    @property
    def question(self) -> torch.Tensor:
        """The question rows' sequence indices, padded with the scratch index."""
        return self.buffer[4 * self.total : 4 * self.total + self.questions]

    def scalar(self, i: int) -> torch.Tensor:
        """Count ``i`` as a one-element view (compared and indexed with on the device)."""
        at = 4 * self.total + self.questions + i
        return self.buffer[at : at + 1]

    @property
    def scratch(self) -> int:
        return self.total - 1


@dataclass
class FusionGraphStats:
    """Fusions run in fixed shapes, graphs captured (and their time: a bucket's first request pays
    it, reported apart from the steady state) and replayed."""

    eager: int = 0
    captures: int = 0
    capture_s: float = 0.0
    replays: int = 0
    failures: list[str] = field(default_factory=list)


@dataclass
class _Program:
    graphs: list[Any]
    state: dict[str, Any]  # the captured chain's tensors: graph outputs that later graphs read
    complete: bool = False


class Segments:
    """One fusion run: segments (device work reading ``state`` and the bucket's buffers only) and
    host steps, in order. See the module docstring for the three ways it runs."""

    def __init__(self, owner: "FixedShapes", key: Any) -> None:
        self._owner = owner
        program = owner.programs.get(key)
        self._replay = program if program is not None and program.complete else None
        if program is not None:
            owner.programs.move_to_end(key)
        self._capture: _Program | None = None
        if self._replay is None and owner.graphs:
            self._capture = owner.programs[key] = _Program([], {})
            while len(owner.programs) > _MAX_PROGRAMS:
                owner.programs.popitem(last=False)  # its graphs and their memory go with it
        self._key = key
        self._next = 0
        self._eager: dict[str, Any] = {}
        self._started = time.perf_counter()
        self._capture_s = 0.0

    def host(self, fn: Callable[[], None]) -> None:
        """Host work between segments (placing a layer of stored caches): never captured."""
        fn()

    def segment(self, fn: Callable[[dict[str, Any]], None]) -> None:
        """Device work: ``fn(state)`` reads its inputs from ``state`` and the bucket's buffers and
        puts its outputs into ``state``."""
        if self._replay is not None:
            self._replay.graphs[self._next].replay()
            self._next += 1
            return
        fn(self._eager)
        if self._capture is not None:
            self._record(fn)

    def _record(self, fn: Callable[[dict[str, Any]], None]) -> None:
        program, device = self._capture, self._owner.device
        start = time.perf_counter()
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.device(device), torch.cuda.graph(graph, pool=self._owner.pool,
                                                             stream=self._owner.capture_stream,
                                                             capture_error_mode="thread_local"):
                fn(program.state)  # type: ignore[union-attr]
            program.graphs.append(graph)  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001 - a capture that fails costs speed, never an answer
            self._owner.capture_failed(self._key, exc)
            self._capture = None
        self._capture_s += time.perf_counter() - start

    def finish(self) -> dict[str, Any]:
        """The state holding this run's outputs (the captured chain's when replayed)."""
        stats = self._owner.stats
        if self._replay is not None:
            stats.replays += 1
            return self._replay.state
        stats.eager += 1
        if self._capture is not None:
            self._capture.complete = True
            stats.captures += 1
            stats.capture_s += self._capture_s
        return self._eager


class FixedShapes(ExecutorBound):
    """An executor's fixed-shape fusions: the workspace they run in (a fused-cache buffer as long
    as the largest bucket met, and each bucket's input buffer), the captured graphs, the stats."""

    def __init__(self, executor: LayerExecutor, graphs: bool) -> None:
        super().__init__(executor)
        self.device = executor.device
        self.graphs = graphs and cuda_runtime(executor.device)
        self.pool: Any = torch.cuda.graph_pool_handle() if self.graphs else None
        self.programs: OrderedDict[Any, _Program] = OrderedDict()
        self.capture_stream: Any = torch.cuda.Stream(executor.device) if self.graphs else None
        self.inputs: dict[tuple[int, int, int], BucketInputs] = {}
        self.kv: torch.Tensor | None = None
        self.stats = FusionGraphStats()
        self.lock = threading.Lock()  # one fusion at a time: the workspace is shared

    def workspace(self, total: int) -> torch.Tensor:
        """The fused-cache workspace's first ``total`` indices. Growing it moves it, and every graph
        captured over the old one is dropped (they hold its address): it grows by half at least,
        so a server meeting ever longer prompts captures again a few times, not for each."""
        if self.kv is None or self.kv.shape[3] < total:
            grown = max(total, self.kv.shape[3] * 3 // 2 if self.kv is not None else 0)
            self.kv = None
            self.programs.clear()
            self.kv = self.executor.empty_kv(-(-grown // _GRANULE) * _GRANULE)
        return self.kv[:, :, :, :total]

    def bucket_inputs(self, total: int, questions: int, scalars: int) -> BucketInputs:
        key = (total, questions, scalars)
        if key not in self.inputs:
            size = BucketInputs.size(total, questions, scalars)
            self.inputs[key] = BucketInputs(torch.zeros(size, dtype=torch.long, device=self.device), total, questions)
        return self.inputs[key]

    def fill(self, inputs: BucketInputs, host: torch.Tensor) -> None:
        """One asynchronous copy of a request's values (built on the host) into the bucket's buffer."""
        upload_into(inputs.buffer, host)

    def capture_failed(self, key: Any, exc: Exception) -> None:
        self.programs.pop(key, None)
        message = f"fused prefill not captured for bucket {key[1:]}: {type(exc).__name__}: {exc}"
        self.stats.failures.append(message)
        warnings.warn(message + "; fusions run without CUDA graphs from now on", RuntimeWarning, stacklevel=4)
        self.graphs = False


def warm_shapes(setting: str) -> list[tuple[int, int]]:
    """``Settings.fusion_warm``, "CONTEXT:QUESTION,..." token counts, as pairs."""
    out = []
    for part in filter(None, (p.strip() for p in setting.split(","))):
        context, _, question = part.partition(":")
        try:
            pair = (int(context), int(question))
        except ValueError:
            pair = (0, 0)
        if min(pair) < 1:
            raise InvalidInputError(f"fusion_warm takes CONTEXT:QUESTION token counts like 8192:32, got {part!r}")
        out.append(pair)
    return out


def use_fusion_mode(executor: LayerExecutor, mode: str) -> FixedShapes | None:
    """Set how ``executor``'s fused prefills run (``Settings.fusion_mode``); the fixed-shape
    runner, or None when every request runs in its own shapes."""
    if mode not in FUSION_MODES:
        raise InvalidInputError(f"fusion_mode must be one of {', '.join(FUSION_MODES)}, got {mode!r}")
    if mode == "graphs" and not cuda_runtime(executor.device):
        raise InvalidInputError("fusion_mode 'graphs' needs the model on a CUDA device; use 'auto' or 'buckets'")
    own = mode == "off" or (mode == "auto" and not cuda_runtime(executor.device))
    return _fixed.set(executor, None if own else FixedShapes(executor, graphs=mode in ("auto", "graphs")))


_fixed: PerExecutor[FixedShapes | None] = PerExecutor(lambda executor: use_fusion_mode(executor, "auto"))


def fixed_shapes(executor: LayerExecutor) -> FixedShapes | None:
    """The fixed-shape runner of ``executor`` (set up as ``auto`` on first use)."""
    return _fixed.get(executor)
