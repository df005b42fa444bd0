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

import torch

from chunkcache.blend.layout import Layout
from chunkcache.model.executor import LayerExecutor


class ChunkShift:
    """Adds ``k_share`` / ``v_share`` of each chunk's mean K / V correction to its reused tokens.

    Called once per layer of a selective prefill with the fresh K/V of the tokens computed at that
    layer, before they are written to the cache, so the reused entries still hold what was loaded."""

    def __init__(self, executor: LayerExecutor, layout: Layout, k_share: float, v_share: float) -> None:
        self.executor = executor
        self.shares = (k_share, v_share)
        device = executor.device
        owner = torch.full((layout.length,), -1, dtype=torch.long)
        for i, span in enumerate(layout.chunks):
            owner[span.start : span.stop] = i
        self.owner = owner.to(device)
        self.positions = layout.positions.to(device)
        self.chunks = len(layout.chunks)

    def __call__(self, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor) -> None:
        """``index`` [n]: the sequence indices computed at this layer, ``k``/``v`` [kv_heads, n, d]
        their fresh K/V; ``keys``/``values`` [kv_heads, N, d] the layer's cache, changed in place."""
        index = index.to(self.owner.device)
        owner = self.owner  # chunk number per sequence index; -1: head or question
        source = owner[index] >= 0
        if not bool(source.any()):  # also when the prompt has no chunk
            return
        where, chunk_of = index[source], owner[index[source]]
        reused = owner >= 0
        reused[where] = False
        target = torch.nonzero(reused).flatten()
        if target.numel() == 0:
            return
        counts = torch.bincount(chunk_of, minlength=self.chunks).clamp_min(1)
        for share, fresh, cache, rotated in ((self.shares[0], k, keys, True), (self.shares[1], v, values, False)):
            if share == 0:
                continue
            delta = fresh[:, source].float() - cache[:, where].float()
            if rotated:
                delta = self.executor.turn(delta, self.positions[where], inverse=True)
            means = delta.new_zeros(delta.shape[0], self.chunks, delta.shape[2]).index_add_(1, chunk_of, delta)
            shift = (means / counts[None, :, None].to(delta.dtype))[:, owner[target]]
            if rotated:
                shift = self.executor.turn(shift, self.positions[target])
            cache[:, target] += (share * shift).to(cache.dtype)
