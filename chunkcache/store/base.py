"""The small `KVStore` interface the engine reads and writes chunk caches through."""

from __future__ import annotations

from typing import Protocol

import torch

from chunkcache.codec import KVCodec
from chunkcache.kv import ChunkKV


class KVStore(Protocol):
    def get(
        self, key: str, model_fingerprint: str | None = None, device: torch.device | str | None = None
    ) -> ChunkKV | None:
        """The cached chunk on ``device`` (CPU by default), or None on a miss (a corrupt entry,
        or one written for another model than ``model_fingerprint``, counts as a miss)."""

    def put(self, key: str, kv: ChunkKV, codec: KVCodec | None = None) -> ChunkKV | None:
        """Store atomically, encoded by ``codec`` (the store's default when None); readers see
        the whole entry or none of it. May return the KV as it will be served (decoded)."""

    def contains(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def discard(self, key: str, reason: str) -> None:
        """Drop an entry found not to hold what its key names (counted as corrupt)."""
