"""The remote tier: encoded entries in redis or valkey (``redis://``, ``rediss://``), shared by
every server and precompute worker that points at it.

Each entry is two keys written in one MULTI/EXEC: the codec bytes and a metadata hash (bytes,
tokens, codec, time). The service being down or slow is never a failed answer: the call times
out, the tier logs a warning (once per outage), counts an error and answers as a miss, and it
skips the service for ``retry_s`` before trying again. Capacity is the server's own business
(``maxmemory`` with an ``allkeys-lru`` or ``allkeys-lfu`` policy)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, Callable, TypeVar


from chunkcache.codec import KVCodec
from chunkcache.codec.base import peek_tokens
from chunkcache.errors import InvalidInputError
from chunkcache.store.policy import LRU, EntryInfo, TierStats
from chunkcache.store.remote import REDIS_SCHEMES, RemoteTier, ServiceDown, ServiceGuard, ServiceRefused

T = TypeVar("T")


class RedisStore(RemoteTier):
    """The `remote` tier."""

    def __init__(self, url: str, codec: KVCodec, namespace: str = "chunkcache", timeout_s: float = 2.0,
                 retry_s: float = 5.0) -> None:
        try:
            import redis
        except ImportError:
            raise InvalidInputError("the remote tier needs redis-py: pip install 'redis>=5'") from None
        if not url.startswith(REDIS_SCHEMES):
            raise InvalidInputError(f"a redis remote_url starts with {', '.join(REDIS_SCHEMES)}, got {url!r}")
        self._redis = redis
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.url = url
        self.codec = codec
        self.budget: int | None = None
        self.policy = LRU()  # for `chunkcache cache evict --to-bytes` (by write time: redis keeps no access time here)
        self.stats = TierStats()
        self._ns = namespace
        self.guard = ServiceGuard(url, self.stats, retry_s)

    def _call(self, what: str, fn: Callable[[], T], default: T) -> T:
        """Run one redis call; an unreachable or failing service gives ``default`` and a warning."""
        def run() -> T:
            try:
                return fn()
            except (self._redis.ConnectionError, self._redis.TimeoutError) as exc:
                raise ServiceDown(str(exc)) from exc
            except self._redis.RedisError as exc:  # the service answered with an error: not an outage
                raise ServiceRefused(str(exc)) from exc

        return self.guard.call(what, run, default)

    # --- reads ---------------------------------------------------------------------------
    def get_bytes(self, key: str) -> bytes | None:
        return self._read(key, self._call("get", lambda: self.client.get(self._entry(key)), None))

    def contains(self, key: str) -> bool:
        return bool(self._call("exists", lambda: self.client.exists(self._entry(key)), 0))

    # --- writes --------------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes, tokens: int | None = None) -> None:
        start = time.perf_counter()
        meta = {"bytes": len(data), "tokens": peek_tokens(data) if tokens is None else tokens,
                "time": time.time()}

        stored = self._sealed(key, data)

        def write() -> bool:
            pipe = self.client.pipeline(transaction=True)
            pipe.set(self._entry(key), stored)
            pipe.hset(self._meta(key), mapping=meta)
            pipe.execute()
            return True

        if self._call("put", write, False):
            self._written(start, len(data))

    def delete(self, key: str) -> None:
        self._call("delete", lambda: self.client.delete(self._entry(key), self._meta(key)), 0)

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
            out.append(self._info(key, {k.decode(): float(v) for k, v in (meta or {}).items()}))
        return out

    def close(self) -> None:
        self._call("close", lambda: self.client.close(), None)
