"""The `KVCodec` interface and the self-describing, checksummed container every codec writes.

Layout: ``MAGIC | u16 version | u32 header length | header JSON | payload | blake2b-256 digest``.
The digest covers every byte before it, so truncation and bit flips are detected before any
tensor is built. Nothing is pickled."""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any, Protocol

from chunkcache.errors import CorruptCacheError
from chunkcache.kv import ChunkKV

MAGIC = b"CCKV"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sHI")
_DIGEST_SIZE = 32


class KVCodec(Protocol):
    """Turns a chunk's KV into bytes and back."""

    name: str

    def encode(self, kv: ChunkKV) -> bytes: ...

    def decode(self, data: bytes) -> ChunkKV: ...


def pack(header: dict[str, Any], payload: bytes) -> bytes:
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    body = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(head)) + head + payload
    return body + hashlib.blake2b(body, digest_size=_DIGEST_SIZE).digest()


def unpack(data: bytes) -> tuple[dict[str, Any], memoryview]:
    """Validate the container; return its header and a view of its payload."""
    view = memoryview(data)
    if len(view) < _PREFIX.size + _DIGEST_SIZE:
        raise CorruptCacheError(f"cache entry is truncated ({len(view)} bytes)")
    magic, version, head_len = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise CorruptCacheError("cache entry does not start with the chunkcache magic bytes")
    body, digest = view[:-_DIGEST_SIZE], view[-_DIGEST_SIZE:]
    if hashlib.blake2b(body, digest_size=_DIGEST_SIZE).digest() != digest:
        raise CorruptCacheError("cache entry checksum mismatch (corrupted or truncated bytes)")
    if version != FORMAT_VERSION:
        raise CorruptCacheError(
            f"cache entry has format version {version}, this chunkcache reads version "
            f"{FORMAT_VERSION}; clear the store or recompute the entry"
        )
    start = _PREFIX.size
    try:
        header = json.loads(bytes(body[start : start + head_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCacheError(f"cache entry header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise CorruptCacheError("cache entry header is not a JSON object")
    return header, body[start + head_len :]
