"""Where chunk caches live: keys, the `KVStore` interface and the lmdb disk store."""

from chunkcache.store.base import KVStore
from chunkcache.store.keys import chunk_key, prefix_fingerprint
from chunkcache.store.lmdb_store import LmdbStore

__all__ = ["KVStore", "LmdbStore", "chunk_key", "prefix_fingerprint"]
