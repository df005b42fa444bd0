"""`kivi2`: KIVI-style asymmetric 2-bit quantisation, 4 codes per byte.

Keys are quantised per channel over groups of ``group`` tokens, values per token over groups of
``group`` channels (KIVI, Liu et al. 2024): each group keeps a bfloat16 minimum and step, and every
element is off by at most half its group's step ((max - min) / 3)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from chunkcache.codec.base import Entry, HostParts, LayeredCodec, bf16_bits, frombuffer, join_parts, split_parts
from chunkcache.errors import CorruptCacheError, InvalidInputError

_LEVELS = 3  # 2 bits: codes 0..3


def pack2(codes: torch.Tensor) -> np.ndarray:
    """uint8 codes in 0..3 -> 4 per byte (zero-padded to a multiple of 4)."""
    flat = codes.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 4
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    q = flat.view(-1, 4)
    return (q[:, 0] | (q[:, 1] << 2) | (q[:, 2] << 4) | (q[:, 3] << 6)).numpy()


def unpack2(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of `pack2` on ``packed``'s device: ``count`` codes."""
    b = packed
    q = torch.stack([b & 3, (b >> 2) & 3, (b >> 4) & 3, (b >> 6) & 3], dim=1).reshape(-1)
    return q[:count]


def _groups(x: torch.Tensor, group: int) -> tuple[torch.Tensor, int]:
    """Pad the last axis to a multiple of ``group`` by repeating its last value; view as groups."""
    n = x.shape[-1]
    pad = (-n) % group
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    return x.reshape(*x.shape[:-1], -1, group), n


def quantize_groups(x: torch.Tensor, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """2-bit codes of ``x`` in groups along its last axis; bfloat16 minimum and step per group."""
    g, _ = _groups(x.float(), group)
    lo_bits = bf16_bits(g.amin(dim=-1, keepdim=True), round_down=True)
    lo = torch.from_numpy(lo_bits).view(torch.bfloat16).float()
    step_bits = bf16_bits((g.amax(dim=-1, keepdim=True) - lo) / _LEVELS, round_up=True)
    step = torch.from_numpy(step_bits).view(torch.bfloat16).float()
    codes = torch.round((g - lo) / step.clamp_min(1e-30)).clamp_(0, _LEVELS)
    return pack2(codes), lo_bits, step_bits


def _group_parts(prefix: str, packed: memoryview, lo: memoryview, step: memoryview, lead: tuple[int, ...], n: int,
                 group: int) -> dict[str, np.ndarray]:
    count = int(np.prod(lead)) * -(-n // group) * group
    return {f"{prefix}codes": frombuffer(packed, np.uint8, -(-count // 4)),
            f"{prefix}lo": frombuffer(lo, np.int16, count // group), f"{prefix}step": frombuffer(step, np.int16, count // group)}


def dequantize_groups(parts: dict[str, torch.Tensor], prefix: str, lead: tuple[int, ...], n: int,
                      group: int) -> torch.Tensor:
    """Values of groups unpacked by `_group_parts`, on the device their tensors are on."""
    groups = -(-n // group)
    count = int(np.prod(lead)) * groups * group
    codes = unpack2(parts[f"{prefix}codes"], count).view(*lead, groups, group).float()
    lo_t = parts[f"{prefix}lo"].view(torch.bfloat16).float().view(*lead, groups, 1)
    st_t = parts[f"{prefix}step"].view(torch.bfloat16).float().view(*lead, groups, 1)
    return (codes * st_t + lo_t).reshape(*lead, groups * group)[..., :n]


class Kivi2Codec(LayeredCodec):
    name = "kivi2"

    def __init__(self, level: int = 3, group: int = 32) -> None:
        if group < 1:
            raise InvalidInputError(f"kivi2 group must be >= 1, got {group}")
        self.group = group
        self.spec = "kivi2" if group == 32 else f"kivi2:group={group}"

    def params(self, num_layers: int) -> dict[str, Any]:
        return {"group": self.group}

    def encode_layer(self, layer: torch.Tensor, index: int, params: dict[str, Any]) -> bytes:
        group = int(params["group"])
        keys = layer[0].transpose(1, 2)  # [heads, dim, tokens]: groups of tokens per channel
        kp, klo, kst = quantize_groups(keys, group)
        vp, vlo, vst = quantize_groups(layer[1], group)  # groups of channels per token
        return join_parts([kp, klo, kst, vp, vlo, vst])

    def unpack_layer(self, entry: Entry, index: int) -> HostParts:
        group = int(entry.header["params"]["group"])
        if group < 1:
            raise CorruptCacheError(f"cache entry has kivi2 group {group}")
        _, heads, tokens, dim = entry.layer_shape
        kp, klo, kst, vp, vlo, vst = split_parts(entry.sections[index], 6)
        return {**_group_parts("k", kp, klo, kst, (heads, dim), tokens, group),
                **_group_parts("v", vp, vlo, vst, (heads, tokens), dim, group)}

    def dequantize_layer(self, entry: Entry, index: int, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        group = int(entry.header["params"]["group"])
        _, heads, tokens, dim = entry.layer_shape
        keys = dequantize_groups(parts, "k", (heads, dim), tokens, group).transpose(1, 2)
        values = dequantize_groups(parts, "v", (heads, tokens), dim, group)
        return torch.stack([keys, values])
