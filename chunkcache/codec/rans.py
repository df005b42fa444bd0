"""Interleaved rANS over many lanes: the entropy coder of container version 3.

Every lane is one (kind, channel) of a layer and codes that channel's symbols over all tokens
with its own static distribution. Lanes are interleaved in groups of `GROUP`: a group's lanes
decode in lock step, one token at a time, and those whose state runs low read the next 16-bit
word of the group's shared stream in lane order. So a group is one independent job (a program
on the GPU; on the CPU a layer's groups run one after the other in one compiled call, and the
layers of an entry in parallel threads) and every lane of it is a SIMD lane; the only per-lane
cost in the bitstream is its 32-bit final state.

- states live in ``[LOW, LOW << 16)``; 16-bit words, at most one read per symbol;
- probabilities in ``PREC_BITS`` fixed point, derived from the stored uint8 counts by integer
  arithmetic every decoder repeats exactly (`freq_table`);
- a lane's state after its last symbol is `LOW` again, and a group consumes exactly its words:
  a forged section that passes the digest still cannot decode into garbage unnoticed.

Three implementations give identical output: numba-compiled loops (the CPU's fast path, which
releases the GIL; compiled on first use), numpy lock-step code (the reference, and the
fallback where numba is not installed, e.g. the GPU image) and the Triton kernel of
`rans_triton` (the GPU's)."""

from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np

from chunkcache.errors import CorruptCacheError

PREC_BITS = 12
TOTAL = 1 << PREC_BITS
LOW = 1 << 16
GROUP = 32
_EMIT_SHIFT = 16 + 16 - PREC_BITS  # a lane emits a word when x >= f << _EMIT_SHIFT



@functools.cache
def compiled() -> tuple[Callable[..., Any], ...] | None:
    """The numba-compiled (encode, decode, dequantize) loops, compiled on first use (and cached
    on disk by numba), or None without numba: the numpy reference then serves (same output)."""
    try:
        import numba
    except ImportError:  # the GPU image: no numba there
        return None
    jit = numba.njit(nogil=True, cache=True)
    return jit(_encode_loops), jit(_decode_loops), jit(_dequantize_loops)


