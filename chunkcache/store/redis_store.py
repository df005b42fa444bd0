"""The remote tier: encoded entries in redis or valkey (``redis://``, ``rediss://``), shared by
every server and precompute worker that points at it.

Each entry is two keys written in one MULTI/EXEC: the codec bytes and a metadata hash (bytes,
tokens, codec, time). The service being down or slow is never a failed answer: the call times
out, the tier logs a warning (once per outage), counts an error and answers as a miss, and it
skips the service for ``retry_s`` before trying again. Capacity is the server's own business
(``maxmemory`` with an ``allkeys-lru`` or ``allkeys-lfu`` policy)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable, TypeVar


from chunkcache.codec import KVCodec
from chunkcache.codec.base import peek_tokens
from chunkcache.errors import InvalidInputError
from chunkcache.store.encoded import EncodedTier
from chunkcache.store.policy import LRU, EntryInfo, TierStats

log = logging.getLogger(__name__)
T = TypeVar("T")


class RedisStore(EncodedTier):
    """The `remote` tier."""

    name = "remote"

    def __init__(self, url: str, codec: KVCodec, namespace: str = "chunkcache", timeout_s: float = 2.0,
                 retry_s: float = 5.0) -> None:
        try:
            import redis
        except ImportError:
            raise InvalidInputError("the remote tier needs redis-py: pip install 'redis>=5'") from None
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise InvalidInputError(f"remote_url must start with redis://, rediss:// or unix://, got {url!r}")
        self._redis = redis
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.url = url
        self.codec = codec
        self.budget: int | None = None
        self.policy = LRU()  # for `chunkcache cache evict --to-bytes` (by write time: redis keeps no access time here)
        self.stats = TierStats()
        self._ns = namespace
        self._retry_s = retry_s
        self._down_until = 0.0
        self._lock = threading.Lock()

    def _entry(self, key: str) -> str:
        return f"{self._ns}:e:{key}"

    def _meta(self, key: str) -> str:
        return f"{self._ns}:m:{key}"

    def _call(self, what: str, fn: Callable[[], T], default: T) -> T:
        """Run one redis call; an unreachable or failing service gives ``default`` and a warning."""
        if time.monotonic() < self._down_until:
            return default
        try:
            result = fn()
        except (self._redis.ConnectionError, self._redis.TimeoutError) as exc:
            with self._lock:
                first = self._down_until == 0.0
                self._down_until = time.monotonic() + self._retry_s
            self.stats.count("errors")
            if first:
                log.warning("remote cache %s unavailable (%s: %s); serving without it, retrying every %.0f s",
                            self.url, what, exc, self._retry_s)
            return default
        except self._redis.RedisError as exc:  # the service answered with an error: not an outage
            self.stats.count("errors")
            log.warning("remote cache %s refused %s: %s", self.url, what, exc)
            return default
        if self._down_until:
            with self._lock:
                self._down_until = 0.0
            log.warning("remote cache %s is reachable again", self.url)
        return result

    # --- reads ---------------------------------------------------------------------------
    def get_bytes(self, key: str) -> bytes | None:
        data = self._call("get", lambda: self.client.get(self._entry(key)), None)
        self.stats.count("misses" if data is None else "hits")
        return data

    def contains(self, key: str) -> bool:
        return bool(self._call("exists", lambda: self.client.exists(self._entry(key)), 0))

    # --- writes --------------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes, tokens: int | None = None) -> None:
        start = time.perf_counter()
        meta = {"bytes": len(data), "tokens": peek_tokens(data) if tokens is None else tokens,
                "time": time.time()}

        def write() -> bool:
            pipe = self.client.pipeline(transaction=True)
            pipe.set(self._entry(key), data)
            pipe.hset(self._meta(key), mapping=meta)
            pipe.execute()
            return True

        if self._call("put", write, False):
            self.stats.timed("put", time.perf_counter() - start)

    def delete(self, key: str) -> None:
        self._call("delete", lambda: self.client.delete(self._entry(key), self._meta(key)), 0)

    def clear(self) -> None:
        for key in list(self.keys()):
            self.delete(key)

    # --- listing -------------------------------------------------------------------------
    def keys(self) -> Iterator[str]:
        prefix = f"{self._ns}:e:"
        found = self._call("scan", lambda: list(self.client.scan_iter(match=prefix + "*", count=1000)), [])
        return iter([k.decode()[len(prefix):] for k in found])

    def infos(self) -> list[EntryInfo]:
        keys = list(self.keys())

        def fetch() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.hgetall(self._meta(key))
            return pipe.execute()

        out = []
        for key, meta in zip(keys, self._call("infos", fetch, [{}] * len(keys))):
            meta = {k.decode(): float(v) for k, v in (meta or {}).items()}
            out.append(EntryInfo(key, int(meta.get("bytes", 0)), int(meta.get("tokens", 0)), 0, meta.get("time", 0.0)))
        return out

    def size(self) -> int:
        return sum(i.nbytes for i in self.infos())

    def __len__(self) -> int:
        return len(list(self.keys()))

    def close(self) -> None:
        self._call("close", lambda: self.client.close(), None)
