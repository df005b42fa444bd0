"""The fusion interface: what a strategy receives (prompt pieces, stored KVs) and returns."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from chunkcache.blend.craft_math import ChunkPlan
from chunkcache.blend.craft_profile import ChunkProfile
from chunkcache.blend.layout import FusedBuffer, FusedCache, Layout, LayerSource, as_fused
from chunkcache.kv import ChunkKV
from chunkcache.model.executor import ApeAttention, KVHook, LayerExecutor, Rows
from chunkcache.model.prompt import PromptPieces
from chunkcache.timing import stage


@dataclass(frozen=True)
class FusionInput:
    pieces: PromptPieces
    head_kv: ChunkKV | None = None
    chunk_kvs: tuple[ChunkKV | LayerSource, ...] = ()  # streamed ones fill in layer by layer
    max_new_tokens: int = 0
    plans: tuple[ChunkPlan, ...] = ()  # cachecraft: a plan per chunk
    profile: bool = False  # full: record each chunk's attention profile (cachecraft variants)
    # where the fused cache goes: a zeroed [layers, 2, kv_heads, >= prompt + max_new_tokens, head_dim]
    # buffer (a scheduler's `KVPool`), or None for a new one
    buffer: torch.Tensor | None = None

    def fused_buffer(self, executor: LayerExecutor, prompt_tokens: int) -> torch.Tensor:
        """The buffer the fusion fills: ``buffer`` when given (checked), else a new zeroed one."""
        tokens = prompt_tokens + self.max_new_tokens
        if self.buffer is None:
            return executor.empty_kv(tokens)
        expected = (executor.num_layers, 2, executor.num_kv_heads)
        if tuple(self.buffer.shape[:3]) != expected or self.buffer.shape[3] < tokens:
            raise ValueError(f"a fused-cache buffer of shape {tuple(self.buffer.shape)} cannot hold {tokens} tokens "
                             f"of this model ({expected} x tokens x head_dim)")
        return self.buffer


@dataclass
class FusionResult:
    cache: FusedCache
    logits: torch.Tensor  # [vocab] next-token logits after the prompt
    recomputed_tokens: int  # token-layers computed / layers (probe passes included)
    reused_tokens: int  # tokens whose last-layer KV came from stored caches
    profiles: list[ChunkProfile] | None = None  # per chunk, when asked for


class VariantStore(Protocol):
    """Chunk caches as computed behind other chunks (Cache-Craft's variants), kept by the engine."""

    def plans(self, keys: Sequence[str], chunks: Sequence[tuple[int, ...]], alpha: float
              ) -> tuple[list[ChunkKV | None], list[ChunkPlan]]: ...


class FusionStrategy(Protocol):
    name: str
    uses_cache: bool  # False: the strategy ignores stored KV and the engine loads none
    records_profiles: bool  # True: it can record each chunk's KV and attention profile (variants)

    def before_load(self, keys: Sequence[str], chunks: Sequence[tuple[int, ...]],
                    variants: Callable[[], VariantStore]) -> tuple[list[ChunkKV | None] | None, tuple[ChunkPlan, ...]]: ...

    def fuse(self, executor: LayerExecutor, inp: FusionInput) -> FusionResult: ...


class StrategyHooks:
    """What the engine asks of every strategy around its fusion, with the defaults most keep: the
    engine names no strategy."""

    records_profiles = False

    def before_load(self, keys: Sequence[str], chunks: Sequence[tuple[int, ...]],
                    variants: Callable[[], VariantStore]) -> tuple[list[ChunkKV | None] | None, tuple[ChunkPlan, ...]]:
        """Before the chunks' caches load: caches that stand in for some of them (None: load
        every one) and per-chunk plans for `FusionInput.plans`."""
        return None, ()


def selective_prefill(
    executor: LayerExecutor,
    layout: Layout,
    buf: torch.Tensor | FusedBuffer,
    rows: Rows,
    ape: ApeAttention | None = None,
    shrink: "Shrink | None" = None,
    observe: "Observer | None" = None,
    before_write: KVHook | None = None,
) -> tuple[torch.Tensor, int, int]:
    """Run every layer for ``rows`` only (sorted, ending with the last prompt token), attending
    over ``buf``, whose other entries are reused (``before_write`` may adjust them from each
    layer's fresh K/V). Returns the last token's logits, the token-layers computed and how many
    tokens were computed at the last layer. Nothing here reads the device: the sizes are known."""
    n = layout.length
    fused = as_fused(buf)
    hidden = executor.embed(layout.device_ids[rows.span.start : rows.span.stop] if rows.span is not None
                            else layout.device_ids[rows.index])
    work = 0
    for layer in range(executor.num_layers):
        fused.wait(layer)  # stored chunk caches: this layer may still be on its way
        if shrink is not None:
            keep = shrink(layer, hidden, rows, fused)
            if keep is not None:
                hidden, rows = hidden[keep], rows.take(keep)
        if observe is not None:
            observe(layer, hidden, rows)
        hidden = executor.run_layer(
            layer, hidden, rows, fused.kv[layer, 0, :, :n], fused.kv[layer, 1, :, :n], ape, before_write
        )
        work += len(rows)
    return executor.logits(hidden[-1:])[0], work, len(rows)


class Observer(Protocol):
    """Called before each layer of a selective prefill with that layer's inputs (read only)."""

    def __call__(self, layer: int, hidden: torch.Tensor, rows: Rows) -> None: ...


class Shrink(Protocol):
    """Called before each layer of a selective prefill; returns the rows to keep (a device index
    into the current rows, sorted) or None."""

    def __call__(self, layer: int, hidden: torch.Tensor, rows: Rows, buf: FusedBuffer) -> torch.Tensor | None: ...


def finish(
    executor: LayerExecutor,
    layout: Layout,
    buf: torch.Tensor | FusedBuffer,
    rows: Rows,
    ape: ApeAttention | None = None,
    shrink: Shrink | None = None,
    extra_work: int = 0,
    observe: Observer | None = None,
    before_write: KVHook | None = None,
) -> FusionResult:
    """Selective prefill, then package the fused cache and counts."""
    with stage("recompute_s"):
        fused = as_fused(buf)
        logits, work, last = selective_prefill(executor, layout, fused, rows, ape, shrink, observe, before_write)
    cache = FusedCache(fused.place_all(), layout.length, int(layout.positions[-1]) + 1, ape)
    return FusionResult(
        cache=cache,
        logits=logits,
        recomputed_tokens=round((work + extra_work) / executor.num_layers),
        reused_tokens=layout.length - last,
    )
