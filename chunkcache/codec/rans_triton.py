"""The GPU decoder of `rans` (container version 3): one Triton program per group of lanes.

A program holds its group's lanes as a vector and their cumulative tables as a [lanes, symbols]
block in registers; it loops over the tokens, finds every lane's symbol by counting the table
entries at or below its slot, and lets the lanes that run low read the group's next words in
lane order (a prefix sum says which word each one takes). Groups of several layers or entries
go in one launch: every group carries its own first lane, lane count, token count, first word
and output offset. No host read and no allocation but the output, so a caller may launch it on a
side stream and let compute wait on an event.

Bit-identical to the CPU decoders (integer arithmetic only). It does not re-check a stream the
way they do (a check would need a read back): the container's digest has been verified on the
host before any section gets here, and a forged stream can only decode to wrong symbols within
the output, never read or write outside the given tensors (loads are masked to the group's words)."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

from chunkcache.codec.rans import GROUP, LOW, PREC_BITS, TOTAL
from chunkcache.triton_jit import jit, launch_mode, on_device

_kernels: dict[bool, Any] = {}
# Layers decode in the codec's thread pool: launches go one at a time (the first compiles the
# kernel, and the interpreter patches triton.language while a kernel runs).
_LAUNCH = threading.Lock()
tl: Any = None  # triton.language once `_kernel` has imported it (the kernel's body needs the global)


def _decode_source(
    States, Cum, Words, Meta, Out, cum_stride,
    GROUP: tl.constexpr, WIDTH: tl.constexpr, LOW: tl.constexpr, PREC: tl.constexpr,
):  # pragma: no cover - its lines run inside Triton (compiled, or interpreted without coverage)
    g = tl.program_id(0).to(tl.int64)
    # Meta row per group: first lane, lanes, tokens, first word, words, first output element.
    lane0 = tl.load(Meta + g * 6)
    n_lanes = tl.load(Meta + g * 6 + 1)
    tokens = tl.load(Meta + g * 6 + 2)
    word = tl.load(Meta + g * 6 + 3)
    word_end = word + tl.load(Meta + g * 6 + 4)
    out0 = tl.load(Meta + g * 6 + 5)
    r = tl.arange(0, GROUP)
    live = r < n_lanes
    lane = lane0 + r
    k = tl.arange(0, WIDTH)
    row = Cum + lane[:, None] * cum_stride + k[None, :]
    # columns past a table (and dead lanes) read TOTAL: never chosen, zero width
    lo = tl.load(row, mask=live[:, None] & (k[None, :] < cum_stride), other=1 << PREC).to(tl.int64)
    hi = tl.load(row + 1, mask=live[:, None] & (k[None, :] + 1 < cum_stride), other=1 << PREC).to(tl.int64)
    x = tl.load(States + lane, mask=live, other=LOW).to(tl.int64) & 0xFFFFFFFF
    out = Out + out0 + r.to(tl.int64) * tokens
    for t in range(tokens):
        slot = x & ((1 << PREC) - 1)
        s = tl.sum((hi <= slot[:, None]).to(tl.int32), axis=1)
        pick = k[None, :] == s[:, None]
        start = tl.sum(tl.where(pick, lo, 0), axis=1)
        x = tl.sum(tl.where(pick, hi - lo, 0), axis=1) * (x >> PREC) + slot - start
        need = (x < LOW) & live
        n = need.to(tl.int32)
        at = word + (tl.cumsum(n, axis=0) - n)
        w = tl.load(Words + at, mask=need & (at < word_end), other=0).to(tl.int64) & 0xFFFF
        x = tl.where(need, (x << 16) | w, x)
        word += tl.sum(n, axis=0)
        tl.store(out + t, s.to(tl.uint8), mask=live)


def _kernel(interpreting: bool) -> Any:
    global tl
    import triton.language as tl

    if interpreting not in _kernels:
        _kernels[interpreting] = jit(_decode_source, interpreting, do_not_specialize=["cum_stride"])
    return _kernels[interpreting]


def group_meta(lanes: int, tokens: int, words_per_group: np.ndarray, first_lane: int = 0, first_word: int = 0,
               first_out: int = 0) -> np.ndarray:
    """Meta rows ``[groups, 6]`` (int64) of one coded block of ``lanes`` x ``tokens`` whose lanes,
    words and output start at the given offsets of the arrays a launch is given."""
    groups = len(words_per_group)
    g = np.arange(groups, dtype=np.int64)
    counts = words_per_group.astype(np.int64)
    meta = np.empty((groups, 6), dtype=np.int64)
    meta[:, 0] = first_lane + g * GROUP
    meta[:, 1] = np.minimum(GROUP, lanes - g * GROUP)
    meta[:, 2] = tokens
    meta[:, 3] = first_word + np.cumsum(counts) - counts
    meta[:, 4] = counts
    meta[:, 5] = first_out + g * GROUP * tokens
    return meta


def decode_groups(states: torch.Tensor, cum: torch.Tensor, words: torch.Tensor, meta: torch.Tensor,
                  out: torch.Tensor) -> torch.Tensor:
    """Decode every group of ``meta`` (`group_meta` rows, int64, on the device) into ``out``
    (uint8, flat): states uint32 viewed as int32 [lanes], cum int32 [lanes, symbols + 1], words
    uint16 viewed as int16. All on one CUDA device (or any device under Triton's interpreter)."""
    interpreting = launch_mode("the Triton rANS decoder", out.device, "decode with chunkcache.codec.rans.decode")
    groups = meta.shape[0]
    if groups == 0:
        return out
    width = max(2, 1 << (cum.shape[1] - 2).bit_length())  # symbols, rounded up to a power of two
    with _LAUNCH, on_device(out.device):
        _kernel(interpreting)[(groups,)](states, cum, words, meta, out, cum.shape[1], GROUP=GROUP, WIDTH=width,
                                         LOW=LOW, PREC=PREC_BITS, num_warps=1)
    return out


__all__ = ["TOTAL", "decode_groups", "group_meta"]
