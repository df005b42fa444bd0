"""The store's two interfaces: `KVStore`, what the engine reads and writes chunk caches through
(a `TieredStore`), and `Tier`, what every tier behind it (gpu, cpu, disk, remote) offers it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

import torch

from chunkcache.codec import KVCodec
from chunkcache.kv import ChunkKV, StoredEntry
from chunkcache.store.policy import EntryInfo, EvictionPolicy, TierStats

if TYPE_CHECKING:
    from chunkcache.store.stream import LayerStream


class KVStore(Protocol):
    def get(
        self, key: str, model_fingerprint: str | None = None, device: torch.device | str | None = None
    ) -> ChunkKV | None:
        """The cached chunk on ``device`` (CPU by default), or None on a miss (a corrupt entry,
        or one written for another model than ``model_fingerprint``, counts as a miss)."""

    def stream(self, keys: Sequence[str], model_fingerprint: str | None = None,
               device: torch.device | str | None = None) -> list[LayerStream]:
        """Start loading ``keys`` layer by layer in the background; returns at once."""

    def put(self, key: str, kv: ChunkKV, codec: KVCodec | None = None) -> ChunkKV | None:
        """Store atomically, encoded by ``codec`` (the store's default when None); readers see
        the whole entry or none of it. May return the KV as it will be served (decoded)."""

    def contains(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def discard(self, key: str, reason: str) -> None:
        """Drop an entry found not to hold what its key names (counted as corrupt)."""

    def counters(self) -> dict[str, dict[str, Any]]:
        """Per tier: its `TierStats` counters."""

    def request_hits(self) -> AbstractContextManager[Any]:
        """A block whose finds are counted per tier apart from other threads' (``.counts()``)."""

    def close(self) -> None: ...


class Tier(Protocol):
    """One tier of a `TieredStore`. ``encoded`` tiers keep codec bytes (disk, remote), the others
    decoded tensors on ``device`` (cpu, gpu). `open` finds an entry, checked (a corrupt one raises
    `CorruptCacheError`, for the store to `drop_corrupt` and read on); `write` keeps one
    (False: too big for this tier)."""

    name: str
    encoded: bool
    device: torch.device
    budget: int | None
    policy: EvictionPolicy  # which entries go first when the budget (or `TieredStore.shrink`) demands
    stats: TierStats

    def open(self, key: str, model_fingerprint: str | None = None) -> StoredEntry | None: ...

    def write(self, key: str, entry: StoredEntry, codec: KVCodec) -> bool: ...

    def drop_corrupt(self, key: str, exc: Exception) -> None: ...

    def contains(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def keys(self) -> Iterator[str]: ...

    def infos(self) -> list[EntryInfo]: ...

    def size(self) -> int: ...

    def clear(self) -> None: ...

    def close(self) -> None: ...

    def __len__(self) -> int: ...
