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
- entropy coding with one symbol distribution per (layer, channel) (`entropy`): every (K or V,
  channel) is one lane of `rans` (container version 3), decoded by threads on the CPU and by a
  Triton kernel on the GPU (`rans_triton`); version-2 entries decode through constriction."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from chunkcache.codec import rans, rans_triton
from chunkcache.codec.base import Entry, LayeredCodec, bf16_bits, from_bf16_bits, frombuffer, join_parts, split_parts
from chunkcache.codec.entropy import channel_tables, decode_streams, pack_tables, read_tables
from chunkcache.device import cuda_runtime, upload
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
        symbols_of, tables = [], []
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
            symbols_of.append(symbols.T)
            tables.append(channel_tables(symbols.T, int(bins) - 1))
        states, counts, words = rans.encode(np.concatenate(symbols_of), _lane_tables(tables))
        return join_parts([pack_tables(tables), states, counts, words, *parts])

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
        head = 2 if entry.version == 2 else 4
        parts = split_parts(entry.sections[index], head + 2 * per_tensor)
        steps = (bins[0] // 2 - 1, bins[1] // 2 - 1)
        scales = [from_bf16_bits(parts[head + (kind + 1) * per_tensor - 1], coded) for kind in (0, 1)]
        if entry.version == 2:
            streams = [torch.from_numpy(s).to(device)
                       for s in decode_streams(parts[0], parts[1], [(channels, coded, b - 1) for b in bins])]
        elif _kernel_decodes(device):
            streams = _decode_lanes(parts[:4], channels, coded, bins, device)
        else:  # the CPU: decoded and dequantised by compiled loops, in the cache's layout
            lanes = rans.dequantize(_decode_lanes(parts[:4], channels, coded, bins), steps,
                                    torch.stack(scales).numpy(), heads)
            if not group:
                return torch.from_numpy(lanes).to(device)
            streams = None
        out = []
        for kind in (0, 1):
            own = parts[head + kind * per_tensor : head + (kind + 1) * per_tensor]
            if streams is None:
                x = torch.from_numpy(lanes[kind]).permute(1, 0, 2).reshape(coded, channels).to(device)
            else:  # streams: [channels, tokens]
                x = (streams[kind].T.float() - steps[kind]) * (scales[kind].to(device)[:, None] / steps[kind])
            if group:
                a_codes = torch.from_numpy(frombuffer(own[0], np.int8, n_anchor * channels).copy()).to(device).float()
                a_step = from_bf16_bits(own[1], n_anchor).to(device)[:, None]
                base = (a_codes.view(n_anchor, channels) * a_step)
                full = base.repeat_interleave(group, dim=0)[:tokens].clone()
                full[~anchors.to(device)] += x
                x = full
            out.append(x.view(tokens, heads, dim).permute(1, 0, 2))
        return torch.stack(out)


def _lane_tables(tables: list[np.ndarray]) -> np.ndarray:
    """One cumulative table per lane (K's channels, then V's), K's and V's alphabets padded to
    the larger with never-seen symbols."""
    width = max(t.shape[1] for t in tables)
    return rans.freq_table(np.concatenate([np.pad(t, ((0, 0), (0, width - t.shape[1]))) for t in tables]))


def _kernel_decodes(device: torch.device) -> bool:
    """Whether sections for ``device`` decode in the Triton kernel (a GPU with triton)."""
    return cuda_runtime(device) and rans_triton.triton_available()


def _decode_lanes(parts: list[memoryview], channels: int, tokens: int, bins: list[int],
                  device: torch.device | None = None) -> Any:
    """The symbols ``[2 x channels, tokens]`` (K's channels, then V's) of a version-3 section:
    decoded by the Triton kernel on ``device`` (a GPU) into K's and V's uint8 tensors, or without
    a device by `rans.decode` on the CPU into one int32 array."""
    lanes = 2 * channels
    cum = _lane_tables(read_tables(parts[0], [(channels, b - 1) for b in bins]))
    states = frombuffer(parts[1], np.uint32, lanes)
    counts = frombuffer(parts[2], np.uint32, rans.groups_of(lanes))
    words = frombuffer(parts[3], np.uint16, len(parts[3]) // 2)
    if len(parts[3]) % 2 or int(counts.sum(dtype=np.int64)) != len(words):
        raise CorruptCacheError("entropy-coded section's words do not match its group counts")
    if device is None:
        return rans.decode(states, counts, words, cum, tokens)
    meta = rans_triton.group_meta(lanes, tokens, counts)
    symbols = torch.empty(lanes * tokens, dtype=torch.uint8, device=device)
    rans_triton.decode_groups(*(upload(torch.from_numpy(np.array(a)), device) for a in (
        states.view(np.int32), cum, words.view(np.int16), meta)), symbols)
    symbols = symbols.view(lanes, tokens)
    return [symbols[:channels], symbols[channels:]]
