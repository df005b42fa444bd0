"""`cachegen`: CacheGen's encoder (Liu et al., SIGCOMM'24) on the CPU.

Per layer, K and V are viewed as ``[tokens, channels]`` (channels = kv heads x head dim):

- per-token scaling: each token's values are divided by their largest magnitude and rounded to
  ``bins // 2 - 1`` steps either side of zero, so every element is off by at most half a step;
- layer-dependent bins: the released config gives keys 32 bins in the first 10/32 of the
  layers and 16 after, values 32 bins in the first 2/32 and 16 after; the fractions are
  applied to the model's own layer count, and ``level`` scales the bins (1: x1/2, 2: x5/8,
  3: x1, the released config);
- optional delta coding (the paper's token-wise locality): each group of ``group`` tokens has
  an anchor token stored in int8, and the other tokens are coded as their difference from it;
- entropy coding with one symbol distribution per (layer, channel) (`entropy`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from chunkcache.codec.base import Entry, LayeredCodec, bf16_bits, from_bf16_bits, frombuffer, join_parts, split_parts
from chunkcache.codec.entropy import channel_tables, decode_streams, encode_streams
from chunkcache.errors import CorruptCacheError, InvalidInputError

LEVEL_SCALE = {1: 0.5, 2: 0.625, 3: 1.0}
# CacheGen's released config for 32-layer models, as fractions of depth: (upper bound, bins).
_KEY_BINS = ((10 / 32, 32), (1.0, 16))
_VALUE_BINS = ((2 / 32, 32), (1.0, 16))


def layer_bins(num_layers: int, level: int) -> tuple[list[int], list[int]]:
    """Bins per layer for keys and values at a quality level."""
    if level not in LEVEL_SCALE:
        raise InvalidInputError(f"cachegen level must be 1, 2 or 3, got {level}")

    def bins(table: tuple[tuple[float, int], ...], layer: int) -> int:
        depth = layer / num_layers
        base = next(b for upper, b in table if depth < upper or upper == 1.0)
        return max(4, int(round(base * LEVEL_SCALE[level])))

    return [bins(_KEY_BINS, i) for i in range(num_layers)], [bins(_VALUE_BINS, i) for i in range(num_layers)]


def _anchor_rows(tokens: int, group: int) -> torch.Tensor:
    rows = torch.zeros(tokens, dtype=torch.bool)
    if group > 0:
        rows[::group] = True
    return rows


def _quantize(x: torch.Tensor, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-token symbols in [0, 2m] (m = bins // 2 - 1) of ``x [tokens, channels]``; bf16 scales."""
    steps = bins // 2 - 1
    scale_bits = bf16_bits(x.abs().amax(dim=1), round_up=True)
    scale = torch.from_numpy(scale_bits).view(torch.bfloat16).float().clamp_min(1e-30)
    q = torch.round(x / scale[:, None] * steps).clamp_(-steps, steps) + steps
    return q.to(torch.int32).numpy(), scale_bits


class CacheGenCodec(LayeredCodec):
    name = "cachegen"

    def __init__(self, level: int = 2, delta: bool = False, group: int = 10) -> None:
        if level not in LEVEL_SCALE:
            raise InvalidInputError(f"cachegen level must be 1, 2 or 3, got {level}")
        if delta and group < 2:
            raise InvalidInputError(f"cachegen delta group must be >= 2, got {group}")
        self.level, self.delta, self.group = level, delta, group
        self.spec = f"cachegen-{level}" + (f":delta=1:group={group}" if delta else "")

    def params(self, num_layers: int) -> dict[str, Any]:
        keys, values = layer_bins(num_layers, self.level)
        return {"level": self.level, "bins_k": keys, "bins_v": values, "group": self.group if self.delta else 0}

    def encode_layer(self, layer: torch.Tensor, index: int, params: dict[str, Any]) -> bytes:
        group = int(params["group"])
        parts: list[bytes | np.ndarray] = []
        streams = []
        for kind, bins in ((0, params["bins_k"][index]), (1, params["bins_v"][index])):
            x = layer[kind].float().permute(1, 0, 2).reshape(layer.shape[2], -1)  # [tokens, channels]
            anchors = _anchor_rows(x.shape[0], group)
            if group:
                a = x[anchors]
                a_scale = bf16_bits(a.abs().amax(dim=1) / 127.0, round_up=True)
                a_step = torch.from_numpy(a_scale).view(torch.bfloat16).float().clamp_min(1e-30)[:, None]
                a_codes = torch.round(a / a_step).clamp_(-127, 127)
                base = (a_codes * a_step).repeat_interleave(group, dim=0)[: x.shape[0]]
                x = (x - base)[~anchors]
                parts += [a_codes.to(torch.int8).numpy(), a_scale]
            symbols, scales = _quantize(x, int(bins))
            parts.append(scales)
            streams.append((np.ascontiguousarray(symbols.T), channel_tables(symbols.T, int(bins) - 1)))
        tables, words = encode_streams(streams)
        return join_parts([tables, words, *parts])

    def decode_layer(self, entry: Entry, index: int, device: torch.device) -> torch.Tensor:
        params = entry.header["params"]
        group = int(params["group"])
        _, heads, tokens, dim = entry.layer_shape
        channels = heads * dim
        anchors = _anchor_rows(tokens, group)
        n_anchor = int(anchors.sum())
        coded = tokens - n_anchor
        bins = [int(params["bins_k"][index]), int(params["bins_v"][index])]
        if min(bins) < 4:
            raise CorruptCacheError(f"cache entry has cachegen bins {bins}")
        per_tensor = 3 if group else 1
        parts = split_parts(entry.sections[index], 2 + 2 * per_tensor)
        streams = decode_streams(parts[0], parts[1], [(channels, coded, b - 1) for b in bins])
        out = []
        for kind in (0, 1):
            own = parts[2 + kind * per_tensor : 2 + (kind + 1) * per_tensor]
            steps = bins[kind] // 2 - 1
            scale = from_bf16_bits(own[-1], coded).to(device)
            symbols = torch.from_numpy(streams[kind]).to(device)  # [channels, tokens] int32
            x = (symbols.T.float() - steps) * (scale[:, None] / steps)
            if group:
                a_codes = torch.from_numpy(frombuffer(own[0], np.int8, n_anchor * channels).copy()).to(device).float()
                a_step = from_bf16_bits(own[1], n_anchor).to(device)[:, None]
                base = (a_codes.view(n_anchor, channels) * a_step)
                full = base.repeat_interleave(group, dim=0)[:tokens].clone()
                full[~anchors.to(device)] += x
                x = full
            out.append(x.view(tokens, heads, dim).permute(1, 0, 2))
        return torch.stack(out)


