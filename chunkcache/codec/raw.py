"""`raw`: the KV tensors in their own dtype, zstd-compressed; lossless."""

from __future__ import annotations

from typing import Any

import torch
import zstandard

from chunkcache.codec.base import pack, unpack
from chunkcache.errors import CorruptCacheError
from chunkcache.kv import ChunkKV

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# numpy has no bfloat16: tensors travel as same-width integers and are viewed back.
_CARRIER = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


class RawCodec:
    name = "raw"

    def __init__(self, level: int = 3) -> None:
        self.level = level

    def encode(self, kv: ChunkKV) -> bytes:
        tensor = kv.kv.detach().to("cpu").contiguous()
        dtype_name = str(tensor.dtype).removeprefix("torch.")
        if tensor.dtype not in _CARRIER:
            raise ValueError(f"raw codec cannot store dtype {dtype_name}")
        raw = tensor.view(_CARRIER[tensor.dtype]).numpy().tobytes()
        header: dict[str, Any] = {
            "codec": self.name,
            "dtype": dtype_name,
            "shape": list(tensor.shape),
            "raw_bytes": len(raw),
            "token_ids": list(kv.token_ids),
            "position_offset": kv.position_offset,
            "model_fingerprint": kv.model_fingerprint,
            "prefix_fingerprint": kv.prefix_fingerprint,
        }
        return pack(header, zstandard.ZstdCompressor(level=self.level).compress(raw))

    def decode(self, data: bytes) -> ChunkKV:
        header, payload = unpack(data)
        try:
            if header["codec"] != self.name:
                raise CorruptCacheError(f"entry was written by codec {header['codec']!r}, not {self.name!r}")
            dtype = _DTYPES[header["dtype"]]
            shape = [int(s) for s in header["shape"]]
            raw = zstandard.ZstdDecompressor().decompress(bytes(payload), max_output_size=int(header["raw_bytes"]))
            if len(raw) != int(header["raw_bytes"]):
                raise CorruptCacheError("cache entry payload has the wrong size")
            tensor = torch.frombuffer(bytearray(raw), dtype=_CARRIER[dtype]).view(dtype).reshape(shape)
            return ChunkKV(
                kv=tensor,
                token_ids=tuple(int(t) for t in header["token_ids"]),
                position_offset=int(header["position_offset"]),
                model_fingerprint=str(header["model_fingerprint"]),
                prefix_fingerprint=str(header["prefix_fingerprint"]),
            )
        except CorruptCacheError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, zstandard.ZstdError) as exc:
            raise CorruptCacheError(f"cache entry cannot be decoded: {exc}") from None
