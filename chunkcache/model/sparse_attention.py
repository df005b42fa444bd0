"""Sparse-query causal attention: a few queries at arbitrary sorted sequence positions attend to
a fused KV cache, each to the keys up to its own position. This module owns the Triton kernel
that does it without any host read (`sparse_query_attention`), its plain-torch reference with
the same contract (`reference_sparse_attention`, the CPU path and the tests' oracle) and the check
whether Triton can be used at all (`triton_available`).

Split-KV (flash decoding): a program per (head, query block) loops over all keys up to the block's
last position, so a few queries (a decoded token, a question over a long cache) would leave most
of the GPU idle while `heads` programs each read S keys serially. When the programs would not fill
the GPU (`_splits`, from shapes and the SM count only), the key range is cut into equal splits as
a third grid axis; each program writes an fp32 partial (running max, sum, unnormalised output) and
a second small kernel merges a row's partials logsumexp-style. Otherwise one launch, as before.

Triton is optional: it is imported only when the kernel is first used, and decorated in the
mode of Triton's library (`chunkcache.triton_jit`: the interpreter is a per-process choice)."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F

from chunkcache.triton_jit import interpreter_active, jit, launch_mode, on_device, triton_available

# triton_available and interpreter_active come from chunkcache.triton_jit; callers ask here too
__all__ = ["interpreter_active", "kernel_supports", "launch_config", "reference_sparse_attention",
           "sparse_query_attention", "triton_available"]

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_MIN_HEAD_DIM, _MAX_HEAD_DIM = 16, 256  # tl.dot needs K >= 16; 256 is the largest config sized below
_kernels: dict[bool, Any] = {}  # interpreter active -> (kernel, combine kernel) decorated in that mode
# Fewer keys a split would not pay for writing and merging its partials. The tests lower it to
# reach splits at the small S the interpreter can afford.
_MIN_SPLIT_KEYS = 512
_COMBINE_ROWS = 16  # rows a combine program merges: a split grid has few rows, so still many programs
_PRETEND_SMS = 132  # the interpreter has no device: an H100's SM count keeps the split rule the same
tl: Any = None  # triton.language once `_kernel` has imported it (the kernel's body needs the global)


def launch_config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for one head size and dtype. Fixed, not autotuned:
    autotuning on the first call would add that request's latency and break CUDA-graph capture.

    Checked by compiling for sm_90 (Triton 3.5, 3.6, 3.9) without a GPU: no register spills in
    16-bit; shared memory 40 KB (head_dim 64, 16-bit), 80 KB (128), 96 KB (256), fp32 at most 72 KB,
    under an H100's 227 KB (and an sm_86's 99 KB). The split-KV variant: the same shared memory, no
    spills (Triton 3.9) but one 4-byte store outside the loop (fp32, head_dim 32)."""
    if dtype == torch.float32:
        # IEEE fp32 dots run on FMA units with whole tiles in registers: larger tiles spill.
        if head_dim <= 64:
            return 32, 32, 4, 2
        return (64, 32, 8, 2) if head_dim <= 128 else (16, 16, 4, 2)
    if head_dim <= 128:
        return 64, 64, 4, 2
    # 8 warps keep the 64 x 256 fp32 accumulator at 64 registers a thread
    return 64, 32, 8, 2


