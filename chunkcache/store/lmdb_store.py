"""The disk tier: lmdb on local disk (transactional, multi-process safe) holding codec bytes,
within an optional byte budget.

Every entry has a metadata record (bytes, tokens, hits, last access) in a named sub-database,
written in the same transaction as the entry, so eviction can rank entries without reading
them. Corrupt entries are deleted and reported as misses; a killed writer leaves only whole,
committed entries (lmdb's copy-on-write commit). Damage to lmdb's own pages (a bad disk, a
foreign write) is a miss too: an unreadable key or metadata record is skipped, and once lmdb
reports its B-tree corrupt the tier stops being used by this process (every read a miss, every
write skipped) with one error saying how to recover. lmdb has no page checksums: damage it
does not detect can still crash the process reading it (SIGBUS); `chunkcache cache clear
--tier disk` or moving the folder aside recovers."""

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
_TOTAL = b"!total"  # in the metadata db: bytes of all entries (not a hex key: no entry can have it)
_COUNT = struct.Struct("<Q")
_DAMAGE = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.BadTxnError, lmdb.PanicError)

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
        self._closed = False
        self._damaged = False
        self._failing = False  # the last write failed (warned once)
        self._accesses: dict[str, float] = {}  # key -> last access, not yet written
        self._hits: dict[str, int] = {}
        self._access_lock = threading.Lock()
        self._opened = False
        self._open(map_size)

    def _open(self, map_size: int) -> None:
        try:
            self._env, self._lock = _open_env(self.path, map_size)
            self._opened = True
            with self._txn(write=True) as txn:  # creates the metadata sub-database on first use
                self._meta = self._env.open_db(_META_DB, txn=txn)
        except (*_DAMAGE, lmdb.InvalidError, lmdb.VersionMismatchError) as exc:
            self._io_error("open", exc if isinstance(exc, _DAMAGE) else lmdb.CorruptedError(str(exc)))

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
        if isinstance(exc, _DAMAGE):
            if not self._damaged:
                log.error("the disk cache at %s is damaged (%s: %s) and is not used until restart: stop "
                          "chunkcache and run 'chunkcache cache clear --tier disk' or move the folder aside "
                          "(answers go on from the other tiers and computing)", self.path, type(exc).__name__, exc)
            self._damaged = True
            return
        if self._failing:  # one warning per outage (a full disk fails every write): counted only
            log.debug("disk cache %s failed again at %s: %s", what, self.path, exc)
            return
        self._failing = True
        log.warning("disk cache %s failed at %s (%s: %s); check free space and permissions of store_path, "
                    "or lower disk_budget; answers go on (computed), further failures are counted in the "
                    "disk tier's errors until a write works again", what, self.path, type(exc).__name__, exc)

    def _guarded(self, what: str, fn, default):  # type: ignore[no-untyped-def]
        """``fn()``, or ``default`` when the tier is damaged or lmdb fails (logged, counted)."""
        if self._damaged:
            return default
        try:
            return fn()
        except lmdb.Error as exc:
            self._io_error(what, exc)
            return default

    def get_bytes(self, key: str) -> bytes | None:
        """The encoded entry (a hit is recorded for eviction), or None."""
        found = self._guarded("read", lambda: self._read(key), None)
        if found is None and self._damaged:
            self.stats.count("misses")
        return found

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
            if raw is not None and len(raw) == _META.size:
                size, tokens, old_hits, _ = _META.unpack(raw)
                txn.put(key.encode(), _META.pack(size, tokens, old_hits + hits.get(key, 0), when), db=self._meta)

    def contains(self, key: str) -> bool:
        def look() -> bool:
            with self._begin() as txn:
                return txn.get(key.encode()) is not None

        return bool(self._guarded("read", look, False))

    # --- writes --------------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes, tokens: int | None = None) -> None:
        """Write an encoded entry and its metadata in one transaction, evicting by the policy
        when the budget would be exceeded. An entry bigger than the whole budget is not kept."""
        if (self.budget is not None and len(data) > self.budget) or self._damaged:
            return
        start = time.perf_counter()
        tokens = peek_tokens(data) if tokens is None else tokens
        evicted: list[str] = []

        def write(txn: lmdb.Transaction) -> None:
            self._flush_accesses(txn)
            replaced = self._nbytes(txn, key)
            before = self._total(txn)  # before the put: a scan for a missing total would count it
            txn.put(key.encode(), data)
            txn.put(key.encode(), _META.pack(len(data), tokens, 0, time.time()), db=self._meta)
            # a running total, kept in the same transaction by every write: the entries are
            # listed (a scan) only when the budget is passed, not on every write
            used = before - replaced + len(data)
            if self.budget is not None and used > self.budget:
                infos = self._infos(txn)
                used = sum(i.nbytes for i in infos)
                others = [i for i in infos if i.key != key]
                for info in victims(others, self.policy, used - len(data), self.budget, len(data)):
                    txn.delete(info.key.encode())
                    txn.delete(info.key.encode(), db=self._meta)
                    evicted.append(info.key)
                    used -= info.nbytes
            txn.put(_TOTAL, _COUNT.pack(max(0, used)), db=self._meta)

        try:
            self._write(write)
        except lmdb.Error as exc:
            self._io_error("write", exc)
            return
        if self._failing:
            self._failing = False
            log.warning("disk cache writes at %s work again", self.path)
        self.stats.count("evictions", len(evicted))
        self.stats.timed("put", time.perf_counter() - start)
        self.stats.count("written_bytes", len(data))

    def delete(self, key: str) -> None:
        def drop(txn: lmdb.Transaction) -> None:
            size = self._nbytes(txn, key)
            txn.delete(key.encode())
            txn.delete(key.encode(), db=self._meta)
            total = txn.get(_TOTAL, db=self._meta)
            if total is not None and len(total) == _COUNT.size:
                txn.put(_TOTAL, _COUNT.pack(max(0, _COUNT.unpack(total)[0] - size)), db=self._meta)

        self._guarded("delete", lambda: self._write(drop), None)

    def clear(self) -> None:
        """Delete every entry. A damaged database is moved aside (``data.mdb.damaged-<time>``,
        kept for inspection) and a new one started: the way back from damage lmdb reported."""
        if self._damaged:
            if self._opened:
                _release_env(self.path)
                self._opened = False
            data = self.path / "data.mdb"
            if data.exists():
                data.rename(self.path / f"data.mdb.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            (self.path / "lock.mdb").unlink(missing_ok=True)
            self._damaged = False
            self._open(_INITIAL_MAP_SIZE)
            log.warning("the damaged disk cache was moved aside to %s; a new one is started", data.parent)
            return

        def drop_all(txn: lmdb.Transaction) -> None:
            for key in list(self._keys(txn)):
                txn.delete(key.encode())
            txn.drop(self._meta, delete=False)

        self._write(drop_all)

    def _nbytes(self, txn: lmdb.Transaction, key: str) -> int:
        """Bytes of the entry under ``key`` (0: none)."""
        meta = txn.get(key.encode(), db=self._meta)
        if meta is not None and len(meta) == _META.size:
            return int(_META.unpack(meta)[0])
        data = txn.get(key.encode())
        return 0 if data is None else len(data)

    def _total(self, txn: lmdb.Transaction) -> int:
        """Bytes of all entries: the running total, or a scan when it is missing or damaged."""
        raw = txn.get(_TOTAL, db=self._meta)
        if raw is not None and len(raw) == _COUNT.size:
            return int(_COUNT.unpack(raw)[0])
        return sum(i.nbytes for i in self._infos(txn))

    # --- listing -------------------------------------------------------------------------
    def _keys(self, txn: lmdb.Transaction) -> Iterator[str]:
        """Keys of entries; a key damaged on disk (not text) is skipped: no one can ask for it."""
        for raw in txn.cursor().iternext(keys=True, values=False):
            key = _text(raw)
            if key is not None and key != _META_DB.decode():  # the sub-database's own record
                yield key

    def keys(self) -> Iterator[str]:
        def listed() -> list[str]:
            with self._begin() as txn:
                return list(self._keys(txn))

        return iter(self._guarded("list", listed, []))

    def _infos(self, txn: lmdb.Transaction) -> list[EntryInfo]:
        infos = []
        known = set()
        for raw_key, raw in txn.cursor(db=self._meta).iternext():
            key = _text(raw_key)
            if bytes(raw_key) == _TOTAL:
                continue
            if key is None or len(raw) != _META.size:
                continue  # a damaged record: the entry is ranked as one without metadata below
            size, tokens, hits, when = _META.unpack(bytes(raw))
            known.add(key)
            infos.append(EntryInfo(key, size, tokens, hits, when))
        for key in self._keys(txn):  # entries written before metadata existed
            if key not in known:
                infos.append(EntryInfo(key, len(txn.get(key.encode()) or b""), 0, 0, 0.0))
        return infos

    def infos(self) -> list[EntryInfo]:
        def listed() -> list[EntryInfo]:
            with self._begin() as txn:
                return self._infos(txn)

        return list(self._guarded("list", listed, []))

    def size(self) -> int:
        """Bytes of encoded entries held (the running total: no scan)."""
        def total() -> int:
            with self._begin() as txn:
                return self._total(txn)

        return int(self._guarded("list", total, 0))

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())

    def close(self) -> None:
        if not self._closed:
            if self._accesses:
                self._guarded("write", lambda: self._write(self._flush_accesses), None)
            self._closed = True
            if self._opened:
                _release_env(self.path)


def _text(raw: bytes | memoryview) -> str | None:
    try:
        return bytes(raw).decode()
    except UnicodeDecodeError:
        return None
