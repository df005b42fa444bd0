"""Where chunk caches live: keys, the `KVStore` interface and the tiers (gpu, cpu, disk, remote)
behind one `TieredStore`."""

from chunkcache.store.base import KVStore
from chunkcache.store.keys import chunk_key, prefix_fingerprint
from chunkcache.store.lmdb_store import LmdbStore
from chunkcache.store.memory import MemoryTier
from chunkcache.store.tiered import PrefetchHandle, TieredStore, build_store

__all__ = [
    "KVStore", "LmdbStore", "MemoryTier", "PrefetchHandle", "TieredStore", "build_store", "chunk_key",
    "prefix_fingerprint",
]
