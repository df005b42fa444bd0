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
from chunkcache.errors import InvalidInputError
from chunkcache.device import upload
from chunkcache.model.executor import LayerExecutor, Rows, rotate


def check_shares(k_share: float, v_share: float) -> None:
    """``spread_k`` / ``spread_v`` are shares of a chunk's mean correction."""
    if not (0.0 <= k_share <= 1.0 and 0.0 <= v_share <= 1.0):
        raise InvalidInputError(
            f"spread_k and spread_v are shares of a chunk's mean correction in [0, 1], got {k_share} and {v_share}"
        )


class ChunkShift:
    """Adds ``k_share`` / ``v_share`` of each chunk's mean K / V correction to its reused tokens.

    Called once per layer of a selective prefill with the fresh K/V of the tokens computed at that
    layer, before they are written to the cache, so the reused entries still hold what was loaded.
    Its shapes are fixed by the prompt, never by which tokens were chosen, so the host works
    nothing out from the device: each chunk's mean is an averaging matrix over the computed rows
    (zero columns for the head's and the question's), and the shift is added to every chunk token,
    the computed ones included, whose entries the fresh K/V overwrite right after."""

    def __init__(self, executor: LayerExecutor, shares: tuple[float, float], owner: torch.Tensor, chunks: int,
                 span: range, positions: torch.Tensor, padded: bool = False) -> None:
        """``owner`` [N] (on the device): each sequence index's chunk number, ``chunks`` for the
        head's, the question's and padding; ``span``: the indices whose entries may shift (the
        chunks', side by side), ``positions`` [N] their RoPE positions (on the device);
        ``padded``: the span holds indices of no chunk (a fixed-shape fusion's whole sequence),
        which shift by a zero row."""
        self.shares = shares
        self.owner = owner
        self.span = span
        self.chunk_of = self.owner[span.start : span.stop]
        self.padded = padded
        # every index's rotary tables, made once: the rows' are gathered from them (the same bits)
        self.tables = executor.rotation(positions)
        self.span_rotation = (self.tables[0][span.start : span.stop], self.tables[1][span.start : span.stop])
        self.chunk_numbers = torch.arange(chunks, device=executor.device)
        self._last: tuple[Rows, torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None

    @classmethod
    def of_layout(cls, executor: LayerExecutor, layout: Layout, k_share: float, v_share: float) -> "ChunkShift":
        owner = torch.full((layout.length,), len(layout.chunks), dtype=torch.long)
        for i, span in enumerate(layout.chunks):
            owner[span.start : span.stop] = i
        span = range(layout.chunks[0].start, layout.chunks[-1].stop)  # the chunks lie side by side
        return cls(executor, (k_share, v_share), upload(owner, executor.device), len(layout.chunks), span,
                   layout.device_positions)

    def _plan(self, rows: Rows) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        """The averaging matrix [chunks, rows], the rows' rotary tables and (padded) which rows
        belong to a chunk [1, rows, 1], made again only when the rows change (gradual filtering)."""
        last = self._last
        if last is not None and last[0] is rows:
            return last[1], last[2], last[3]
        # A matrix product, not index_add_: on CUDA index_add_ adds atomically in no fixed order,
        # so the same request would shift the cache differently from run to run.
        owner = self.owner[rows.index]
        average = (owner[None, :] == self.chunk_numbers[:, None]).float()
        average /= average.sum(1, keepdim=True).clamp_min(1.0)
        rotation = (self.tables[0][rows.index], self.tables[1][rows.index])
        counted = (owner < len(self.chunk_numbers))[None, :, None] if self.padded else None
        self._last = (rows, average, rotation, counted)
        return average, rotation, counted

    def __call__(self, rows: Rows, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor) -> None:
        """``rows``: the tokens computed at this layer, ``k``/``v`` [kv_heads, n, d] their fresh K/V;
        ``keys``/``values`` [kv_heads, N, d] the layer's cache, changed in place."""
        average, rotation, counted = self._plan(rows)
        span = slice(self.span.start, self.span.stop)
        for share, fresh, cache, rotated in ((self.shares[0], k, keys, True), (self.shares[1], v, values, False)):
            if share == 0:
                continue
            delta = fresh.float() - cache[:, rows.index].float()
            if counted is not None:  # a padding row's zero weight must not meet a non-finite value: 0 * inf is NaN
                delta = torch.where(counted, delta, 0.0)
            if rotated:
                delta = rotate(delta, rotation, inverse=True)
            shift = average @ delta  # [kv_heads, chunks, d]
            if self.padded:
                shift = torch.cat((shift, shift.new_zeros(shift.shape[0], 1, shift.shape[2])), dim=1)
            shift = shift[:, self.chunk_of]
            if rotated:
                shift = rotate(shift, self.span_rotation)
            cache[:, span] += (share * shift).to(cache.dtype)


def spread_hook(executor: LayerExecutor, layout: Layout, k_share: float, v_share: float) -> ChunkShift | None:
    """The spread as a ``before_write`` hook of a selective prefill; None when both shares are 0
    or the prompt has no chunk."""
    return ChunkShift.of_layout(executor, layout, k_share, v_share) if (k_share or v_share) and layout.chunks else None