def freq_table(counts: np.ndarray) -> np.ndarray:
    """Cumulative frequencies ``[lanes, alphabet + 1]`` (int32, last column `TOTAL`) from uint8
    counts ``[lanes, alphabet]``: every counted symbol keeps at least 1 / TOTAL, the rounding
    remainder goes to the most frequent symbol, and an empty lane is all symbol 0."""
    c = counts.astype(np.int64)
    total = c.sum(axis=1, keepdims=True)
    f = np.where(c > 0, np.maximum((c * TOTAL) // np.maximum(total, 1), 1), 0)
    top = c.argmax(axis=1)
    f[np.arange(len(f)), top] += TOTAL - f.sum(axis=1)
    cum = np.zeros((len(f), c.shape[1] + 1), dtype=np.int32)
    np.cumsum(f, axis=1, out=cum[:, 1:])
    return cum


def groups_of(lanes: int) -> int:
    return -(-lanes // GROUP)


def encode(symbols: np.ndarray, cum: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Code ``symbols [lanes, tokens]`` (int32, each < its lane's alphabet, every one counted in
    its table) with tables ``cum`` (`freq_table`). Returns (final states uint32 [lanes],
    words per group uint32 [groups], words uint16)."""
    symbols = np.ascontiguousarray(symbols, dtype=np.int32)
    cum = np.ascontiguousarray(cum, dtype=np.int32)
    fast = compiled()
    return fast[0](symbols, cum) if fast else _encode_np(symbols, cum)


def decode(states: np.ndarray, counts: np.ndarray, words: np.ndarray, cum: np.ndarray, tokens: int) -> np.ndarray:
    """Inverse of `encode`: symbols ``[lanes, tokens]`` (uint8: alphabets fit a byte, as the
    lookup tables do); a stream that does not decode exactly raises `CorruptCacheError`."""
    lanes = len(states)
    if cum.shape[0] != lanes or len(counts) != groups_of(lanes) or int(counts.sum(dtype=np.int64)) != len(words):
        raise CorruptCacheError("entropy-coded section's lanes, groups and words do not agree")
    if lanes and (states < LOW).any():
        raise CorruptCacheError("entropy-coded section has a lane state out of range")
    fast = compiled()
    if fast:
        # token-major underneath: a lock step writes its lanes' symbols side by side, and the
        # dequantisation reads a token's channels in a row
        out = np.empty((tokens, lanes), dtype=np.uint8).T
        bad = fast[1](states.astype(np.int64), counts.astype(np.int64), words, cum, out)
    else:
        out, bad = _decode_np(states, counts, words, cum, tokens)
    if bad >= 0:
        raise CorruptCacheError(f"entropy-coded group {bad} does not decode to its words exactly")
    return out


def dequantize(symbols: np.ndarray, steps: tuple[int, int], scale: np.ndarray, heads: int) -> np.ndarray:
    """CacheGen's per-token dequantisation of decoded lanes, straight into the cache layout:
    ``symbols [2 x channels, tokens]`` (K's channels, then V's), ``scale [2, tokens]`` float32
    -> float32 ``[2, heads, tokens, head_dim]`` with ``(s - m) * (scale / m)`` in float32, the same
    operations the torch path runs (so both give the same bits)."""
    lanes, tokens = symbols.shape
    out = np.empty((2, heads, tokens, lanes // 2 // heads), dtype=np.float32)
    fast = compiled()
    if fast:
        fast[2](symbols, np.array(steps, dtype=np.float32), scale.astype(np.float32), out)
        return out
    step = scale.astype(np.float32) / np.array(steps, dtype=np.float32)[:, None]
    for kind in (0, 1):
        x = (symbols[kind * lanes // 2 : (kind + 1) * lanes // 2].astype(np.float32) - np.float32(steps[kind]))
        out[kind] = (x * step[kind][None, :]).reshape(heads, -1, tokens).transpose(0, 2, 1)
    return out


def _padded(cum: np.ndarray, lanes: int) -> np.ndarray:
    # identity lanes (symbol 0 with probability 1 never moves the state) round a layer's lanes
    # up to whole groups, so the reference can work on [groups, GROUP] arrays
    pad = np.zeros((groups_of(lanes) * GROUP - lanes, cum.shape[1]), dtype=np.int32)
    pad[:, 1:] = TOTAL
    return np.concatenate([cum, pad])


def _encode_np(symbols: np.ndarray, cum: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lanes, tokens = symbols.shape
    groups = groups_of(lanes)
    table = _padded(cum, lanes).astype(np.int64)
    sym = np.zeros((groups * GROUP, tokens), dtype=np.int64)
    sym[:lanes] = symbols
    x = np.full(groups * GROUP, LOW, dtype=np.int64)
    rows = np.arange(groups * GROUP)
    emitted: list[tuple[np.ndarray, np.ndarray]] = []  # (lane, word) per token, tokens descending
    for t in range(tokens - 1, -1, -1):
        start = table[rows, sym[:, t]]
        f = table[rows, sym[:, t] + 1] - start
        out = x >= (f << _EMIT_SHIFT)
        emitted.append((np.flatnonzero(out), (x[out] & 0xFFFF)))
        x = np.where(out, x >> 16, x)
        x = ((x // f) << PREC_BITS) + (x % f) + start
    # the decoder reads a group's words by token, then lane, ascending: the reverse of pushing
    lane = np.concatenate([e[0] for e in reversed(emitted)]) if emitted else np.zeros(0, np.int64)
    word = np.concatenate([e[1] for e in reversed(emitted)]) if emitted else np.zeros(0, np.int64)
    order = np.argsort(lane // GROUP, kind="stable")
    counts = np.bincount(lane // GROUP, minlength=groups).astype(np.uint32)
    return x[:lanes].astype(np.uint32), counts, word[order].astype(np.uint16)


def _decode_np(states: np.ndarray, counts: np.ndarray, words: np.ndarray, cum: np.ndarray,
               tokens: int) -> tuple[np.ndarray, int]:
    lanes = len(states)
    groups = groups_of(lanes)
    table = _padded(cum, lanes).astype(np.int64)
    x = np.full(groups * GROUP, LOW, dtype=np.int64)
    x[:lanes] = states
    ends = np.cumsum(counts.astype(np.int64))
    pos = ends - counts.astype(np.int64)
    stream = np.concatenate([words.astype(np.int64), [0]])
    rows = np.arange(groups * GROUP)
    out = np.empty((groups * GROUP, tokens), dtype=np.uint8)
    for t in range(tokens):
        slot = x & (TOTAL - 1)
        s = (table[:, 1:] <= slot[:, None]).sum(axis=1)
        start = table[rows, s]
        x = (table[rows, s + 1] - start) * (x >> PREC_BITS) + slot - start
        need = (x < LOW).reshape(groups, GROUP)
        at = (pos[:, None] + np.cumsum(need, axis=1) - need).reshape(-1)
        pos = pos + need.sum(axis=1)
        at = np.minimum(at, len(words))  # past the end reads 0; the group is reported below
        x = np.where(need.reshape(-1), (x << 16) | stream[at], x)
        out[:, t] = s
    wrong = (pos != ends) | (x != LOW).reshape(groups, GROUP).any(axis=1)
    return out[:lanes], int(np.flatnonzero(wrong)[0]) if wrong.any() else -1


# The loops numba compiles (`compiled`): plain Python, far too slow to run uncompiled.
def _encode_loops(symbols: np.ndarray, cum: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lanes, tokens = symbols.shape
    groups = (lanes + GROUP - 1) // GROUP
    words = np.empty(lanes * tokens + 1, dtype=np.uint16)
    counts = np.zeros(groups, dtype=np.uint32)
    states = np.empty(lanes, dtype=np.uint32)
    x = np.empty(GROUP, dtype=np.int64)
    pos = 0
    for g in range(groups):
        first, last = g * GROUP, min(lanes, (g + 1) * GROUP)
        begin = pos
        x[:] = LOW
        for t in range(tokens - 1, -1, -1):
            for lane in range(last - 1, first - 1, -1):
                s = symbols[lane, t]
                start = np.int64(cum[lane, s])
                f = np.int64(cum[lane, s + 1]) - start
                v = x[lane - first]
                if v >= (f << _EMIT_SHIFT):
                    words[pos] = v & 0xFFFF
                    pos += 1
                    v >>= 16
                x[lane - first] = ((v // f) << PREC_BITS) + (v % f) + start
        words[begin:pos] = words[begin:pos][::-1].copy()
        counts[g] = pos - begin
        for lane in range(first, last):
            states[lane] = x[lane - first]
    return states, counts, words[:pos].copy()

def _decode_loops(states: np.ndarray, counts: np.ndarray, words: np.ndarray, cum: np.ndarray,
               out: np.ndarray) -> int:
    lanes, tokens = out.shape
    alphabet = cum.shape[1] - 1
    groups = (lanes + GROUP - 1) // GROUP
    x = np.empty(GROUP, dtype=np.int64)
    # each lane's symbol of every slot: a load instead of a search (filling it costs about a
    # tenth of decoding a 500-token lane, and it stays in L2)
    lut = np.empty((GROUP, TOTAL), dtype=np.uint8)
    last_word = max(len(words) - 1, 0)
    if len(words) == 0:
        words = np.zeros(1, dtype=words.dtype)
    pos = 0
    for g in range(groups):
        first, last = g * GROUP, min(lanes, (g + 1) * GROUP)
        end = pos + counts[g]
        for lane in range(first, last):
            x[lane - first] = states[lane]
            for s in range(alphabet):
                lut[lane - first, cum[lane, s] : cum[lane, s + 1]] = s
        for t in range(tokens):
            for lane in range(first, last):
                v = x[lane - first]
                slot = v & (TOTAL - 1)
                s = lut[lane - first, slot]
                start = np.int64(cum[lane, s])
                v = (np.int64(cum[lane, s + 1]) - start) * (v >> PREC_BITS) + slot - start
                need = v < LOW
                w = np.int64(words[min(pos, last_word)]) & 0xFFFF
                v = (v << 16) | w if need else v
                pos += need
                x[lane - first] = v
                out[lane, t] = s
        if pos != end:
            return g
        for lane in range(first, last):
            if x[lane - first] != LOW:
                return g
    return -1

def _dequantize_loops(symbols: np.ndarray, steps: np.ndarray, scale: np.ndarray, out: np.ndarray) -> None:
    _, heads, tokens, dim = out.shape
    for kind in range(2):
        m = steps[kind]
        for t in range(tokens):
            step = scale[kind, t] / m
            for h in range(heads):
                for d in range(dim):
                    out[kind, h, t, d] = (np.float32(symbols[kind * heads * dim + h * dim + d, t]) - m) * step
