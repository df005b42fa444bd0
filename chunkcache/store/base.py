"""The small `KVStore` interface the engine reads and writes chunk caches through."""

from __future__ import annotations

from typing import Protocol

from chunkcache.kv import ChunkKV


class KVStore(Protocol):
    def get(self, key: str) -> ChunkKV | None:
        """The cached chunk, or None on a miss (a corrupt entry counts as a miss)."""

    def put(self, key: str, kv: ChunkKV) -> None:
        """Store atomically; readers see the whole entry or none of it."""

    def contains(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...
