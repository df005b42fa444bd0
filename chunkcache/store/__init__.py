"""Where chunk caches live: keys, the `KVStore` interface and the tiers (gpu, cpu, disk, remote,
each a `Tier`) behind one `TieredStore`."""

from chunkcache.store.base import KVStore, Tier
from chunkcache.store.keys import chunk_key, prefix_fingerprint
from chunkcache.store.lmdb_store import LmdbStore
from chunkcache.store.memory import MemoryTier
from chunkcache.store.registry import PERSISTENT_TIERS, TIER_NAMES, build_store
from chunkcache.store.tiered import TieredStore

__all__ = [
    "KVStore", "LmdbStore", "PERSISTENT_TIERS", "TIER_NAMES", "MemoryTier", "Tier", "TieredStore", "build_store", "chunk_key",
    "prefix_fingerprint",
]
