"""Per-channel symbol tables of the entropy coder, and container version 2's decoder.

The encoder counts each channel's symbols and stores the counts scaled into one byte per symbol
(zstd-compressed: most are zero); every decoder rebuilds the same distributions from the same
bytes, so both sides agree exactly. Version 3 codes with them through `rans` (lanes decoded in
parallel); version 2 coded every channel of a layer in turn through constriction's rANS, and
`decode_streams` still reads those entries."""

from __future__ import annotations

from typing import Sequence

import constriction
import numpy as np
import zstandard

from chunkcache.codec.base import frombuffer
from chunkcache.codec.raw import zstd_decompress
from chunkcache.errors import CorruptCacheError


def channel_tables(symbols: np.ndarray, alphabet: int) -> np.ndarray:
    """Per-row symbol counts of ``symbols [channels, n]``, scaled to uint8 (a seen symbol >= 1)."""
    channels = symbols.shape[0]
    flat = symbols + (np.arange(channels, dtype=np.int64)[:, None] * alphabet)
    counts = np.bincount(flat.reshape(-1), minlength=channels * alphabet).reshape(channels, alphabet)
    top = np.maximum(counts.max(axis=1, keepdims=True), 1)
    return np.where(counts > 0, np.maximum(np.rint(counts * 255.0 / top), 1), 0).astype(np.uint8)


def _models(table: np.ndarray) -> list[constriction.stream.model.Categorical]:
    # A symbol the table calls impossible still gets constriction's smallest probability, so a
    # row of zeros (an empty channel) stays a valid model.
    probs = table.astype(np.float64) + 1e-9
    return [constriction.stream.model.Categorical(row, perfect=False) for row in probs]


def pack_tables(tables: Sequence[np.ndarray]) -> bytes:
    """The uint8 count tables of a layer's streams, concatenated and zstd-compressed."""
    flat = np.concatenate([t.reshape(-1) for t in tables]) if tables else np.zeros(0, np.uint8)
    return zstandard.ZstdCompressor(level=3).compress(flat.tobytes())


def read_tables(tables_z: memoryview, shapes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Inverse of `pack_tables`; ``shapes`` lists (channels, alphabet) per stream."""
    sizes = [c * a for c, a in shapes]
    flat = frombuffer(zstd_decompress(tables_z, sum(sizes)), np.uint8, sum(sizes))
    starts = np.cumsum([0, *sizes])
    return [flat[a:b].reshape(shape) for a, b, shape in zip(starts, starts[1:], shapes)]


def decode_streams(
    tables_z: memoryview, words: memoryview, shapes: Sequence[tuple[int, int, int]]
) -> list[np.ndarray]:
    """Container version 2's streams: constriction's rANS over every channel of a layer in turn,
    one word stream; ``shapes`` lists (channels, n, alphabet) per stream. (Version 3 codes lanes
    that decode in parallel: `rans`.)"""
    tables = read_tables(tables_z, [(c, a) for c, _, a in shapes])
    stream = frombuffer(words, np.uint32, len(words) // 4) if len(words) % 4 == 0 else None
    if stream is None:
        raise CorruptCacheError("entropy-coded words are not a whole number of 32-bit words")
    try:
        coder = constriction.stream.stack.AnsCoder(stream.copy())
        out = []
        for (channels, n, alphabet), table in zip(shapes, tables):
            models = _models(table)
            symbols = np.empty((channels, n), dtype=np.int32)
            for row in range(channels):
                symbols[row] = coder.decode(models[row], n)
            out.append(symbols)
    except (ValueError, RuntimeError, OverflowError) as exc:
        raise CorruptCacheError(f"entropy-coded section cannot be decoded: {exc}") from None
    return out
