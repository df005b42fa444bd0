"""The `KVCodec` interface and the self-describing, checksummed container every codec writes.

Layout: ``MAGIC | u16 version | u32 header length | header JSON | layer sections | blake2b-256``.
The header names the codec and its parameters, the dtype, the shape, the token ids and the
offset and length of every layer's section, so one layer can be decoded without the others.
The digest covers every byte before it: truncation and bit flips are detected before any tensor
is built. Nothing is pickled."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch

from chunkcache.device import cuda_runtime, upload
from chunkcache.errors import CorruptCacheError
from chunkcache.kv import ChunkKV

MAGIC = b"CCKV"
# Version 3 changed only cachegen's sections (interleaved rANS lanes, `rans`); the framing is
# version 2's, so version-2 entries of every codec still decode (cachegen's through constriction).
FORMAT_VERSION = 3
LAYERED_VERSIONS = (2, 3)
LEGACY_VERSIONS = (1,)  # version 1: one zstd'd tensor, raw codec only (read, never written)
_PREFIX = struct.Struct("<4sHI")
_DIGEST_SIZE = 32
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Layers decode in parallel: zstd, numpy and torch release the GIL on their inner loops.
_POOL = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="kvdecode")


class CacheMismatchError(CorruptCacheError):
    """An intact entry that belongs to another model (or prefix) than the one asking for it."""


class UnsupportedCacheError(CorruptCacheError):
    """An intact entry this version of chunkcache cannot read (a newer format or an unknown
    codec): a miss here, but never deleted, since newer servers sharing the store can read it."""


class KVCodec(Protocol):
    """Turns a chunk's KV into bytes and back, whole or one layer at a time."""

    name: str
    spec: str  # name plus parameters, e.g. "cachegen-2"; part of every cache key

    def encode(self, kv: ChunkKV) -> bytes: ...

    def decode(
        self, data: bytes, model_fingerprint: str | None = None, device: torch.device | str | None = None
    ) -> ChunkKV: ...

    def iter_layers(
        self, data: bytes, model_fingerprint: str | None = None, device: torch.device | str | None = None
    ) -> Iterator[torch.Tensor]: ...


@dataclass(frozen=True)
class Entry:
    """A validated container: its header and a view of each layer's section."""

    header: dict[str, Any]
    sections: tuple[memoryview, ...]
    version: int = FORMAT_VERSION

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.header["dtype"]]

    @property
    def layer_shape(self) -> tuple[int, int, int, int]:
        _, two, heads, tokens, dim = (int(s) for s in self.header["shape"])
        return two, heads, tokens, dim

    def metadata(self) -> tuple[tuple[int, ...], int, str, str]:
        """(token ids, position offset, model fingerprint, prefix fingerprint)."""
        h = self.header
        return (tuple(int(t) for t in h["token_ids"]), int(h["position_offset"]),
                str(h["model_fingerprint"]), str(h["prefix_fingerprint"]))

    def chunk_kv(self, kv: torch.Tensor) -> ChunkKV:
        return ChunkKV(kv, *self.metadata())


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"chunkcache codecs store float32, bfloat16 or float16 KV, not {name}")
    return name


def pack(kv: ChunkKV, codec: str, params: dict[str, Any], sections: Sequence[bytes]) -> bytes:
    """Frame one encoded section per layer with the header every decoder needs."""
    offsets, start = [], 0
    for section in sections:
        offsets.append([start, len(section)])
        start += len(section)
    header = {
        "codec": codec,
        "params": params,
        "dtype": dtype_name(kv.kv.dtype),
        "shape": list(kv.kv.shape),
        "num_tokens": kv.num_tokens,
        "token_ids": list(kv.token_ids),
        "position_offset": kv.position_offset,
        "model_fingerprint": kv.model_fingerprint,
        "prefix_fingerprint": kv.prefix_fingerprint,
        "sections": offsets,
    }
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    body = b"".join([_PREFIX.pack(MAGIC, FORMAT_VERSION, len(head)), head, *sections])
    return body + hashlib.blake2b(body, digest_size=_DIGEST_SIZE).digest()


