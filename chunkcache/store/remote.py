"""The remote tier's two backends (redis, Mooncake Store) chosen by the URL's scheme, and what
they share: an outage is a miss with one warning, the service skipped for ``retry_s``, then
tried again; with a key set (``remote_key_env``), every entry is sealed with an HMAC-SHA256 of
its cache key and bytes, so whoever can write to the shared service but lacks the key cannot
change an answer: an entry that fails its tag (tampered, unsigned, moved to another key, or
signed with another key) is a miss, counted as corrupt, and recomputed."""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable, TypeVar

from chunkcache.codec import KVCodec
from chunkcache.errors import InvalidInputError
from chunkcache.store.encoded import EncodedTier
from chunkcache.store.policy import EntryInfo, TierStats

log = logging.getLogger(__name__)
T = TypeVar("T")

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
MOONCAKE_SCHEME = "mooncake://"
RETRY_S = 5.0  # how long an unreachable service is skipped before it is tried again
URL_HELP = "redis://HOST:6379/0 (redis or valkey) or mooncake://MASTER:50051 (Mooncake Store)"


class ServiceDown(Exception):
    """The remote service cannot be reached: every call is a miss until ``retry_s`` has passed."""


class ServiceRefused(Exception):
    """The service answered with an error for this call only (not an outage)."""


class ServiceGuard:
    """Runs calls to a remote service through the outage rule (module docstring)."""

    def __init__(self, url: str, stats: TierStats, retry_s: float) -> None:
        self.url = url
        self.stats = stats
        self.retry_s = retry_s
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._refusals: set[str] = set()

    def call(self, what: str, fn: Callable[[], T], default: T) -> T:
        """``fn()``, or ``default`` while the service is down or when it refuses this call."""
        if time.monotonic() < self._down_until:
            return default
        try:
            result = fn()
        except ServiceDown as exc:
            with self._lock:
                first = self._down_until == 0.0
                self._down_until = time.monotonic() + self.retry_s
            self.stats.count("errors")
            if first:
                log.warning("remote cache %s unavailable (%s: %s); serving without it, retrying every %.0f s",
                            self.url, what, exc, self.retry_s)
            return default
        except ServiceRefused as exc:
            self.stats.count("errors")
            reason = f"{what}: {exc}"
            if reason not in self._refusals:  # a full store refuses every put: say it once
                self._refusals.add(reason)
                log.warning("remote cache %s refused %s", self.url, reason)
            return default
        if self._down_until:
            with self._lock:
                self._down_until = 0.0
            log.warning("remote cache %s is reachable again", self.url)
        return result


class RemoteTier(EncodedTier):
    """What both backends share: each entry as two objects under a namespace (the codec bytes,
    and a small record of bytes, tokens and write time for `cache stats`), listing-based totals."""

    name = "remote"
    _ns = "chunkcache"
    mac_key: bytes | None = None  # set: entries are sealed and checked (module docstring)
    _TAG = 32
    _told_unsealed = False  # one warning per tier for entries that fail their tag

    def _entry(self, key: str) -> str:
        return f"{self._ns}:e:{key}"

    def _meta(self, key: str) -> str:
        return f"{self._ns}:m:{key}"

    def _tag(self, key: str, data: bytes | memoryview) -> bytes:
        return hmac.new(self.mac_key or b"", key.encode() + b"\0" + data, hashlib.sha256).digest()

    def _sealed(self, key: str, data: bytes) -> bytes:
        """The bytes to store for ``key``: ``data``, then its tag when a key is set."""
        return data + self._tag(key, data) if self.mac_key else data

    def _read(self, key: str, data: bytes | None) -> bytes | None:
        """Count a read's result (hit, miss, bytes) and hand on the entry (its tag checked)."""
        if data is not None and self.mac_key:
            body = memoryview(data)[: -self._TAG] if len(data) > self._TAG else memoryview(b"")
            if len(data) <= self._TAG or not hmac.compare_digest(self._tag(key, body), data[-self._TAG :]):
                self.stats.count("corrupt")
                if not self._told_unsealed:
                    self._told_unsealed = True
                    log.warning("remote cache %s: entry %s fails its HMAC (tampered, unsigned or another "
                                "key's): read as a miss; such entries are recomputed", self.name, key[:16])
                data = None
            else:
                data = bytes(body)
        self.stats.count("misses" if data is None else "hits")
        if data is not None:
            self.stats.count("read_bytes", len(data))
        return data

    def _written(self, started: float, nbytes: int) -> None:
        """Count a write that landed (latency since ``started``, bytes)."""
        self.stats.timed("put", time.perf_counter() - started)
        self.stats.count("written_bytes", nbytes)

    @staticmethod
    def _info(key: str, meta: dict[str, Any]) -> EntryInfo:
        return EntryInfo(key, int(meta.get("bytes", 0)), int(meta.get("tokens", 0)), 0, float(meta.get("time", 0.0)))

    def keys(self) -> Iterator[str]:
        raise NotImplementedError

    def infos(self) -> list[EntryInfo]:
        raise NotImplementedError

    def clear(self) -> None:
        for key in list(self.keys()):
            self.delete(key)

    def size(self) -> int:
        return sum(i.nbytes for i in self.infos())

    def __len__(self) -> int:
        return len(list(self.keys()))


def open_remote(url: str, codec: KVCodec, timeout_s: float = 2.0, retry_s: float = RETRY_S,
                namespace: str = "chunkcache", mac_key: bytes | None = None) -> RemoteTier:
    """The remote tier ``url`` names: redis/valkey or Mooncake Store; ``mac_key``: seal entries.
    Sealed entries live in their own namespace (``NS:sealed``): a server without the key never
    reads them (nor drops them as corrupt), one with it never reads unsealed ones."""
    tier: RemoteTier
    if mac_key:
        namespace = f"{namespace}:sealed"
    if url.startswith(REDIS_SCHEMES):
        from chunkcache.store.redis_store import RedisStore

        tier = RedisStore(url, codec, namespace=namespace, timeout_s=timeout_s, retry_s=retry_s)
    elif url.startswith(MOONCAKE_SCHEME):
        from chunkcache.store.mooncake_store import MooncakeStore

        tier = MooncakeStore(url, codec, namespace=namespace, timeout_s=timeout_s, retry_s=retry_s)
    else:
        raise InvalidInputError(f"remote_url must be {URL_HELP}, got {url!r}")
    tier.mac_key = mac_key or None
    return tier
