"""Turning a chunk's KV tensors into self-describing, checksummed bytes and back.

Codecs are named by a spec: ``raw``, ``int8``, ``kivi2[:group=G]``,
``cachegen-L[:delta=1[:group=G]]`` (L = quality level 1-3; ``cachegen`` alone is level 2).
Any entry decodes with `decode_entry`, whichever codec wrote it: its header says how."""

from __future__ import annotations

from typing import Callable

import torch

from chunkcache.codec.base import (
    LEGACY_VERSIONS, CacheMismatchError, KVCodec, LayeredCodec, UnsupportedCacheError, peek_version,
    read_header, unpack,
)
from chunkcache.codec.cachegen import CacheGenCodec
from chunkcache.codec.int8 import Int8Codec
from chunkcache.codec.kivi import Kivi2Codec
from chunkcache.codec.raw import RawCodec, decode_legacy
from chunkcache.device import pinned
from chunkcache.errors import InvalidInputError
from chunkcache.kv import ChunkKV, EncodedLayer

CODECS: dict[str, type[LayeredCodec]] = {
    "raw": RawCodec, "int8": Int8Codec, "kivi2": Kivi2Codec, "cachegen": CacheGenCodec,
}
BENCH_CODECS = ("raw", "int8", "kivi2", "cachegen-1", "cachegen-2", "cachegen-3")


def _options(spec: str, parts: list[str]) -> dict[str, int]:
    options = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise InvalidInputError(f"codec option {part!r} in {spec!r} must look like name=integer")
        options[key.strip()] = int(value)
    return options


def get_codec(spec: str, zstd_level: int = 3) -> LayeredCodec:
    """The codec a spec names (see the module docstring); a bad spec is a clear error."""
    head, *rest = spec.strip().split(":")
    name, _, level = head.partition("-")
    if name not in CODECS:
        raise InvalidInputError(f"unknown codec {spec!r}; choose one of {', '.join(BENCH_CODECS)}")
    options = _options(spec, rest)
    builders: dict[str, Callable[[], LayeredCodec]] = {
        "raw": lambda: RawCodec(zstd_level),
        "int8": lambda: Int8Codec(zstd_level),
        "kivi2": lambda: Kivi2Codec(group=options.pop("group", 32)),
        "cachegen": lambda: CacheGenCodec(
            level=int(level or options.pop("level", 2)), delta=bool(options.pop("delta", 0)),
            group=options.pop("group", 10),
        ),
    }
    if level and name != "cachegen":
        raise InvalidInputError(f"only cachegen takes a level suffix, got {spec!r}")
    if level and not level.isdigit():
        raise InvalidInputError(f"cachegen level must be 1, 2 or 3, got {spec!r}")
    codec = builders[name]()
    if options:
        raise InvalidInputError(f"codec {name} has no option(s) {', '.join(options)} (in {spec!r})")
    return codec


def decode_entry(
    data: bytes, model_fingerprint: str | None = None, device: torch.device | str | None = None
) -> ChunkKV:
    """Decode any entry by the codec its header names, dequantising on ``device``; corrupt or
    foreign bytes raise `CorruptCacheError`."""
    return OpenedEntry(data, model_fingerprint).kv(device)


class OpenedEntry:
    """An entry of any container version, validated (checksum, format, model) when opened, then
    decoded whole (`kv`) or one layer at a time (`layer`): a `chunkcache.kv.StoredEntry` for the
    byte tiers. A version-1 entry is one tensor, so it is decoded at once."""

    def __init__(self, data: bytes, model_fingerprint: str | None = None) -> None:
        self._data = data
        if peek_version(data) in LEGACY_VERSIONS:
            self._whole: ChunkKV | None = decode_legacy(data, model_fingerprint)
            return
        self._whole = None
        self._entry = unpack(data, model_fingerprint=model_fingerprint)
        self._codec = codec_for(self._entry.header["codec"])

    @property
    def num_layers(self) -> int:
        return self._whole.num_layers if self._whole is not None else len(self._entry.sections)

    def metadata(self) -> tuple[tuple[int, ...], int, str, str]:
        return self._whole.metadata() if self._whole is not None else self._entry.metadata()

    def layer(self, index: int, device: torch.device | str | None) -> torch.Tensor | EncodedLayer:
        """Layer ``index`` for a model on ``device``: a GPU decodes what it can itself
        (compressed bytes cross PCIe, the host only unpacks); the rest is decoded here, into
        pinned memory when bound for a GPU."""
        if self._whole is not None:
            return pinned(self._whole.kv[index], device)
        part = self._codec.device_layer(self._entry, index, device)
        if part is not None:
            return part
        return pinned(self._codec.layer(self._entry, index, torch.device("cpu")), device)

    def kv(self, device: torch.device | str | None = None) -> ChunkKV:
        """Every layer decoded (in parallel) onto ``device`` (the host by default)."""
        if self._whole is not None:
            return self._whole if device is None else self._whole.holding(self._whole.kv.to(device))
        return self._codec.decode_entry(self._entry, device)

    def data(self, codec: KVCodec | None = None) -> bytes:
        return self._data


def codec_for(name: str) -> LayeredCodec:
    """A decoder for entries a codec of this name wrote (parameters come from each entry)."""
    if name not in CODECS:
        raise UnsupportedCacheError(f"cache entry was written by codec {name!r}, unknown to this chunkcache")
    return CODECS[name]()


__all__ = [
    "BENCH_CODECS", "CODECS", "CacheGenCodec", "CacheMismatchError", "UnsupportedCacheError", "codec_for", "Int8Codec", "KVCodec",
    "Kivi2Codec", "OpenedEntry", "RawCodec", "decode_entry", "get_codec", "read_header", "unpack",
]