def _checked_body(data: bytes) -> tuple[int, int, memoryview]:
    """Check length, magic and digest; return (version, header length, body)."""
    view = memoryview(data)
    if len(view) < _PREFIX.size + _DIGEST_SIZE:
        raise CorruptCacheError(f"cache entry is truncated ({len(view)} bytes)")
    magic, version, head_len = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise CorruptCacheError("cache entry does not start with the chunkcache magic bytes")
    body, digest = view[:-_DIGEST_SIZE], view[-_DIGEST_SIZE:]
    if hashlib.blake2b(body, digest_size=_DIGEST_SIZE).digest() != digest:
        raise CorruptCacheError("cache entry checksum mismatch (corrupted or truncated bytes)")
    return version, head_len, body


def peek_version(data: bytes) -> int:
    """The container version the prefix claims (unverified: decoding verifies)."""
    if len(data) < _PREFIX.size:
        raise CorruptCacheError(f"cache entry is truncated ({len(data)} bytes)")
    return int(_PREFIX.unpack_from(data)[1])


def legacy_header(data: bytes) -> tuple[dict[str, Any], memoryview]:
    """Header and payload of an intact version-1 entry."""
    _, head_len, body = _checked_body(data)
    try:
        header = json.loads(bytes(body[_PREFIX.size : _PREFIX.size + head_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCacheError(f"cache entry header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise CorruptCacheError("cache entry header is not a JSON object")
    return header, body[_PREFIX.size + head_len :]


def unpack(data: bytes, codec: str | None = None, model_fingerprint: str | None = None) -> Entry:
    """Validate the container (checksum, version, codec, model); return its header and sections."""
    version, head_len, body = _checked_body(data)
    if version > FORMAT_VERSION:
        raise UnsupportedCacheError(
            f"cache entry has format version {version}, this chunkcache reads version "
            f"{FORMAT_VERSION}; upgrade chunkcache to use it (it is left in the store)"
        )
    if version not in LAYERED_VERSIONS:
        raise CorruptCacheError(
            f"cache entry has format version {version}, this chunkcache reads versions "
            f"{', '.join(map(str, LAYERED_VERSIONS))}; clear the store or recompute the entry"
        )
    start = _PREFIX.size
    try:
        header = json.loads(bytes(body[start : start + head_len]))
        payload = body[start + head_len :]
        sections = tuple(payload[int(o) : int(o) + int(n)] for o, n in header["sections"])
        if len(sections) != int(header["shape"][0]) or sum(len(s) for s in sections) != len(payload):
            raise CorruptCacheError("cache entry sections do not match its layer count and size")
        if header["dtype"] not in DTYPES:
            raise CorruptCacheError(f"cache entry has unknown dtype {header['dtype']!r}")
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise CorruptCacheError(f"cache entry header is not valid: {exc}") from None
    if codec is not None and header["codec"] != codec:
        raise CorruptCacheError(f"entry was written by codec {header['codec']!r}, not {codec!r}")
    if model_fingerprint is not None and header["model_fingerprint"] != model_fingerprint:
        raise CacheMismatchError(
            f"cache entry belongs to model {str(header['model_fingerprint'])[:12]}, "
            f"not {model_fingerprint[:12]}; it cannot be used with this model"
        )
    return Entry(header, sections, version)


def peek_tokens(data: bytes | memoryview) -> int:
    """Token count an entry's header claims, without verifying it (for bookkeeping only)."""
    try:
        _, _, head_len = _PREFIX.unpack_from(data)
        header = json.loads(bytes(data[_PREFIX.size : _PREFIX.size + head_len]))
        return int(header.get("num_tokens", len(header.get("token_ids", ()))))
    except (struct.error, ValueError, TypeError, AttributeError):
        return 0


def read_header(data: bytes) -> dict[str, Any]:
    """The validated header of an entry (codec name, parameters, shape, ...)."""
    return unpack(data).header


def bf16_bits(x: torch.Tensor, round_up: bool = False, round_down: bool = False) -> np.ndarray:
    """float values as bfloat16 bit patterns (int16): fp32's range, so no overflow to inf.

    ``round_up`` stores every magnitude >= the input's (scales that must cover a maximum);
    ``round_down`` stores every value <= the input (a minimum the codes count up from)."""
    x = x.float()
    if round_up:
        x = x * (1.0 + 2.0**-7)  # bf16 rounds to nearest within 2**-8 relative
    if round_down:
        x = x - x.abs() * 2.0**-7
    return x.to(torch.bfloat16).view(torch.int16).numpy()


def from_bf16_bits(buf: memoryview | bytes, count: int) -> torch.Tensor:
    """Inverse of `bf16_bits`, as float32."""
    return torch.from_numpy(frombuffer(buf, np.int16, count).copy()).view(torch.bfloat16).float()


def join_parts(parts: Sequence[bytes | np.ndarray]) -> bytes:
    """Concatenate byte parts behind a table of their lengths (one layer's section)."""
    blobs = [p.tobytes() if isinstance(p, np.ndarray) else bytes(p) for p in parts]
    return struct.pack(f"<I{len(blobs)}Q", len(blobs), *(len(b) for b in blobs)) + b"".join(blobs)


def split_parts(section: memoryview, expected: int) -> list[memoryview]:
    """Inverse of `join_parts`; a wrong part count or size is corruption."""
    if len(section) < 4:
        raise CorruptCacheError("cache entry layer section is truncated")
    (count,) = struct.unpack_from("<I", section)
    if count != expected or len(section) < 4 + 8 * count:
        raise CorruptCacheError(f"cache entry layer section has {count} parts, expected {expected}")
    sizes = struct.unpack_from(f"<{count}Q", section, 4)
    parts, start = [], 4 + 8 * count
    for size in sizes:
        parts.append(section[start : start + size])
        start += size
    if start != len(section):
        raise CorruptCacheError("cache entry layer section has the wrong size")
    return parts


def frombuffer(buf: memoryview | bytes, dtype: np.dtype | type, count: int) -> np.ndarray:
    """A read-only array of exactly ``count`` items, or a `CorruptCacheError`."""
    arr = np.frombuffer(buf, dtype=dtype)
    if arr.size != count:
        raise CorruptCacheError(f"cache entry part holds {arr.size} values, expected {count}")
    return arr


LayerDecoder = Callable[[Entry, int], torch.Tensor]
HostParts = dict[str, np.ndarray]


def _on(part: np.ndarray, device: torch.device) -> torch.Tensor:
    host = torch.from_numpy(np.array(part))  # a copy: parts may be read-only views of the entry
    return upload(host, device)


@contextmanager
def _decoding(index: int) -> Iterator[None]:
    """What decoding a layer raises on bad bytes becomes a `CorruptCacheError` (the store then
    drops the entry); running out of memory is not the entry's fault and passes unchanged."""
    try:
        yield
    except (CorruptCacheError, torch.OutOfMemoryError):
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise CorruptCacheError(f"cache entry layer {index} cannot be decoded: {exc}") from None


def _pinned_bytes(n: int) -> torch.Tensor:
    try:
        return torch.empty(n, dtype=torch.uint8, pin_memory=True)
    except RuntimeError:  # no CUDA in this process (the CPU tests of this path)
        host = torch.empty(n, dtype=torch.uint8)
        try:
            return host.pin_memory()
        except RuntimeError:
            return host


class DeviceLayer:
    """A layer still in its codec's form, in pinned host memory (`chunkcache.kv.EncodedLayer`):
    `into` uploads it and dequantises it on the destination's device, on the current stream,
    without a host wait. The fusion's side stream calls it one layer ahead of compute.

    The parts lie side by side in one pinned buffer (each at a 16-byte boundary), so a layer is
    one copy to the device, whose parts are then views of it (no launch each)."""

    device = torch.device("cpu")  # where it lies until `into`

    def __init__(self, codec: "LayeredCodec", entry: Entry, index: int, parts: HostParts) -> None:
        self.codec, self.entry, self.index = codec, entry, index
        self.shape = entry.layer_shape
        self.layout: list[tuple[str, torch.dtype, tuple[int, ...], int, int]] = []
        end = 0
        for name, part in parts.items():
            dtype = torch.from_numpy(np.empty(0, dtype=part.dtype)).dtype
            self.layout.append((name, dtype, part.shape, end, part.nbytes))
            end += -(-part.nbytes // 16) * 16
        self.bytes = _pinned_bytes(end)
        host = self.bytes.numpy()
        for (_, _, _, start, n), part in zip(self.layout, parts.values()):
            host[start : start + n] = np.ascontiguousarray(part).reshape(-1).view(np.uint8)

    def into(self, dst: torch.Tensor) -> None:
        buf = self.bytes.to(dst.device, non_blocking=True)
        parts = {name: buf[start : start + n].view(dtype).view(shape) for name, dtype, shape, start, n in self.layout}
        dst.copy_(self.codec.dequantize_layer(self.entry, self.index, parts))


class LayeredCodec:
    """Base of every codec: one section per layer, decoded whole or streamed layer by layer.

    Subclasses implement ``encode_layer(layer [2, heads, tokens, dim], index, params)`` and either
    ``decode_layer(entry, index, device)`` or its two halves: ``unpack_layer`` (host work: split,
    decompress, check sizes; returns arrays) and ``dequantize_layer`` (device work on those arrays,
    moved there), which also let a GPU take a layer as compressed bytes (`device_layer`).
    Decoding returns float32 or the entry's dtype."""

    name = ""
    spec = ""

    def params(self, num_layers: int) -> dict[str, Any]:
        return {}

    def encode_layer(self, layer: torch.Tensor, index: int, params: dict[str, Any]) -> bytes:
        raise NotImplementedError

    def unpack_layer(self, entry: Entry, index: int) -> HostParts | None:
        """The host half of decoding one layer, or None where this entry decodes on the host only."""
        return None

    def dequantize_layer(self, entry: Entry, index: int, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def decode_layer(self, entry: Entry, index: int, device: torch.device) -> torch.Tensor:
        parts = self.unpack_layer(entry, index)
        if parts is None:
            raise NotImplementedError(f"codec {self.name} decodes no layer of this entry")
        return self.dequantize_layer(entry, index, {k: _on(v, device) for k, v in parts.items()})

    def device_layer(self, entry: Entry, index: int, device: torch.device | str | None) -> DeviceLayer | None:
        """Layer ``index`` to be decoded by a GPU (``device``) when the fusion reaches it, or None
        where it is decoded on the host (no GPU, or an entry without a device half)."""
        if device is None or not cuda_runtime(torch.device(device)):
            return None
        with _decoding(index):
            parts = self.unpack_layer(entry, index)
        return None if parts is None else DeviceLayer(self, entry, index, parts)

    def encode(self, kv: ChunkKV) -> bytes:
        tensor = kv.kv.detach().to("cpu")
        dtype_name(tensor.dtype)
        params = self.params(kv.num_layers)
        sections = [self.encode_layer(tensor[i], i, params) for i in range(kv.num_layers)]
        return pack(kv, self.name, params, sections)

    def open(self, data: bytes, model_fingerprint: str | None = None) -> Entry:
        return unpack(data, self.name, model_fingerprint)

    def layer(self, entry: Entry, index: int, device: torch.device) -> torch.Tensor:
        """One layer of a validated entry, in the entry's dtype, on ``device``."""
        return self._layer(entry, index, device)

    def _layer(self, entry: Entry, index: int, device: torch.device) -> torch.Tensor:
        with _decoding(index):
            out = self.decode_layer(entry, index, device)
        if tuple(out.shape) != entry.layer_shape:
            raise CorruptCacheError(f"cache entry layer {index} decoded to shape {tuple(out.shape)}")
        return out.to(entry.dtype)

    def iter_layers(
        self, data: bytes, model_fingerprint: str | None = None, device: torch.device | str | None = None
    ) -> Iterator[torch.Tensor]:
        """Layers in order, each ``[2, kv_heads, tokens, head_dim]``; later ones decode ahead."""
        entry = self.open(data, model_fingerprint)
        dev = torch.device(device or "cpu")
        futures = [_POOL.submit(self._layer, entry, i, dev) for i in range(len(entry.sections))]
        for future in futures:
            yield future.result()

    def decode(
        self, data: bytes, model_fingerprint: str | None = None, device: torch.device | str | None = None
    ) -> ChunkKV:
        return self.decode_entry(self.open(data, model_fingerprint), device)

    def decode_entry(self, entry: Entry, device: torch.device | str | None = None) -> ChunkKV:
        """Decode an already validated container (all layers, in parallel) onto ``device``."""
        dev = torch.device(device or "cpu")
        out = torch.empty([int(s) for s in entry.header["shape"]], dtype=entry.dtype, device=dev)

        def place(i: int) -> None:  # in the worker: the copies run in parallel too
            out[i].copy_(self._layer(entry, i, dev))

        list(_POOL.map(place, range(len(entry.sections))))
        return entry.chunk_kv(out)
