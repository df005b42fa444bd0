"""Decode attention for a whole batch in one call: B sequences, one new token each, every
sequence in its own fused-cache buffer of its own capacity. A `DecodeTable` names the buffers by
address (one int64 a sequence, read on the device), with each buffer's capacity and the index the
new token is written at; the kernels write every sequence's fresh K/V there and attend each
sequence's query heads over its keys up to it. Nothing is read back and no size depends on the
table's values, so a decode step through these kernels can be captured once in a CUDA graph and
replayed whatever sequences the batch holds (the table is refilled, in place, before a replay).

Three launches a layer: the write, the attention over key splits (flash decoding: a program per
(sequence, kv head, split), the split count fixed by the caller from the largest capacity, so the
grid is fixed too) and the merge of the splits' partials. A GQA group's query heads share one
program and its key reads.

Buffers are [layers, 2, kv_heads, capacity, head_dim], contiguous (a `KVPool` buffer or a new
one); the table holds `data_ptr()`s, so the tensors must outlive the launches (the sequences own
them). Needs CUDA tensors, or any tensors under Triton's interpreter (`chunkcache.triton_jit`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from chunkcache.triton_jit import jit, launch_mode, on_device

SPLIT_KEYS = 512  # keys a split covers: whole key blocks; at 8K a sequence has 16 splits
_MIN_GROUP_ROWS = 16  # tl.dot needs 16 rows: a GQA group is padded to it
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_kernels: dict[bool, Any] = {}
tl: Any = None  # triton.language, once `_compiled` imported it (the kernels' bodies need the global)


@dataclass(frozen=True)
class DecodeTable:
    """Where each of B new tokens goes, all on the model's device: ``at`` [B] (its sequence
    index: written there, attending over 0..at), ``base`` [B] (its buffer's ``data_ptr()``),
    ``capacity`` [B] (its buffer's tokens), int64; ``splits`` key splits of `SPLIT_KEYS` cover
    every capacity in the table (a host number: it sizes the grid)."""

    at: torch.Tensor
    base: torch.Tensor
    capacity: torch.Tensor
    splits: int


def splits_for(capacity: int) -> int:
    """Key splits covering ``capacity`` tokens, rounded up to a power of two: a bucket, so that
    a graph captured for it serves every batch whose longest buffer falls in it."""
    need = max(1, -(-capacity // SPLIT_KEYS))
    return 1 << (need - 1).bit_length()


def launch_config(head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_N, num_warps) of the attention kernel: fixed, not autotuned (a graph replays what
    it captured). Checked by compiling for sm_90 without a GPU (tests/model/test_decode_attention.py):
    no spills, at most 83 KB of shared memory with the key and value tiles pipelined (within an
    sm_86's 99 KB); fp32 tiles are twice the bytes, so they take shorter key blocks and more warps."""
    if dtype == torch.float32:
        return (32, 8) if head_dim <= 128 else (16, 4)
    return (64, 4) if head_dim <= 128 else (32, 4)


def supports(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the kernels take this head size and dtype (else decode attends per sequence)."""
    return dtype in _DTYPES and not head_dim & (head_dim - 1) and 16 <= head_dim <= 256


def table_of(buffers: Sequence[torch.Tensor], at: Sequence[int]) -> list[list[int]]:
    """The host rows of a `DecodeTable` for ``buffers`` (contiguous, one per sequence) and the
    indices their new tokens go to: [at, base, capacity]."""
    for buf, index in zip(buffers, at):
        if not fits(buf):
            raise ValueError("decode attention needs contiguous, 16-byte aligned cache buffers "
                             "[layers, 2, kv_heads, capacity, head_dim]")
        if not 0 <= index < buf.shape[3]:
            raise ValueError(f"a decoded token's index {index} is outside its cache of {buf.shape[3]} tokens")
    return [list(at), [b.data_ptr() for b in buffers], [int(b.shape[3]) for b in buffers]]


def fits(buffer: torch.Tensor) -> bool:
    """Whether the kernels can address ``buffer`` through the table: contiguous, 16-byte aligned
    (what a whole allocation is; a view into one may not be)."""
    return buffer.is_contiguous() and buffer.data_ptr() % 16 == 0


def _write_source(K, V, Base, Cap, At, stride_kh, stride_kb, stride_vh, stride_vb, layer,
                  KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr):  # pragma: no cover - runs in Triton
    b = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    cache = tl.load(Base + b).to(tl.pointer_type(K.dtype.element_ty))
    cap = tl.load(Cap + b)
    at = tl.load(At + b)
    offs_d = tl.arange(0, HEAD_DIM)
    k_at = ((layer * 2 * KV_HEADS + head) * cap + at) * HEAD_DIM + offs_d
    v_at = (((layer * 2 + 1) * KV_HEADS + head) * cap + at) * HEAD_DIM + offs_d
    tl.store(cache + k_at, tl.load(K + head * stride_kh + b * stride_kb + offs_d))
    tl.store(cache + v_at, tl.load(V + head * stride_vh + b * stride_vb + offs_d))


def _attend_source(Q, Base, Cap, At, Out, Part,
                   stride_qh, stride_qb, stride_ob, layer, split_len, qk_scale,
                   KV_HEADS: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_N: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                   SPLIT: tl.constexpr):  # pragma: no cover - runs in Triton
    # One program per (sequence, kv head, split): the group's query heads are the rows of one
    # tile (padded to ROWS), so each key block is read once for all of them.
    b = tl.program_id(0)
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    cache = tl.load(Base + b).to(tl.pointer_type(Q.dtype.element_ty))
    cap = tl.load(Cap + b)
    at = tl.load(At + b)
    offs_g = tl.arange(0, ROWS)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    q = tl.load(Q + heads[:, None] * stride_qh + b * stride_qb + offs_d[None, :], mask=rows[:, None], other=0.0)
    if UPCAST:  # the interpreter keeps bf16 as raw uint16 bits: the dots see them widened
        q = q.to(tl.float32)
    # the table's addresses are 16-byte aligned (`table_of` checks) and every row is HEAD_DIM
    # (>= 16) elements: said so, the key and value tiles load as 16-byte vectors, pipelined
    # (an address read from memory tells the compiler nothing by itself)
    k_base = tl.multiple_of(cache + (layer * 2 * KV_HEADS + kv_head) * cap * HEAD_DIM, 16)
    v_base = tl.multiple_of(cache + ((layer * 2 + 1) * KV_HEADS + kv_head) * cap * HEAD_DIM, 16)
    lo = 0
    hi = at + 1
    if SPLIT:
        lo = split * split_len
        hi = tl.minimum(hi, lo + split_len)
    # a split past the sequence's keys keeps the neutral partial (m = -1e30, l = 0, acc = 0)
    m_i = tl.full([ROWS], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        live = cols < hi
        k = tl.load(k_base + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=live[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=live[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = tl.where(live[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p = p.to(Q.dtype.element_ty)
        if UPCAST:
            p = p.to(tl.float32)
        if IEEE:
            acc = tl.dot(p, v, acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p, v, acc * alpha[:, None])
        m_i = m_new
    if SPLIT:  # Part: acc [splits, B, heads, d], then m and l [2, splits, B, heads], fp32
        heads_total = KV_HEADS * GROUP
        total = tl.num_programs(2).to(tl.int64) * tl.num_programs(0) * heads_total
        rec = (split.to(tl.int64) * tl.num_programs(0) + b) * heads_total + heads
        tl.store(Part + rec[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=rows[:, None])
        tl.store(Part + total * HEAD_DIM + rec, m_i, mask=rows)
        tl.store(Part + total * (HEAD_DIM + 1) + rec, l_i, mask=rows)
    else:
        out = acc / l_i[:, None]
        tl.store(Out + b * stride_ob + heads[:, None] * HEAD_DIM + offs_d[None, :], out.to(Out.dtype.element_ty),
                 mask=rows[:, None])


def _merge_source(Part, Out, stride_ob, splits,
                  KV_HEADS: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr,
                  HEAD_DIM: tl.constexpr):  # pragma: no cover - runs in Triton
    # One program per (sequence, kv head), its group's rows: out = sum_s w_s acc_s / sum_s w_s l_s,
    # w_s = exp2(m_s - max m). Split 0 holds key 0, which every sequence sees: the running max is
    # finite from then on.
    b = tl.program_id(0)
    kv_head = tl.program_id(1).to(tl.int64)
    offs_g = tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    heads_total = KV_HEADS * GROUP
    total = splits.to(tl.int64) * tl.num_programs(0) * heads_total
    m_all = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_all = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    for s in range(0, splits):
        rec = (s * tl.num_programs(0) + b).to(tl.int64) * heads_total + heads
        m_s = tl.load(Part + total * HEAD_DIM + rec, mask=rows, other=0.0)
        l_s = tl.load(Part + total * (HEAD_DIM + 1) + rec, mask=rows, other=1.0)  # no 0 / 0 in padding rows
        a_s = tl.load(Part + rec[:, None] * HEAD_DIM + offs_d[None, :], mask=rows[:, None], other=0.0)
        m_new = tl.maximum(m_all, m_s)
        alpha = tl.math.exp2(m_all - m_new)
        w = tl.math.exp2(m_s - m_new)
        l_all = l_all * alpha + l_s * w
        acc = acc * alpha[:, None] + a_s * w[:, None]
        m_all = m_new
    tl.store(Out + b * stride_ob + heads[:, None] * HEAD_DIM + offs_d[None, :],
             (acc / l_all[:, None]).to(Out.dtype.element_ty), mask=rows[:, None])


def _compiled(interpreting: bool) -> tuple[Any, Any, Any]:
    global tl
    import triton.language as tl

    if interpreting not in _kernels:
        # the table's values and the layer change every launch: no specialisation on them
        _kernels[interpreting] = (
            jit(_write_source, interpreting, do_not_specialize=["layer"]),
            jit(_attend_source, interpreting, do_not_specialize=["layer", "split_len"]),
            jit(_merge_source, interpreting, do_not_specialize=["splits"]),
        )
    return _kernels[interpreting]


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: DecodeTable, layer: int,
                     scale: float) -> torch.Tensor:
    """Write ``k``/``v`` [kv_heads, B, d] (sequence b's fresh K/V) into layer ``layer`` of each
    sequence's buffer at ``table.at[b]``, then attend ``q`` [heads, B, d] (rotated queries; head h
    uses kv head h // (heads // kv_heads)) over that sequence's keys 0..at[b]. Returns
    [B, heads * d] in q's dtype, ready for o_proj. Every buffer must hold ``q``'s dtype and head
    size and this layer count (the table cannot be checked without reading it)."""
    interpreting = launch_mode("decode_attention", q.device, "decode with decode_mode 'loop'")
    heads, batch, dim = q.shape
    kv_heads = k.shape[0]
    if k.shape != (kv_heads, batch, dim) or v.shape != k.shape or heads % kv_heads or not supports(dim, q.dtype):
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} ({q.dtype}) do not fit "
                         "decode attention")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k and v need a last stride of 1")
    write, attend, merge = _compiled(interpreting)
    group = heads // kv_heads
    out = torch.empty(batch, heads * dim, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    splits = table.splits
    part = out if splits == 1 else torch.empty(splits * batch * heads * (dim + 2), dtype=torch.float32,
                                               device=q.device)
    upcast = interpreting and q.dtype == torch.bfloat16
    with on_device(q.device):
        write[(batch, kv_heads)](k, v, table.base, table.capacity, table.at, k.stride(0), k.stride(1), v.stride(0),
                                 v.stride(1), layer, KV_HEADS=kv_heads, HEAD_DIM=dim)
        rows = max(_MIN_GROUP_ROWS, 1 << (group - 1).bit_length())
        block_n, num_warps = launch_config(dim, q.dtype)
        attend[(batch, kv_heads, splits)](
            q, table.base, table.capacity, table.at, out, part, q.stride(0), q.stride(1), out.stride(0), layer,
            SPLIT_KEYS, scale * math.log2(math.e), KV_HEADS=kv_heads, GROUP=group, ROWS=rows, HEAD_DIM=dim,
            BLOCK_N=block_n, IEEE=q.dtype == torch.float32 or upcast, UPCAST=upcast, SPLIT=splits > 1,
            num_warps=num_warps,
        )
        if splits > 1:
            merge[(batch, kv_heads)](part, out, out.stride(0), splits, KV_HEADS=kv_heads, GROUP=group, ROWS=rows,
                                     HEAD_DIM=dim, num_warps=4)
    return out
