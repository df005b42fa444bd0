"""`int8`: symmetric 8-bit quantisation (keys per channel, values per token), then zstd.

Keys have a few large-magnitude channels, so each (head, channel) gets its own scale over the
chunk's tokens; values vary per token, so each (head, token) gets one. Every element is off by at
most half its scale (scale = absmax / 127)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import zstandard

from chunkcache.codec.base import Entry, HostParts, LayeredCodec, frombuffer, join_parts, split_parts
from chunkcache.codec.raw import zstd_decompress

_TINY = 1e-12


def int8_quantize(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes and float32 scales, one scale per slice along ``dim``."""
    x = x.float()
    scale = (x.abs().amax(dim=dim, keepdim=True) / 127.0).clamp_min(_TINY)
    return torch.round(x / scale).to(torch.int8), scale


class Int8Codec(LayeredCodec):
    name = "int8"

    def __init__(self, level: int = 3) -> None:
        self.level = level
        self.spec = "int8"

    def encode_layer(self, layer: torch.Tensor, index: int, params: dict[str, Any]) -> bytes:
        kq, ks = int8_quantize(layer[0], dim=1)  # [heads, tokens, dim]: per (head, channel)
        vq, vs = int8_quantize(layer[1], dim=2)  # per (head, token)
        codes = np.concatenate([kq.numpy().reshape(-1), vq.numpy().reshape(-1)])
        packed = zstandard.ZstdCompressor(level=self.level).compress(codes.tobytes())
        return join_parts([packed, ks.numpy(), vs.numpy()])

    def unpack_layer(self, entry: Entry, index: int) -> HostParts:
        _, heads, tokens, dim = entry.layer_shape
        n = heads * tokens * dim
        packed, ks, vs = split_parts(entry.sections[index], 3)
        return {"codes": frombuffer(zstd_decompress(packed, 2 * n), np.int8, 2 * n),
                "k_scale": frombuffer(ks, np.float32, heads * dim), "v_scale": frombuffer(vs, np.float32, heads * tokens)}

    def dequantize_layer(self, entry: Entry, index: int, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        _, heads, tokens, dim = entry.layer_shape
        codes = parts["codes"].view(2, heads, tokens, dim).float()
        return torch.stack([codes[0] * parts["k_scale"].view(heads, 1, dim),
                            codes[1] * parts["v_scale"].view(heads, tokens, 1)])
