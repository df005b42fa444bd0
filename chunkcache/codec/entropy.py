"""Entropy coding of quantised symbols with one distribution per channel (constriction's rANS).

The encoder counts each channel's symbols, stores the counts scaled into one byte per symbol
(zstd-compressed: most are zero), and codes every channel with its own categorical model. The
decoder rebuilds the same models from the same bytes, so both sides agree exactly."""

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


def encode_streams(streams: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[bytes, np.ndarray]:
    """rANS-code ``[(symbols [channels, n], table [channels, alphabet]), ...]`` into one word stream.

    Returns the tables (zstd) and the uint32 words."""
    coder = constriction.stream.stack.AnsCoder()
    # ANS is a stack: encode in reverse so that decoding runs forward.
    for symbols, table in reversed(streams):
        models = _models(table)
        for row in range(symbols.shape[0] - 1, -1, -1):
            coder.encode_reverse(np.ascontiguousarray(symbols[row], dtype=np.int32), models[row])
    tables = np.concatenate([t.reshape(-1) for _, t in streams]) if streams else np.zeros(0, np.uint8)
    return zstandard.ZstdCompressor(level=3).compress(tables.tobytes()), coder.get_compressed()


def decode_streams(
    tables_z: memoryview, words: memoryview, shapes: Sequence[tuple[int, int, int]]
) -> list[np.ndarray]:
    """Inverse of `encode_streams`; ``shapes`` lists (channels, n, alphabet) per stream."""
    sizes = [c * a for c, _, a in shapes]
    tables = frombuffer(zstd_decompress(tables_z, sum(sizes)), np.uint8, sum(sizes))
    stream = frombuffer(words, np.uint32, len(words) // 4) if len(words) % 4 == 0 else None
    if stream is None:
        raise CorruptCacheError("entropy-coded words are not a whole number of 32-bit words")
    try:
        coder = constriction.stream.stack.AnsCoder(stream.copy())
        out, start = [], 0
        for (channels, n, alphabet), size in zip(shapes, sizes):
            models = _models(tables[start : start + size].reshape(channels, alphabet))
            start += size
            symbols = np.empty((channels, n), dtype=np.int32)
            for row in range(channels):
                symbols[row] = coder.decode(models[row], n)
            out.append(symbols)
    except (ValueError, RuntimeError, OverflowError) as exc:
        raise CorruptCacheError(f"entropy-coded section cannot be decoded: {exc}") from None
    return out
