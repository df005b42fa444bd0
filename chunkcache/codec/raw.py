"""`raw`: the KV tensors in their own dtype, zstd-compressed per layer; lossless."""

from __future__ import annotations

from typing import Any

import torch
import zstandard

from chunkcache.codec.base import DTYPES, CacheMismatchError, Entry, LayeredCodec, legacy_header
from chunkcache.errors import CorruptCacheError
from chunkcache.kv import ChunkKV

# numpy has no bfloat16: tensors travel as same-width integers and are viewed back.
_CARRIER = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def zstd_decompress(buf: memoryview | bytes, size: int) -> bytes:
    """Decompress exactly ``size`` bytes; anything else is a corrupt entry."""
    try:
        raw = zstandard.ZstdDecompressor().decompress(bytes(buf), max_output_size=size)
    except zstandard.ZstdError as exc:
        raise CorruptCacheError(f"cache entry payload does not decompress: {exc}") from None
    if len(raw) != size:
        raise CorruptCacheError("cache entry payload has the wrong size")
    return raw


class RawCodec(LayeredCodec):
    name = "raw"

    def __init__(self, level: int = 3) -> None:
        self.level = level
        self.spec = "raw"

    def encode_layer(self, layer: torch.Tensor, index: int, params: dict[str, Any]) -> bytes:
        raw = layer.contiguous().view(_CARRIER[layer.dtype]).numpy().tobytes()
        return zstandard.ZstdCompressor(level=self.level).compress(raw)

    def decode_layer(self, entry: Entry, index: int, device: torch.device) -> torch.Tensor:
        dtype = entry.dtype
        shape = entry.layer_shape
        size = shape[0] * shape[1] * shape[2] * shape[3] * torch.empty((), dtype=dtype).element_size()
        raw = zstd_decompress(entry.sections[index], size)
        return torch.frombuffer(bytearray(raw), dtype=_CARRIER[dtype]).view(dtype).reshape(shape).to(device)


def decode_legacy(data: bytes, model_fingerprint: str | None = None) -> ChunkKV:
    """Read a version-1 entry (raw codec, one zstd'd tensor) so stores written before the
    layered format keep their caches."""
    header, payload = legacy_header(data)
    try:
        if header["codec"] != "raw":
            raise CorruptCacheError(f"version-1 entry names codec {header['codec']!r}; only raw existed")
        if model_fingerprint is not None and header["model_fingerprint"] != model_fingerprint:
            raise CacheMismatchError("cache entry belongs to another model; it cannot be used with this one")
        dtype = DTYPES[header["dtype"]]
        raw = zstd_decompress(payload, int(header["raw_bytes"]))
        tensor = torch.frombuffer(bytearray(raw), dtype=_CARRIER[dtype]).view(dtype)
        return ChunkKV(
            kv=tensor.reshape([int(s) for s in header["shape"]]),
            token_ids=tuple(int(t) for t in header["token_ids"]),
            position_offset=int(header["position_offset"]),
            model_fingerprint=str(header["model_fingerprint"]),
            prefix_fingerprint=str(header["prefix_fingerprint"]),
        )
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        if isinstance(exc, CorruptCacheError):
            raise
        raise CorruptCacheError(f"version-1 cache entry cannot be decoded: {exc}") from None
