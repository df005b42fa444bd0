"""Spreading the recomputed tokens' corrections over the rest of their chunk.

A chunk's reused K/V miss what the passages before it would have added. Part of that gap is shared
by the chunk's tokens: at every layer, the mean change the recomputed tokens of a chunk receive
(fresh minus reused K/V) also moves the chunk's other tokens towards a full prefill. Adding a
fraction of that mean to the tokens that are not recomputed costs a few vector operations per
layer and no extra token computation. K changes are averaged with their rotary rotation undone
and rotated again for each token's position, so a shared change means the same at every position.
The fraction is below one because the recomputed tokens are those that deviate most: their mean
change overshoots the others'."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chunkcache.blend.layout import Layout
from chunkcache.errors import InvalidInputError
from chunkcache.model.executor import KeepLast, LayerExecutor, rotate


def check_shares(k_share: float, v_share: float) -> None:
    """``spread_k`` / ``spread_v`` are shares of a chunk's mean correction."""
    if not (0.0 <= k_share <= 1.0 and 0.0 <= v_share <= 1.0):
        raise InvalidInputError(
            f"spread_k and spread_v are shares of a chunk's mean correction in [0, 1], got {k_share} and {v_share}"
        )


@dataclass(frozen=True)
class _Plan:
    """Which tokens a layer's spread reads and moves, as index tensors on the executor's device."""

    pick: torch.Tensor  # positions within the layer's computed tokens that belong to a chunk
    where: torch.Tensor  # their sequence indices
    average: torch.Tensor  # [chunks, picked]: row c averages chunk c's computed tokens (zeros where it has none)
    target: torch.Tensor  # sequence indices of the reused chunk tokens
    target_chunk: torch.Tensor  # their chunk numbers
    where_rotation: tuple[torch.Tensor, torch.Tensor]  # rotary tables of ``where`` and ``target``: every layer's
    target_rotation: tuple[torch.Tensor, torch.Tensor]


class ChunkShift:
    """Adds ``k_share`` / ``v_share`` of each chunk's mean K / V correction to its reused tokens.

    Called once per layer of a selective prefill with the fresh K/V of the tokens computed at that
    layer, before they are written to the cache, so the reused entries still hold what was loaded.
    Which tokens it reads and moves is worked out on the CPU once per set of computed tokens (the
    set changes only while gradual filtering shrinks it): on a GPU, deciding it there every layer
    would wait for the device several times a layer."""

    def __init__(self, executor: LayerExecutor, layout: Layout, k_share: float, v_share: float) -> None:
        self.executor = executor
        self.shares = (k_share, v_share)
        owner = torch.full((layout.length,), -1, dtype=torch.long)
        for i, span in enumerate(layout.chunks):
            owner[span.start : span.stop] = i
        self.owner = owner  # chunk number per sequence index; -1: head or question
        self.positions = layout.positions
        self.chunks = len(layout.chunks)
        self._plans: KeepLast[_Plan | None] = KeepLast()

    def plan(self, index: torch.Tensor) -> _Plan | None:
        """The tokens read and moved when the tokens at ``index`` are computed; None: nothing to do."""
        index = index.cpu()
        return self._plans.get(index, lambda: self._make_plan(index))

    def _make_plan(self, index: torch.Tensor) -> _Plan | None:
        pick = torch.nonzero(self.owner[index] >= 0).flatten()
        reused = self.owner >= 0
        reused[index] = False
        target = torch.nonzero(reused).flatten()
        if not (pick.numel() and target.numel()):  # no chunks, or every chunk token computed
            return None
        where = index[pick]
        chunk_of = self.owner[where]
        device = self.executor.device
        # A matrix product, not index_add_: on CUDA index_add_ adds atomically in no fixed order,
        # so the same request would shift the cache differently from run to run, and gradual
        # filtering would then pick other tokens (and meet attention shapes it has not seen).
        average = torch.zeros(self.chunks, len(where))
        average[chunk_of, torch.arange(len(where))] = 1.0
        average /= average.sum(1, keepdim=True).clamp_min(1.0)
        return _Plan(
            pick.to(device), where.to(device), average.to(device),
            target.to(device), self.owner[target].to(device),
            self.executor.rotation(self.positions[where]), self.executor.rotation(self.positions[target]),
        )

    def __call__(self, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor) -> None:
        """``index`` [n]: the sequence indices computed at this layer, ``k``/``v`` [kv_heads, n, d]
        their fresh K/V; ``keys``/``values`` [kv_heads, N, d] the layer's cache, changed in place."""
        plan = self.plan(index)
        if plan is None:
            return
        for share, fresh, cache, rotated in ((self.shares[0], k, keys, True), (self.shares[1], v, values, False)):
            if share == 0:
                continue
            delta = fresh[:, plan.pick].float() - cache[:, plan.where].float()
            if rotated:
                delta = rotate(delta, plan.where_rotation, inverse=True)
            shift = (plan.average @ delta)[:, plan.target_chunk]
            if rotated:
                shift = rotate(shift, plan.target_rotation)
            cache[:, plan.target] += (share * shift).to(cache.dtype)


def spread_hook(executor: LayerExecutor, layout: Layout, k_share: float, v_share: float) -> ChunkShift | None:
    """The spread as a ``before_write`` hook of a selective prefill; None when both shares are 0."""
    return ChunkShift(executor, layout, k_share, v_share) if k_share or v_share else None
