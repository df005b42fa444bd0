"""Where every token of a fused prompt sits (sequence index and RoPE position, on the host and on
the model's device) and the fused cache buffer: the head's and chunks' stored KV placed at their
indices, keys re-rotated, one layer at a time as the fusion reaches it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from chunkcache.errors import InvalidInputError
from chunkcache.kv import ChunkKV, EncodedLayer
from chunkcache.device import SideStream, upload
from chunkcache.model.executor import ApeAttention, LayerExecutor, Rows, rotate
from chunkcache.model.prompt import PromptPieces
from chunkcache.timing import stage


@dataclass(frozen=True)
class Layout:
    token_ids: torch.Tensor  # [N] int64, host
    positions: torch.Tensor  # [N] int64, host: RoPE position of each index
    head: range
    chunks: tuple[range, ...]
    question: range
    device_ids: torch.Tensor  # the same two on the model's device (one asynchronous copy)
    device_positions: torch.Tensor

    @property
    def length(self) -> int:
        return int(self.token_ids.shape[0])

    def span_rows(self, executor: LayerExecutor, span: range) -> Rows:
        """`Rows` of a contiguous range of indices."""
        return executor.span_rows(span, self.device_positions[span.start : span.stop])

    def rows(self, executor: LayerExecutor, index: torch.Tensor) -> Rows:
        """`Rows` of sorted sequence indices ``index`` (on the model's device)."""
        return executor.rows(index, self.device_positions[index])


def _ranges(pieces: PromptPieces) -> tuple[range, tuple[range, ...], range]:
    start = len(pieces.head)
    head = range(0, start)
    chunks = []
    for chunk in pieces.chunks:
        chunks.append(range(start, start + len(chunk)))
        start += len(chunk)
    return head, tuple(chunks), range(start, start + len(pieces.question))


def _layout(pieces: PromptPieces, positions: torch.Tensor | None, device: torch.device) -> Layout:
    head, chunks, question = _ranges(pieces)
    ids = torch.tensor(pieces.all_ids(), dtype=torch.long)
    positions = torch.arange(ids.shape[0]) if positions is None else positions
    on_device = upload(torch.stack((ids, positions)), device)
    return Layout(ids, positions, head, chunks, question, on_device[0], on_device[1])


def sequential_layout(pieces: PromptPieces, device: torch.device | str = "cpu") -> Layout:
    """Head, chunks and question one after the other, positions equal to indices."""
    return _layout(pieces, None, torch.device(device))


def parallel_layout(pieces: PromptPieces, device: torch.device | str = "cpu") -> Layout:
    """APE: every chunk starts right after the head (shared positions); the question follows the
    longest chunk."""
    head, chunks, question = _ranges(pieces)
    positions = torch.empty(question.stop, dtype=torch.long)
    positions[: len(head)] = torch.arange(len(head))
    longest = max((len(r) for r in chunks), default=0)
    for r in chunks:
        positions[r.start : r.stop] = torch.arange(len(head), len(head) + len(r))
    q0 = len(head) + longest
    positions[question.start : question.stop] = torch.arange(q0, q0 + len(question))
    return _layout(pieces, positions, torch.device(device))


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

    def layer(self, i: int) -> torch.Tensor | EncodedLayer: ...


class FusedBuffer:
    """A fused cache tensor ``kv`` [layers, 2, kv_heads, tokens, head_dim] and the stored caches
    still to be placed into it. Stored layers are placed when first read: `wait` (the fusion
    has reached a layer), `layer` (one layer, placed), `place_all` (every layer, for
    generation). The placement lives and dies with this object (a pool's tensor outlives it)."""

    def __init__(self, kv: torch.Tensor) -> None:
        self.kv = kv
        self._placement: _Placement | None = None

    def wait(self, layer: int) -> None:
        """The fusion has reached ``layer``: its stored caches are placed (and the next layer's
        copies started)."""
        self._place(layer)

    def layer(self, i: int) -> torch.Tensor:
        """Layer ``i`` [2, kv_heads, tokens, head_dim], its stored caches placed."""
        self._place(i)
        return self.kv[i]

    def place_all(self) -> torch.Tensor:
        """The whole tensor, every stored layer placed (what generation reads)."""
        self._place(self.kv.shape[0] - 1)
        return self.kv

    def _place(self, layer: int) -> None:
        if self._placement is not None and self._placement.ensure(self.kv, layer):
            self._placement = None  # every layer placed: let the sources go


def as_fused(buf: torch.Tensor | FusedBuffer) -> FusedBuffer:
    """``buf`` as a `FusedBuffer` (a plain tensor has nothing left to place)."""
    return buf if isinstance(buf, FusedBuffer) else FusedBuffer(buf)


class _Placement:
    """Places every stored cache's layer i into a fused buffer when the fusion first reaches
    layer i: one concatenation over all caches (head and chunks lie side by side before the
    question) and one re-rotation of every moved key, with per-token tables made once (fp64
    angles of each cache's shift, applied in fp32, as `LayerExecutor.rerotate` computes them).

    Host layers (the CPU tier's pinned caches, decoded disk entries, and encoded ones that the
    device decodes itself: `EncodedLayer`) go to the device on a side stream one layer ahead, into one of two staging slots that hold a layer of every host cache
    side by side; a slot is written again only once the concatenation that read it has run, so
    staging never holds more than two layers however far the host runs ahead of the device."""

    def __init__(self, executor: LayerExecutor, sources: list[ChunkKV | LayerSource], placed: range,
                 shifts: torch.Tensor, device: torch.device, dtype: torch.dtype) -> None:
        self.sources = sources
        self.placed = placed  # the indices the caches fill, side by side
        # the keys to turn: from the first moved token to the last (unmoved ones between them
        # turn by 0); host tensors, so these are host operations
        self.moved, self.rotation = None, None
        moved = torch.nonzero(shifts).flatten()
        if len(moved):
            first, last = int(moved[0]), int(moved[-1]) + 1
            self.moved = range(placed.start + first, placed.start + last)
            self.rotation = executor.rotation(upload(shifts[first:last], device))
        self.device, self.dtype = device, dtype
        self.side = SideStream(device)
        self.slots: torch.Tensor | None = None  # [2, 2, kv_heads, host tokens, head_dim]
        self.consumed: list[object] = [None, None]  # per slot: after the concatenation that read it
        self.staged: dict[int, tuple[list[torch.Tensor], object]] = {}
        self.filled = 0

    def _stage(self, i: int) -> None:
        layers = [s.kv[i] if isinstance(s, ChunkKV) else s.layer(i) for s in self.sources]
        host = [p.device.type == "cpu" and self.device.type != "cpu" for p in layers]
        if not any(host):
            self.staged[i] = (layers, None)
            return
        if self.slots is None:
            first = next(p for p, h in zip(layers, host) if h)
            tokens = sum(p.shape[2] for p, h in zip(layers, host) if h)
            self.slots = torch.empty((2, 2, first.shape[1], tokens, first.shape[3]), dtype=self.dtype,
                                     device=self.device)
            self.side.follow()
        slot, start, views, copies = self.slots[i % 2], 0, [], []
        for part, on_host in zip(layers, host):
            if on_host:
                view = slot[:, :, start : start + part.shape[2]]
                copies.append((view, part))
                start += part.shape[2]
                part = view
            views.append(part)
        self.staged[i] = (views, self.side.copy_into(copies, after=self.consumed[i % 2]))

    def ensure(self, buf: torch.Tensor, layer: int) -> bool:
        """Place every layer up to ``layer``; True once every layer is placed."""
        while self.filled <= min(layer, buf.shape[0] - 1):
            i = self.filled
            if i not in self.staged:
                self._stage(i)
            parts, event = self.staged.pop(i)
            self.side.wait(event)
            if i + 1 < buf.shape[0]:
                self._stage(i + 1)  # its copies run while this layer is computed
            parts = [p.to(buf.dtype) for p in parts]
            torch.cat(parts, dim=2, out=buf[i, :, :, self.placed.start : self.placed.stop])
            self.consumed[i % 2] = self.side.mark()
            if self.moved is not None:
                keys = buf[i, 0, :, self.moved.start : self.moved.stop]
                keys.copy_(rotate(keys.float(), self.rotation).to(buf.dtype))
            self.filled += 1
        if self.filled == buf.shape[0]:  # every layer placed: let the sources go
            self.sources, self.rotation, self.slots = [], None, None
            return True
        return False


def assemble_cache(
    executor: LayerExecutor,
    layout: Layout,
    head_kv: ChunkKV | None,
    chunk_kvs: tuple[ChunkKV | LayerSource, ...],
    buf: torch.Tensor,
) -> FusedBuffer:
    """``buf`` (a zeroed fused-cache buffer), made to hold the stored KV of head and chunks at
    their layout positions as each layer is first read (`FusedBuffer`)."""
    with stage("rerotate_s"):
        placed = ([(layout.head, head_kv)] if head_kv is not None else []) + list(zip(layout.chunks, chunk_kvs))
        fused = FusedBuffer(buf)
        if not placed:
            return fused
        shifts = []
        for span, kv in placed:
            if kv.num_tokens != len(span):
                raise InvalidInputError(
                    f"cached chunk has {kv.num_tokens} tokens but its slot has {len(span)}; the cache "
                    "does not belong to this prompt"
                )
            if tuple(layout.token_ids[span.start : span.stop].tolist()) != kv.token_ids:
                raise InvalidInputError("cached chunk's token ids differ from the prompt's; wrong cache entry")
            target = int(layout.positions[span.start]) if len(span) else 0
            shifts.append(torch.full((len(span),), target - kv.position_offset, dtype=torch.long))
        region = range(placed[0][0].start, placed[-1][0].stop)  # head and chunks lie side by side
        fused._placement = _Placement(executor, [kv for _, kv in placed], region, torch.cat(shifts), buf.device,
                                      buf.dtype)
        return fused
