"""The raw codec round-trips exactly and refuses damaged bytes."""

from __future__ import annotations

import struct

import pytest
import torch

from chunkcache.codec import RawCodec, get_codec
from chunkcache.codec.base import FORMAT_VERSION, MAGIC
from chunkcache.errors import CorruptCacheError, InvalidInputError
from chunkcache.kv import ChunkKV


def _kv(dtype: torch.dtype = torch.float32, tokens: int = 5) -> ChunkKV:
    g = torch.Generator().manual_seed(0)
    return ChunkKV(
        kv=torch.randn(3, 2, 2, tokens, 8, generator=g).to(dtype),
        token_ids=tuple(range(100, 100 + tokens)),
        position_offset=17,
        model_fingerprint="m" * 64,
        prefix_fingerprint="p" * 64,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    kv = _kv(dtype)
    out = RawCodec().decode(RawCodec().encode(kv))
    assert out.kv.dtype == dtype
    assert torch.equal(out.kv.view(torch.uint8), kv.kv.contiguous().view(torch.uint8))
    assert (out.token_ids, out.position_offset) == (kv.token_ids, kv.position_offset)
    assert (out.model_fingerprint, out.prefix_fingerprint) == (kv.model_fingerprint, kv.prefix_fingerprint)


def test_every_flipped_byte_is_detected() -> None:
    data = RawCodec().encode(_kv(tokens=2))
    for i in range(0, len(data), max(1, len(data) // 97)):
        damaged = bytearray(data)
        damaged[i] ^= 0x40
        with pytest.raises(CorruptCacheError):
            RawCodec().decode(bytes(damaged))


@pytest.mark.parametrize("keep", [0, 5, 20, -1, -33])
def test_truncated_bytes_are_detected(keep: int) -> None:
    data = RawCodec().encode(_kv())
    with pytest.raises(CorruptCacheError):
        RawCodec().decode(data[:keep])


def test_unknown_version_names_the_versions() -> None:
    import hashlib

    data = RawCodec().encode(_kv())
    body = bytearray(data[:-32])
    struct.pack_into("<4sH", body, 0, MAGIC, FORMAT_VERSION + 1)
    resigned = bytes(body) + hashlib.blake2b(bytes(body), digest_size=32).digest()
    with pytest.raises(CorruptCacheError, match=f"format version {FORMAT_VERSION + 1}"):
        RawCodec().decode(resigned)


def test_unknown_codec_name_is_a_clear_error() -> None:
    with pytest.raises(InvalidInputError, match="unknown codec 'zip'"):
        get_codec("zip")
