"""The disk tier: lmdb on local disk (transactional, multi-process safe) holding codec bytes,
within an optional byte budget.

Every entry has a metadata record (bytes, tokens, hits, last access) in a named sub-database,
written in the same transaction as the entry, so eviction can rank entries without reading
them. Corrupt entries are deleted and reported as misses; a killed writer leaves only whole,
committed entries (lmdb's copy-on-write commit)."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import lmdb

from chunkcache.codec import KVCodec
from chunkcache.codec.base import peek_tokens
from chunkcache.store.encoded import EncodedTier
from chunkcache.store.policy import LRU, EntryInfo, EvictionPolicy, TierStats, victims


_INITIAL_MAP_SIZE = 1 << 30
_META_DB = b"chunkcache-meta"
_META = struct.Struct("<QQQd")  # bytes, tokens, hits, last access (unix time: shared by processes)
_FLUSH_EVERY = 64  # access records buffered before they are written

# lmdb allows one open environment per path and process: stores on the same folder share it.
_ENVS: dict[str, tuple[lmdb.Environment, int]] = {}  # resolved path -> (environment, users)
_ENVS_LOCK = threading.Lock()


def _open_env(path: Path, map_size: int) -> lmdb.Environment:
    key = str(path.resolve())
    with _ENVS_LOCK:
        env, users = _ENVS.get(key) or (lmdb.open(str(path), map_size=map_size, max_readers=256, max_dbs=2), 0)
        _ENVS[key] = (env, users + 1)
        return env


def _release_env(path: Path) -> None:
    key = str(path.resolve())
    with _ENVS_LOCK:
        if key not in _ENVS:
            return
        env, users = _ENVS.pop(key)
        if users > 1:
            _ENVS[key] = (env, users - 1)
        else:
            env.close()


class LmdbStore(EncodedTier):
    """The `disk` tier; the map grows by doubling when full."""

    name = "disk"

    def __init__(self, path: Path, codec: KVCodec, map_size: int = _INITIAL_MAP_SIZE,
                 budget_bytes: int | None = None, policy: EvictionPolicy | None = None) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.codec = codec
        self.budget = budget_bytes
        self.policy = policy or LRU()
        self.stats = TierStats()
        self._env = _open_env(self.path, map_size)
        self._closed = False
        self._accesses: dict[str, float] = {}  # key -> last access, not yet written
        self._hits: dict[str, int] = {}
        self._access_lock = threading.Lock()
        self._meta = self._retry(lambda: self._env.open_db(_META_DB))

    @property
    def corrupt_entries(self) -> int:
        return self.stats.corrupt

    def _retry(self, fn):  # type: ignore[no-untyped-def]
        try:
            return fn()
        except lmdb.MapResizedError:
            # Another process grew the map: adopt its size (0 = the size now on disk) and retry.
            self._env.set_mapsize(0)
            return fn()

    def _begin(self, write: bool = False) -> lmdb.Transaction:
        return self._retry(lambda: self._env.begin(write=write, buffers=False))

    def _write(self, fn) -> None:  # type: ignore[no-untyped-def]
        """Run ``fn(txn)`` in one write transaction, growing the map when it is full."""
        while True:
            try:
                with self._begin(write=True) as txn:
                    fn(txn)
                return
            except lmdb.MapFullError:
                self._env.set_mapsize(self._env.info()["map_size"] * 2)

    # --- reads ---------------------------------------------------------------------------
    def get_bytes(self, key: str) -> bytes | None:
        """The encoded entry (a hit is recorded for eviction), or None."""
        with self._begin() as txn:
            data = txn.get(key.encode())
        if data is None:
            self.stats.count("misses")
            return None
        self.stats.count("hits")
        with self._access_lock:
            self._accesses[key] = time.time()
            self._hits[key] = self._hits.get(key, 0) + 1
            flush = len(self._accesses) >= _FLUSH_EVERY
        if flush:
            self._write(self._flush_accesses)
        return data

    def _flush_accesses(self, txn: lmdb.Transaction) -> None:
        with self._access_lock:
            accesses, hits = self._accesses, self._hits
            self._accesses, self._hits = {}, {}
        for key, when in accesses.items():
            raw = txn.get(key.encode(), db=self._meta)
            if raw is not None:
                size, tokens, old_hits, _ = _META.unpack(raw)
                txn.put(key.encode(), _META.pack(size, tokens, old_hits + hits.get(key, 0), when), db=self._meta)

    def contains(self, key: str) -> bool:
        with self._begin() as txn:
            return txn.get(key.encode()) is not None

    # --- writes --------------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes, tokens: int | None = None) -> None:
        """Write an encoded entry and its metadata in one transaction, evicting by the policy
        when the budget would be exceeded. An entry bigger than the whole budget is not kept."""
        if self.budget is not None and len(data) > self.budget:
            return
        start = time.perf_counter()
        tokens = peek_tokens(data) if tokens is None else tokens
        evicted: list[str] = []

        def write(txn: lmdb.Transaction) -> None:
            self._flush_accesses(txn)
            txn.put(key.encode(), data)
            txn.put(key.encode(), _META.pack(len(data), tokens, 0, time.time()), db=self._meta)
            if self.budget is not None:
                infos = self._infos(txn)
                used = sum(i.nbytes for i in infos)
                others = [i for i in infos if i.key != key]
                for info in victims(others, self.policy, used - len(data), self.budget, len(data)):
                    txn.delete(info.key.encode())
                    txn.delete(info.key.encode(), db=self._meta)
                    evicted.append(info.key)

        self._write(write)
        self.stats.count("evictions", len(evicted))
        self.stats.timed("put", time.perf_counter() - start)

    def delete(self, key: str) -> None:
        def drop(txn: lmdb.Transaction) -> None:
            txn.delete(key.encode())
            txn.delete(key.encode(), db=self._meta)

        self._write(drop)

    def clear(self) -> None:
        def drop_all(txn: lmdb.Transaction) -> None:
            for key in list(self._keys(txn)):
                txn.delete(key.encode())
            txn.drop(self._meta, delete=False)

        self._write(drop_all)

    # --- listing -------------------------------------------------------------------------
    def _keys(self, txn: lmdb.Transaction) -> Iterator[str]:
        for key in txn.cursor().iternext(keys=True, values=False):
            if bytes(key) != _META_DB:  # the sub-database's own record in the main database
                yield bytes(key).decode()

    def keys(self) -> Iterator[str]:
        with self._begin() as txn:
            yield from list(self._keys(txn))

    def _infos(self, txn: lmdb.Transaction) -> list[EntryInfo]:
        infos = []
        known = set()
        for raw_key, raw in txn.cursor(db=self._meta).iternext():
            size, tokens, hits, when = _META.unpack(bytes(raw))
            key = bytes(raw_key).decode()
            known.add(key)
            infos.append(EntryInfo(key, size, tokens, hits, when))
        for key in self._keys(txn):  # entries written before metadata existed
            if key not in known:
                infos.append(EntryInfo(key, len(txn.get(key.encode()) or b""), 0, 0, 0.0))
        return infos

    def infos(self) -> list[EntryInfo]:
        with self._begin() as txn:
            return self._infos(txn)

    def size(self) -> int:
        """Bytes of encoded entries held."""
        return sum(i.nbytes for i in self.infos())

    def __len__(self) -> int:
        with self._begin() as txn:
            return sum(1 for _ in self._keys(txn))

    def close(self) -> None:
        if not self._closed:
            if self._accesses:
                self._write(self._flush_accesses)
            self._closed = True
            _release_env(self.path)
