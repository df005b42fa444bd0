"""The disk tier: lmdb on local disk (transactional, multi-process safe) holding codec bytes,
within an optional byte budget.

Every entry has a metadata record (bytes, tokens, hits, last access) in a named sub-database,
written in the same transaction as the entry, so eviction can rank entries without reading
them. Corrupt entries are deleted and reported as misses; a killed writer leaves only whole,
committed entries (lmdb's copy-on-write commit)."""

from __future__ import annotations

import logging
import struct
import threading
import time
from contextlib import contextmanager
from collections.abc import Iterator
from pathlib import Path

import lmdb

from chunkcache.codec import KVCodec
from chunkcache.codec.base import peek_tokens
from chunkcache.store.encoded import EncodedTier
from chunkcache.store.policy import LRU, EntryInfo, EvictionPolicy, TierStats, victims


# A large virtual map (the file only grows as data is written, sparse on Linux) so that resizing,
# which lmdb allows only while no transaction is open in the process, almost never happens.
log = logging.getLogger(__name__)

_INITIAL_MAP_SIZE = 1 << 40
_MAX_DOUBLINGS = 8
_META_DB = b"chunkcache-meta"
_META = struct.Struct("<QQQd")  # bytes, tokens, hits, last access (unix time: shared by processes)
_FLUSH_EVERY = 64  # access records buffered before they are written

class _SharedLock:
    """Many transactions at once (shared), or one map resize alone (exclusive)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive)
            self._exclusive = True
            self._cond.wait_for(lambda: self._shared == 0)
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


# lmdb allows one open environment per path and process: stores on the same folder share it.
_ENVS: dict[str, tuple[lmdb.Environment, _SharedLock, int]] = {}  # resolved path -> (env, lock, users)
_ENVS_LOCK = threading.Lock()


def _open_env(path: Path, map_size: int) -> tuple[lmdb.Environment, _SharedLock]:
    key = str(path.resolve())
    with _ENVS_LOCK:
        found = _ENVS.get(key)
        if found is None:
            env = lmdb.open(str(path), map_size=map_size, max_readers=256, max_dbs=2)
            found = (env, _SharedLock(), 0)
        _ENVS[key] = (found[0], found[1], found[2] + 1)
        return found[0], found[1]


def _release_env(path: Path) -> None:
    key = str(path.resolve())
    with _ENVS_LOCK:
        if key not in _ENVS:
            return
        env, lock, users = _ENVS.pop(key)
        if users > 1:
            _ENVS[key] = (env, lock, users - 1)
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
        self._env, self._lock = _open_env(self.path, map_size)
        self._closed = False
        self._accesses: dict[str, float] = {}  # key -> last access, not yet written
        self._hits: dict[str, int] = {}
        self._access_lock = threading.Lock()
        with self._txn(write=True) as txn:  # creates the metadata sub-database on first use
            self._meta = self._env.open_db(_META_DB, txn=txn)

    @property
    def corrupt_entries(self) -> int:
        return self.stats.corrupt

    def _resize(self, size: int) -> None:
        with self._lock.exclusive():  # lmdb: no transaction of this process may be open
            self._env.set_mapsize(size)

    @contextmanager
    def _txn(self, write: bool = False) -> Iterator[lmdb.Transaction]:
        """One transaction, held open under the environment's shared lock."""
        for _ in range(2):
            with self._lock.shared():
                try:
                    txn = self._env.begin(write=write, buffers=False)
                except lmdb.MapResizedError:
                    pass  # another process grew the map: adopt its size below, then retry
                else:
                    with txn:
                        yield txn
                    return
            self._resize(0)  # 0 = the size now on disk
        raise lmdb.MapResizedError("the lmdb map kept changing size while opening a transaction")

    def _begin(self, write: bool = False):  # type: ignore[no-untyped-def]
        return self._txn(write)

    def _write(self, fn) -> None:  # type: ignore[no-untyped-def]
        """Run ``fn(txn)`` in one write transaction, growing the map when it is full."""
        for _ in range(_MAX_DOUBLINGS):
            try:
                with self._txn(write=True) as txn:
                    fn(txn)
                return
            except lmdb.MapFullError:
                self._resize(self._env.info()["map_size"] * 2)
        raise lmdb.MapFullError(f"the lmdb map of {self.path} stayed full after {_MAX_DOUBLINGS} doublings")

    # --- reads ---------------------------------------------------------------------------
    def _io_error(self, what: str, exc: Exception) -> None:
        """A disk failure is a miss (or a skipped write), counted and logged, never a failed answer."""
        self.stats.count("errors")
        log.warning("disk cache %s failed at %s (%s: %s); check free space and permissions of store_path, "
                    "or lower disk_budget", what, self.path, type(exc).__name__, exc)

    def get_bytes(self, key: str) -> bytes | None:
        """The encoded entry (a hit is recorded for eviction), or None."""
        try:
            return self._read(key)
        except lmdb.Error as exc:
            self._io_error("read", exc)
            return None

    def _read(self, key: str) -> bytes | None:
        with self._begin() as txn:
            data = txn.get(key.encode())
        if data is None:
            self.stats.count("misses")
            return None
        self.stats.count("hits")
        self.stats.count("read_bytes", len(data))
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

        try:
            self._write(write)
        except lmdb.Error as exc:
            self._io_error("write", exc)
            return
        self.stats.count("evictions", len(evicted))
        self.stats.timed("put", time.perf_counter() - start)
        self.stats.count("written_bytes", len(data))

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
            found = list(self._keys(txn))
        return iter(found)

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
