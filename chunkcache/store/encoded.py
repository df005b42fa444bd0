"""What the byte tiers (disk, remote) share: reading an encoded entry, decoding it by the codec
its header names, and turning a corrupt one into a counted, deleted miss."""

from __future__ import annotations

import logging
import time

import torch

from chunkcache.codec import KVCodec, OpenedEntry, UnsupportedCacheError
from chunkcache.errors import CorruptCacheError
from chunkcache.kv import ChunkKV, StoredEntry
from chunkcache.store.policy import TierStats
from chunkcache.timing import stage

log = logging.getLogger(__name__)


class EncodedTier:
    """Base of `LmdbStore`, `RedisStore` and `MooncakeStore` (the `Tier`s of encoded entries);
    subclasses provide the byte operations."""

    name = ""
    encoded = True
    device = torch.device("cpu")  # where its entries decode
    codec: KVCodec
    stats: TierStats

    def get_bytes(self, key: str) -> bytes | None:
        raise NotImplementedError

    def put_bytes(self, key: str, data: bytes, tokens: int | None = None) -> None:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def open(self, key: str, model_fingerprint: str | None = None) -> OpenedEntry | None:
        """The entry, its container checked (a corrupt one raises `CorruptCacheError`)."""
        with stage("store_read_s"):
            data = self.get_bytes(key)
        if data is None:
            return None
        with stage("codec_decode_s"):
            return OpenedEntry(data, model_fingerprint)

    def write(self, key: str, entry: StoredEntry, codec: KVCodec | None = None) -> bool:
        self.put_bytes(key, entry.data(codec or self.codec), len(entry.metadata()[0]))
        return True

    def get(self, key: str, model_fingerprint: str | None = None, device: torch.device | str | None = None) -> ChunkKV | None:
        """Decode by whichever codec wrote the entry, onto ``device``; a corrupt entry, or one of
        another model, is deleted, counted and read as a miss."""
        start = time.perf_counter()
        try:
            entry = self.open(key, model_fingerprint)
            if entry is None:
                return None
            with stage("codec_decode_s"):
                kv = entry.kv(device)
        except CorruptCacheError as exc:
            self.drop_corrupt(key, exc)
            return None
        self.stats.timed("get", time.perf_counter() - start)
        return kv

    def put(self, key: str, kv: ChunkKV, codec: KVCodec | None = None) -> None:
        """Encode with ``codec`` (the tier's own by default) and write atomically."""
        self.put_bytes(key, (codec or self.codec).encode(kv), kv.num_tokens)

    def drop_corrupt(self, key: str, exc: Exception) -> None:
        """A damaged entry is deleted and counted; one this chunkcache cannot read (newer format,
        unknown codec) is a miss but stays for the servers that can."""
        self.stats.count("hits", -1)
        self.stats.count("misses")
        if isinstance(exc, UnsupportedCacheError):
            log.warning("skipping %s cache entry %s: %s", self.name, key[:16], exc)
            return
        log.warning("dropping corrupt %s cache entry %s: %s", self.name, key[:16], exc)
        self.stats.count("corrupt")
        self.delete(key)