@functools.cache  # a driver query: the same for every call on a device
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _splits(n_programs: int, S: int, sm_count: int, block_n: int, min_split: int) -> tuple[int, int]:
    """(splits, keys per split) for `n_programs` (head, query block) programs over S keys: a pure
    function of shapes, so a CUDA graph replays the grid it captured. Splits are whole key blocks
    of at least `min_split` keys (the last one may be shorter). Two 16-bit programs fit an SM at
    head_dim <= 128 (sm_90: <= 221 registers x 128 threads, <= 80 KB shared), so a grid of up to
    2 x SMs programs runs in one wave: split as much as still fits in it, i.e. only when there is
    at most one program an SM unsplit. (fp32 and head_dim 256 fit one an SM: two waves.)"""
    splits = min(2 * sm_count // n_programs, S // max(min_split, block_n))
    if splits < 2:
        return 1, S
    split_len = -(-S // splits)
    split_len = -(-split_len // block_n) * block_n
    return -(-S // split_len), split_len


def _kernel_source(
    Q, K, V, Idx, Out, Part,
    stride_qh, stride_qm, stride_kh, stride_kn, stride_vh, stride_vn, stride_om,
    n, S, split_len, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr,
):  # pragma: no cover - its lines run inside Triton (compiled, or interpreted without coverage)
    # One program per (query head, query block): folding a GQA group into the block would save K/V
    # reads only while blocks are under-filled, and would divide the programs of a short n by the
    # group. Heads vary fastest, so a group's programs run side by side and share K/V tiles in L2;
    # query blocks run last-first: later positions see more keys, so the longest programs start first.
    # With SPLIT, program_id(2) picks the keys [split * split_len, (split + 1) * split_len).
    head = tl.program_id(0)
    block_m = tl.num_programs(1) - 1 - tl.program_id(1)
    kv_head = (head // GROUP).to(tl.int64)
    # A 64-bit block start: row * stride may pass 2**31 for huge n. Offsets inside a block stay
    # 32-bit (BLOCK_M x stride is far below it; 64-bit row vectors spilled fp32 at head_dim 128).
    row0 = (block_m * BLOCK_M).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_M)
    offs_m = block_m * BLOCK_M + offs_r
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m < n
    # Rows past n pretend to sit at position 0: key 0 keeps their softmax finite, and they are
    # neither stored nor counted in the loop bound. The clamp keeps a bad index inside the keys.
    pos = tl.minimum(tl.load(Idx + offs_m, mask=rows, other=0), S - 1).to(tl.int32)
    q = tl.load(Q + head.to(tl.int64) * stride_qh + row0 * stride_qm + offs_r[:, None] * stride_qm
                + offs_d[None, :], mask=rows[:, None], other=0.0)
    # Triton's interpreter keeps bf16 as uint16 and would multiply the raw bits as integers, so
    # there the dots see the same bf16 values widened to fp32 (bf16 products are exact in fp32).
    if UPCAST:
        q = q.to(tl.float32)
    # Keys past the block's last position are never read.
    end = tl.max(pos, axis=0) + 1
    lo, hi = 0, end
    if SPLIT:
        lo = tl.program_id(2) * split_len
        hi = tl.minimum(end, lo + split_len)
    k_ptrs = K + kv_head * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = V + kv_head * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]

    # A split may hold no key for some rows (positions before it): a finite start keeps their
    # exp2(m_i - m_new) and exp2(qk - m_new) at 1 and 0 instead of NaN from -inf - -inf.
    m_i = tl.full([BLOCK_M], -1.0e30 if SPLIT else float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if SPLIT:  # Part: acc [splits, heads, n, d], then m and l [2, splits, heads, n], all fp32
        total = tl.num_programs(2).to(tl.int64) * tl.num_programs(0) * n
        rec0 = (tl.program_id(2) * tl.num_programs(0) + head).to(tl.int64) * n + row0
        ml_ptrs = Part + total * HEAD_DIM + rec0 + offs_r
        # the neutral partial (m = -1e30, l = 0; acc = 0 below) of a split past the block's keys
        tl.store(ml_ptrs, m_i, mask=rows)
        tl.store(ml_ptrs + total, l_i, mask=rows)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        live = cols < hi
        k = tl.load(k_ptrs + start_n * stride_kn, mask=live[:, None], other=0.0)
        v = tl.load(v_ptrs + start_n * stride_vn, mask=live[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        # TF32 would round fp32 inputs to 10 mantissa bits; 16-bit inputs keep Triton's default
        # (exact products, fp32 accumulation) so their path is the usual flash-attention one.
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = qk * qk_scale
        # One masked path for every block: the where is cheap next to the two dots, and it also
        # hides the zero-filled keys past `end` in the last block (split_len is whole blocks).
        qk = tl.where(cols[None, :] <= pos[:, None], qk, float("-inf"))
        # Unsplit, every row sees key 0 in the first block, so m_new is finite from then on.
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # P @ V in the input dtype with fp32 accumulation, as in flash attention
        p = p.to(V.dtype.element_ty)
        if UPCAST:
            p = p.to(tl.float32)
        if IEEE:
            acc = tl.dot(p, v, acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p, v, acc * alpha[:, None])
        m_i = m_new
        # Stored in the last iteration, not after the loop: live past it, m_i and l_i made ptxas
        # spill hundreds of bytes (sm_90, fp32 at head_dim 128), for one uniform branch a block.
        if SPLIT and start_n + BLOCK_N >= hi:
            tl.store(ml_ptrs, m_i, mask=rows)
            tl.store(ml_ptrs + total, l_i, mask=rows)
    if SPLIT:
        tl.store(Part + rec0 * HEAD_DIM + offs_r[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=rows[:, None])
    else:
        out = acc / l_i[:, None]
        o_ptrs = Out + row0 * stride_om + offs_r[:, None] * stride_om + head * HEAD_DIM + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=rows[:, None])


def _combine_source(Part, Out, stride_om, n, splits,
                    HEAD_DIM: tl.constexpr, ROWS: tl.constexpr):  # pragma: no cover - runs in Triton
    # One program per (ROWS rows, head) merges its splits' partials: out = sum_s w_s acc_s /
    # sum_s w_s l_s, w_s = exp2(m_s - max m), with an online max. A run-time loop over the splits,
    # not one tile of them, so that their number (it grows with S) never compiles a new variant in
    # mid-request. Split 0 holds key 0, which every row sees: the running max is finite from then on.
    head = tl.program_id(1)
    offs_m = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m < n
    records = splits.to(tl.int64) * tl.num_programs(1) * n
    m_all = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_all = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    for s in range(0, splits):
        rec = (s * tl.num_programs(1) + head).to(tl.int64) * n + offs_m
        m_s = tl.load(Part + records * HEAD_DIM + rec, mask=rows, other=0.0)
        l_s = tl.load(Part + records * (HEAD_DIM + 1) + rec, mask=rows, other=1.0)  # no 0 / 0
        a_s = tl.load(Part + rec[:, None] * HEAD_DIM + offs_d[None, :], mask=rows[:, None], other=0.0)
        m_new = tl.maximum(m_all, m_s)
        alpha = tl.math.exp2(m_all - m_new)
        w = tl.math.exp2(m_s - m_new)
        l_all = l_all * alpha + l_s * w
        acc = acc * alpha[:, None] + a_s * w[:, None]
        m_all = m_new
    o_ptrs = Out + offs_m[:, None] * stride_om + head * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, (acc / l_all[:, None]).to(Out.dtype.element_ty), mask=rows[:, None])


def _kernel(interpreting: bool) -> Any:
    """The jitted (kernel, combine kernel), decorated on first use in the mode of Triton's library."""
    global tl
    import triton.language as tl

    if interpreting not in _kernels:
        # n and S change with every request: specialising on them (== 1, divisible by 16) would
        # only multiply the compiled variants.
        kernel = jit(_kernel_source, interpreting, do_not_specialize=["n", "S", "split_len"])
        _kernels[interpreting] = kernel, jit(_combine_source, interpreting, do_not_specialize=["n", "splits"])
    return _kernels[interpreting]


def _check_shapes(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> None:
    if q.dim() != 3 or keys.dim() != 3 or values.shape != keys.shape:
        raise ValueError(f"expected q [heads, n, d] and keys/values [kv_heads, S, d], got "
                         f"{tuple(q.shape)}, {tuple(keys.shape)}, {tuple(values.shape)}")
    heads, n, d = q.shape
    kv_heads, S, kd = keys.shape
    if kd != d or kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"q {tuple(q.shape)} does not fit keys/values {tuple(keys.shape)}: head sizes "
                         "must match and heads must be a multiple of kv_heads")
    if index.shape != (n,) or index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"index must be int64 [n={n}], got {index.dtype} {tuple(index.shape)}")
    if n and not S:
        raise ValueError(f"{n} queries but no keys: every query must see at least key 0")
    if keys.dtype != q.dtype or values.dtype != q.dtype:
        raise TypeError(f"q, keys and values must share one dtype, got {q.dtype}, {keys.dtype}, {values.dtype}")
    if len({q.device, keys.device, values.device, index.device}) != 1:
        raise ValueError(f"q, keys, values and index must be on one device, got {q.device}, {keys.device}, "
                         f"{values.device}, {index.device}")


def kernel_supports(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the kernel takes this head size and dtype (callers fall back to masked SDPA)."""
    return dtype in _DTYPES and not head_dim & (head_dim - 1) and _MIN_HEAD_DIM <= head_dim <= _MAX_HEAD_DIM


def _check_kernel_inputs(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
    d = q.shape[-1]
    if q.dtype not in _DTYPES:
        raise TypeError(f"sparse_query_attention supports {_DTYPES}, got {q.dtype}")
    if d & (d - 1) or not _MIN_HEAD_DIM <= d <= _MAX_HEAD_DIM:
        raise ValueError(f"head_dim {d} is not supported: it must be a power of two from "
                         f"{_MIN_HEAD_DIM} to {_MAX_HEAD_DIM}")
    if q.stride(-1) != 1 or keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("q, keys and values need a last stride of 1 (other strides are free)")


def sparse_query_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [heads, n, d] (any strides, last stride 1), keys/values [kv_heads, S, d] (any strides, last
    stride 1; they may be views into a larger cache buffer, e.g. buf[layer, 0, :, :S] of a [layers, 2,
    kv_heads, capacity, d] tensor), index [n] int64 on the same device, sorted ascending
    (non-decreasing; duplicates allowed): query i sits at sequence index index[i] and sees keys
    0..index[i] inclusive (causal). heads is a multiple of kv_heads; query head h uses kv head
    h // (heads // kv_heads) (repeat_kv / grouped-query order). Returns [n, heads * d], contiguous,
    in q's dtype (row i = the concatenation over heads of head h's output for query i), ready for
    the o_proj linear.

    One Triton launch (two when the keys are split, see `_splits`), no host read of any tensor
    value and no allocation but the output (and, split, an fp32 scratch for the partials), all
    sized by shapes alone, so it can be captured in a CUDA graph. Indices must lie in [0, S): one
    past it sees all S keys, a negative one gives NaN. Sorting only matters for speed (each query
    block reads keys up to its largest index). Needs CUDA tensors, or any tensors when
    `interpreter_active`."""
    _check_shapes(q, keys, values, index)
    _check_kernel_inputs(q, keys, values)
    interpreting = launch_mode("sparse_query_attention", q.device, "use reference_sparse_attention")
    kernel, combine = _kernel(interpreting)
    heads, n, d = q.shape
    kv_heads, S, _ = keys.shape
    out = torch.empty(n, heads * d, dtype=q.dtype, device=q.device)
    if n == 0:
        return out
    block_m, block_n, num_warps, num_stages = launch_config(d, q.dtype)
    blocks = -(-n // block_m)
    sms = _sm_count(q.device) if q.device.type == "cuda" else _PRETEND_SMS
    splits, split_len = _splits(heads * blocks, S, sms, block_n, _MIN_SPLIT_KEYS)
    # One scratch per call (the caching allocator: no sync); unsplit, the output stands in for it.
    part = out if splits == 1 else torch.empty(splits * heads * n * (d + 2), dtype=torch.float32, device=q.device)
    upcast = interpreting and q.dtype == torch.bfloat16
    with on_device(q.device):
        kernel[(heads, blocks, splits)](
            q, keys, values, index, out, part,
            q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
            out.stride(0), n, S, split_len, scale * math.log2(math.e),
            GROUP=heads // kv_heads, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n,
            IEEE=q.dtype == torch.float32 or upcast, UPCAST=upcast, SPLIT=splits > 1,
            num_warps=num_warps, num_stages=num_stages,
        )
        if splits > 1:
            combine[(-(-n // _COMBINE_ROWS), heads)](part, out, out.stride(0), n, splits, HEAD_DIM=d,
                                                     ROWS=_COMBINE_ROWS, num_warps=4)
    return out


def reference_sparse_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor, scale: float
) -> torch.Tensor:
    """`sparse_query_attention`'s contract in plain torch: masked
    `F.scaled_dot_product_attention` with ``enable_gqa`` (no repeated K/V), in q's dtype, on any
    device, without host reads. Its cost grows with all S keys for every query (no causal
    skipping), so it is the CPU path and the tests' oracle, not the fast path."""
    _check_shapes(q, keys, values, index)
    heads, n, d = q.shape
    mask = torch.arange(keys.shape[1], device=q.device)[None, :] <= index[:, None]
    out = F.scaled_dot_product_attention(
        q[None], keys[None], values[None], attn_mask=mask, scale=scale, enable_gqa=heads != keys.shape[0]
    )[0]
    return out.transpose(0, 1).reshape(n, heads * d)
