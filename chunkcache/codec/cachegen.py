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
from chunkcache.codec.base import (
    Entry, HostParts, LayeredCodec, bf16_bits, from_bf16_bits, frombuffer, join_parts, split_parts,
)
from chunkcache.codec.entropy import channel_tables, decode_streams, pack_tables, read_tables
from chunkcache.device import cuda_runtime
from chunkcache.errors import CorruptCacheError, InvalidInputError
from chunkcache.triton_jit import triton_available

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
        shape = _Shape(entry, index)
        if entry.version == 2:
            parts = split_parts(entry.sections[index], 2 + 2 * shape.per_kind)
            streams = [torch.from_numpy(s).to(device) for s in decode_streams(
                parts[0], parts[1], [(shape.channels, shape.coded, b - 1) for b in shape.bins])]
            return shape.dequantize(streams, _host_parts(shape, parts, 2), device)
        if _kernel_decodes(device):
            return super().decode_layer(entry, index, device)
        # the CPU: decoded and dequantised by compiled loops, straight into the cache's layout
        host = _unpack(entry, index, shape)
        cum, states, counts, words = (host[k] for k in ("cum", "states", "counts", "words"))
        symbols = rans.decode(states.view(np.uint32), counts, words.view(np.uint16), cum, shape.coded)
        scales = from_bf16_bits(host["scales"], 2 * shape.coded).view(2, shape.coded).numpy()
        coded = rans.dequantize(symbols, shape.steps, scales, shape.heads)
        if not shape.group:
            return torch.from_numpy(coded).to(device)
        x = [torch.from_numpy(coded[kind]).permute(1, 0, 2).reshape(shape.coded, shape.channels) for kind in (0, 1)]
        return shape.with_anchors(x, {k: torch.from_numpy(np.array(host[k])) for k in ("anchor_codes", "anchor_steps")},
                                  device)

    def unpack_layer(self, entry: Entry, index: int) -> HostParts | None:
        if entry.version == 2:
            return None  # constriction's stream decodes on the host only
        shape = _Shape(entry, index)
        parts = _unpack(entry, index, shape)
        parts["meta"] = rans_triton.group_meta(2 * shape.channels, shape.coded, parts["counts"])
        return parts

    def dequantize_layer(self, entry: Entry, index: int, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The GPU half: the Triton kernel decodes every lane, then CacheGen's dequantisation."""
        shape = _Shape(entry, index)
        lanes = 2 * shape.channels
        symbols = torch.empty(lanes * shape.coded, dtype=torch.uint8, device=parts["cum"].device)
        rans_triton.decode_groups(parts["states"], parts["cum"], parts["words"], parts["meta"], symbols)
        symbols = symbols.view(lanes, shape.coded)
        return shape.dequantize([symbols[: shape.channels], symbols[shape.channels :]], parts, symbols.device)


class _Shape:
    """What decoding one layer needs from the header: sizes, bins and the anchor layout."""

    def __init__(self, entry: Entry, index: int) -> None:
        params = entry.header["params"]
        self.group = int(params["group"])
        _, self.heads, self.tokens, self.dim = entry.layer_shape
        self.channels = self.heads * self.dim
        self.n_anchor = -(-self.tokens // self.group) if self.group else 0  # tokens 0, group, 2 x group, ...
        self.coded = self.tokens - self.n_anchor
        self.bins = [int(params["bins_k"][index]), int(params["bins_v"][index])]
        if min(self.bins) < 4:
            raise CorruptCacheError(f"cache entry has cachegen bins {self.bins}")
        self.steps = (self.bins[0] // 2 - 1, self.bins[1] // 2 - 1)
        self.per_kind = 3 if self.group else 1  # (anchor codes, anchor steps,) scales

    def dequantize(self, streams: list[torch.Tensor], parts: dict[str, Any], device: torch.device) -> torch.Tensor:
        """The layer from each kind's symbols ``[channels, tokens]`` (torch operations, on their device)."""
        parts = {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v)).to(device)
                 for k, v in parts.items() if k.startswith(("scales", "anchor"))}
        scales = parts["scales"].view(torch.bfloat16).float()
        x = [(streams[kind].T.float() - self.steps[kind]) * (scales[kind][:, None] / self.steps[kind]) for kind in (0, 1)]
        return self.with_anchors(x, parts, device)

    def with_anchors(self, x: list[torch.Tensor], parts: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        """K and V from their coded tokens ``[coded, channels]``: with delta coding, each one
        added to its group's anchor token (stored in int8)."""
        out = []
        for kind in (0, 1):
            full = x[kind]
            if self.group:
                # token g * group is anchor g; the ones after it, its coded rows in order: fixed
                # shapes from the header, no mask (a mask's indices would be read on the host)
                a_step = parts["anchor_steps"][kind].view(torch.bfloat16).float().to(device)[:, None]
                base = parts["anchor_codes"][kind].to(device).float().view(self.n_anchor, self.channels) * a_step
                rows = torch.zeros(self.n_anchor * (self.group - 1), self.channels, device=device)
                rows[: self.coded] = x[kind].to(device)
                delta = torch.cat([torch.zeros(self.n_anchor, 1, self.channels, device=device),
                                   rows.view(self.n_anchor, self.group - 1, self.channels)], dim=1)
                full = (base[:, None, :] + delta).view(-1, self.channels)[: self.tokens]
            out.append(full.to(device).view(self.tokens, self.heads, self.dim).permute(1, 0, 2))
        return torch.stack(out)


def _unpack(entry: Entry, index: int, shape: _Shape) -> HostParts:
    """A version-3 section's arrays: lane tables and states, words per group, the words, scales
    and anchors, their sizes checked."""
    parts = split_parts(entry.sections[index], 4 + 2 * shape.per_kind)
    lanes = 2 * shape.channels
    cum = _lane_tables(read_tables(parts[0], [(shape.channels, b - 1) for b in shape.bins]))
    states = frombuffer(parts[1], np.uint32, lanes)
    counts = frombuffer(parts[2], np.uint32, rans.groups_of(lanes))
    words = frombuffer(parts[3], np.uint16, len(parts[3]) // 2)
    if len(parts[3]) % 2 or int(counts.sum(dtype=np.int64)) != len(words):
        raise CorruptCacheError("entropy-coded section's words do not match its group counts")
    return {"cum": cum, "states": states.view(np.int32), "counts": counts, "words": words.view(np.int16),
            **_host_parts(shape, parts, 4)}


def _host_parts(shape: _Shape, parts: list[memoryview], head: int) -> HostParts:
    """The scales (bfloat16 bits, [2, coded]) and anchors of a section whose first ``head``
    parts are the entropy coder's."""
    own = [parts[head + kind * shape.per_kind : head + (kind + 1) * shape.per_kind] for kind in (0, 1)]
    out = {"scales": np.stack([frombuffer(o[-1], np.int16, shape.coded) for o in own])}
    if shape.group:
        out["anchor_codes"] = np.stack([frombuffer(o[0], np.int8, shape.n_anchor * shape.channels) for o in own])
        out["anchor_steps"] = np.stack([frombuffer(o[1], np.int16, shape.n_anchor) for o in own])
    return out


def _lane_tables(tables: list[np.ndarray]) -> np.ndarray:
    """One cumulative table per lane (K's channels, then V's), K's and V's alphabets padded to
    the larger with never-seen symbols."""
    counts = np.zeros((sum(t.shape[0] for t in tables), max(t.shape[1] for t in tables)), dtype=np.uint8)
    start = 0
    for t in tables:
        counts[start : start + t.shape[0], : t.shape[1]] = t
        start += t.shape[0]
    return rans.freq_table(counts)


def _kernel_decodes(device: torch.device) -> bool:
    """Whether sections for ``device`` decode in the Triton kernel (a GPU with triton)."""
    return cuda_runtime(device) and triton_available()
