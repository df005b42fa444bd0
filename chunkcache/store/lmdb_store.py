"""Persistent chunk-cache store on local disk: lmdb (transactional, multi-process safe) holding
codec bytes. Corrupt entries are deleted and reported as misses."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import lmdb
import torch

from chunkcache.codec import KVCodec, decode_entry
from chunkcache.errors import CorruptCacheError
from chunkcache.kv import ChunkKV
from chunkcache.timing import stage

log = logging.getLogger(__name__)

_INITIAL_MAP_SIZE = 1 << 30

# lmdb allows one open environment per path and process: stores on the same folder share it.
_ENVS: dict[str, tuple[lmdb.Environment, int]] = {}  # resolved path -> (environment, users)
_ENVS_LOCK = threading.Lock()


def _open_env(path: Path, map_size: int) -> lmdb.Environment:
    key = str(path.resolve())
    with _ENVS_LOCK:
        env, users = _ENVS.get(key) or (lmdb.open(str(path), map_size=map_size, max_readers=256), 0)
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


class LmdbStore:
    """A `KVStore` on lmdb; the map grows by doubling when full."""

    def __init__(self, path: Path, codec: KVCodec, map_size: int = _INITIAL_MAP_SIZE) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.codec = codec
        self.corrupt_entries = 0
        self._env = _open_env(self.path, map_size)
        self._closed = False

    def _begin(self, write: bool = False) -> lmdb.Transaction:
        try:
            return self._env.begin(write=write, buffers=False)
        except lmdb.MapResizedError:
            # Another process grew the map: adopt its size (0 = the size now on disk) and retry.
            self._env.set_mapsize(0)
            return self._env.begin(write=write, buffers=False)

    def get(
        self, key: str, model_fingerprint: str | None = None, device: torch.device | str | None = None
    ) -> ChunkKV | None:
        """Decode by whichever codec wrote the entry, onto ``device``; an entry of another model
        counts as corrupt."""
        with stage("store_read_s"), self._begin() as txn:
            data = txn.get(key.encode())
        if data is None:
            return None
        try:
            with stage("codec_decode_s"):
                return decode_entry(data, model_fingerprint, device)
        except CorruptCacheError as exc:
            log.warning("dropping corrupt cache entry %s: %s", key[:16], exc)
            self.corrupt_entries += 1
            self.delete(key)
            return None

    def put(self, key: str, kv: ChunkKV, codec: KVCodec | None = None) -> None:
        """Encode with ``codec`` (the store's own by default) and write atomically."""
        self.put_bytes(key, (codec or self.codec).encode(kv))

    def put_bytes(self, key: str, data: bytes) -> None:
        while True:
            try:
                with self._begin(write=True) as txn:
                    txn.put(key.encode(), data)
                return
            except lmdb.MapFullError:
                self._env.set_mapsize(self._env.info()["map_size"] * 2)

    def get_bytes(self, key: str) -> bytes | None:
        with self._begin() as txn:
            return txn.get(key.encode())

    def contains(self, key: str) -> bool:
        with self._begin() as txn:
            return txn.get(key.encode()) is not None

    def delete(self, key: str) -> None:
        with self._begin(write=True) as txn:
            txn.delete(key.encode())

    def keys(self) -> Iterator[str]:
        with self._begin() as txn:
            for key in txn.cursor().iternext(keys=True, values=False):
                yield bytes(key).decode()

    def __len__(self) -> int:
        return int(self._env.stat()["entries"])

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _release_env(self.path)
