"""The simple fusion strategies: full prefill (the reference), plain reuse, EPIC and APE."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chunkcache.blend.base import FusionInput, FusionResult, StrategyHooks, finish
from chunkcache.blend.craft_profile import AttentionProfiler
from chunkcache.blend.layout import FusedBuffer, Layout, assemble_cache, parallel_layout, sequential_layout
from chunkcache.errors import InvalidInputError
from chunkcache.device import upload
from chunkcache.model.executor import ApeAttention, LayerExecutor, Rows


def question_rows(executor: LayerExecutor, layout: Layout) -> Rows:
    return layout.span_rows(executor, layout.question)


def host_rows(executor: LayerExecutor, layout: Layout, index: torch.Tensor) -> Rows:
    """`Rows` of sorted indices the host chose (one asynchronous copy to the device)."""
    return layout.rows(executor, upload(index, executor.device))


def reused_buffer(executor: LayerExecutor, layout: Layout, inp: FusionInput) -> FusedBuffer:
    return assemble_cache(executor, layout, inp.head_kv, inp.chunk_kvs, inp.fused_buffer(executor, layout.length))


@dataclass(frozen=True)
class FullPrefill(StrategyHooks):
    """Ordinary prefill of head + chunks + question: the baseline every other strategy is judged by."""

    name = "full"
    uses_cache = False
    records_profiles = True  # its chunks' caches as computed in context: Cache-Craft's variants

    def fuse(self, executor: LayerExecutor, inp: FusionInput) -> FusionResult:
        layout = sequential_layout(inp.pieces, executor.device)
        buf = inp.fused_buffer(executor, layout.length)
        profiler = AttentionProfiler(executor, layout) if inp.profile else None
        every = layout.span_rows(executor, range(0, layout.length))
        result = finish(executor, layout, buf, every, observe=profiler)
        if profiler is not None:
            result.profiles = profiler.chunks
        return result


@dataclass(frozen=True)
class Reuse(StrategyHooks):
    """PromptCache-style: chunk KVs re-rotated into place, only the question computed."""

    name = "reuse"
    uses_cache = True

    def fuse(self, executor: LayerExecutor, inp: FusionInput) -> FusionResult:
        layout = sequential_layout(inp.pieces, executor.device)
        return finish(executor, layout, reused_buffer(executor, layout, inp), question_rows(executor, layout))


@dataclass(frozen=True)
class Epic(StrategyHooks):
    """EPIC's LegoLink: recompute the first ``epic_k`` tokens of every chunk (attention sinks)."""

    epic_k: int = 16
    name = "epic"
    uses_cache = True

    def __post_init__(self) -> None:
        if self.epic_k < 0:
            raise InvalidInputError(f"epic_k must be >= 0, got {self.epic_k}")

    def fuse(self, executor: LayerExecutor, inp: FusionInput) -> FusionResult:
        layout = sequential_layout(inp.pieces, executor.device)
        heads = [torch.arange(r.start, min(r.stop, r.start + self.epic_k)) for r in layout.chunks]
        selected = torch.cat([*heads, torch.arange(layout.question.start, layout.question.stop)])
        return finish(executor, layout, reused_buffer(executor, layout, inp), host_rows(executor, layout, selected))


@dataclass(frozen=True)
class Ape(StrategyHooks):
    """APE: chunks encoded in parallel at shared positions behind the shared head; the question
    attends to them with temperature and scaling."""

    ape_temperature: float = 0.9
    ape_scale: float = 0.9
    name = "ape"
    uses_cache = True

    def __post_init__(self) -> None:
        if self.ape_temperature <= 0 or self.ape_scale <= 0:
            raise InvalidInputError("ape_temperature and ape_scale must be > 0")

    def fuse(self, executor: LayerExecutor, inp: FusionInput) -> FusionResult:
        layout = parallel_layout(inp.pieces, executor.device)
        buf = reused_buffer(executor, layout, inp)
        context = torch.zeros(buf.kv.shape[3], dtype=torch.bool)
        for r in layout.chunks:
            context[r.start : r.stop] = True
        ape = ApeAttention(upload(context, executor.device), self.ape_temperature, self.ape_scale)
        return finish(executor, layout, buf, question_rows(executor, layout), ape=ape)
