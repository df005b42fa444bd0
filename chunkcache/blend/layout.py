"""Where every token of a fused prompt sits (sequence index and RoPE position) and the fused
cache buffer: the head's and chunks' stored KV placed at their indices, keys re-rotated."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Protocol

import torch

from chunkcache.errors import InvalidInputError
from chunkcache.kv import ChunkKV
from chunkcache.model.executor import ApeAttention, LayerExecutor, rotate
from chunkcache.model.prompt import PromptPieces
from chunkcache.timing import stage


@dataclass(frozen=True)
class Layout:
    token_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64: RoPE position of each index
    head: range
    chunks: tuple[range, ...]
    question: range

    @property
    def length(self) -> int:
        return int(self.token_ids.shape[0])


def _ranges(pieces: PromptPieces) -> tuple[range, tuple[range, ...], range]:
    start = len(pieces.head)
    head = range(0, start)
    chunks = []
    for chunk in pieces.chunks:
        chunks.append(range(start, start + len(chunk)))
        start += len(chunk)
    return head, tuple(chunks), range(start, start + len(pieces.question))


def sequential_layout(pieces: PromptPieces) -> Layout:
    """Head, chunks and question one after the other, positions equal to indices."""
    head, chunks, question = _ranges(pieces)
    ids = torch.tensor(pieces.all_ids(), dtype=torch.long)
    return Layout(ids, torch.arange(ids.shape[0]), head, chunks, question)


def parallel_layout(pieces: PromptPieces) -> Layout:
    """APE: every chunk starts right after the head (shared positions); the question follows the
    longest chunk."""
    head, chunks, question = _ranges(pieces)
    ids = torch.tensor(pieces.all_ids(), dtype=torch.long)
    positions = torch.empty_like(ids)
    positions[: len(head)] = torch.arange(len(head))
    longest = max((len(r) for r in chunks), default=0)
    for r in chunks:
        positions[r.start : r.stop] = torch.arange(len(head), len(head) + len(r))
    q0 = len(head) + longest
    positions[question.start : question.stop] = torch.arange(q0, q0 + len(question))
    return Layout(ids, positions, head, chunks, question)


@dataclass
class FusedCache:
    """The fused KV of a prompt, with room to append generated tokens."""

    kv: torch.Tensor  # [layers, 2, kv_heads, capacity, head_dim]
    length: int
    next_position: int
    ape: ApeAttention | None = None

    @property
    def capacity(self) -> int:
        return int(self.kv.shape[3])

    def layer(self, i: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.length if length is None else length
        return self.kv[i, 0, :, :n], self.kv[i, 1, :, :n]


class LayerSource(Protocol):
    """A chunk cache that arrives layer by layer (`chunkcache.store.LayerStream`)."""

    token_ids: tuple[int, ...]
    position_offset: int

    @property
    def num_tokens(self) -> int: ...

    def layer(self, i: int) -> torch.Tensor: ...


# Buffers whose streamed layers are filled on first use, by id (tensors compare elementwise, so
# they cannot be dict keys); an entry goes when its buffer is garbage-collected.
_LAZY: dict[int, "_LazyLayers"] = {}


class _LazyLayers:
    def __init__(self, executor: LayerExecutor, placed: list[tuple[slice, LayerSource, int]], device: torch.device
                 ) -> None:
        self.executor, self.placed = executor, placed
        self.filled = 0
        # Every streamed chunk's keys of a layer are re-rotated in one go, with per-token tables
        # made once for all layers: a re-rotation per chunk and layer is a dozen small kernels
        # each on a GPU. The tables are rerotate's (fp64 angles of each chunk's shift, applied in
        # fp32), so the result is the same to the bit.
        moved = [(span, delta) for span, _, delta in placed if delta]
        self.turned: tuple[torch.Tensor | slice, tuple[torch.Tensor, torch.Tensor]] | None = None
        if moved:
            cols = torch.cat([torch.arange(span.start, span.stop) for span, _ in moved])
            shifts = torch.cat([torch.full((span.stop - span.start,), delta) for span, delta in moved]).to(device)
            whole = bool((cols[1:] - cols[:-1] == 1).all()) if len(cols) > 1 else True
            where = slice(int(cols[0]), int(cols[-1]) + 1) if whole and len(cols) else cols.to(device)
            self.turned = (where, executor.rotation(shifts))

    def ensure(self, buf: torch.Tensor, layer: int) -> None:
        while self.filled <= min(layer, buf.shape[0] - 1):
            i = self.filled
            for span, source, _ in self.placed:
                stored = source.layer(i).to(buf.device, buf.dtype)
                buf[i, 0, :, span] = stored[0]
                buf[i, 1, :, span] = stored[1]
            if self.turned is not None:
                where, rotation = self.turned
                buf[i, 0, :, where] = rotate(buf[i, 0, :, where].float(), rotation).to(buf.dtype)
            self.filled += 1
        if self.filled == buf.shape[0]:  # every layer placed: let the streams' tensors go
            self.placed, self.turned = [], None
            _LAZY.pop(id(buf), None)


def wait_layer(buf: torch.Tensor, layer: int) -> None:
    """Make sure layer ``layer`` of a fused buffer holds its streamed chunks (no-op otherwise)."""
    lazy = _LAZY.get(id(buf))
    if lazy is not None:
        lazy.ensure(buf, layer)


def assemble_cache(
    executor: LayerExecutor,
    layout: Layout,
    head_kv: ChunkKV | None,
    chunk_kvs: tuple[ChunkKV | LayerSource, ...],
    capacity: int,
) -> torch.Tensor:
    """A cache buffer holding the stored KV of head and chunks at their layout positions. Chunks
    given as layer streams are placed layer by layer as the fusion reaches each layer."""
    with stage("rerotate_s"):
        buf = executor.empty_kv(capacity)
        placed = ([(layout.head, head_kv)] if head_kv is not None else []) + list(zip(layout.chunks, chunk_kvs))
        streamed = []
        for span, kv in placed:
            if kv.num_tokens != len(span):
                raise InvalidInputError(
                    f"cached chunk has {kv.num_tokens} tokens but its slot has {len(span)}; the cache "
                    "does not belong to this prompt"
                )
            if tuple(layout.token_ids[span.start : span.stop].tolist()) != kv.token_ids:
                raise InvalidInputError("cached chunk's token ids differ from the prompt's; wrong cache entry")
            target = int(layout.positions[span.start]) if len(span) else 0
            if not isinstance(kv, ChunkKV):
                streamed.append((slice(span.start, span.stop), kv, target - kv.position_offset))
                continue
            stored = kv.kv.to(buf.device, buf.dtype)
            buf[:, 0, :, span.start : span.stop] = executor.rerotate(stored[:, 0], target - kv.position_offset)
            buf[:, 1, :, span.start : span.stop] = stored[:, 1]
        if streamed:
            _LAZY[id(buf)] = _LazyLayers(executor, streamed, buf.device)
            weakref.finalize(buf, _LAZY.pop, id(buf), None)
        return buf
