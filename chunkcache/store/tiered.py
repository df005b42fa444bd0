"""`TieredStore`: the store the engine reads through, over tiers ordered fastest first
(gpu, cpu, disk, remote), each behind the one `Tier` interface.

- read-through: a hit in a lower tier is promoted into every tier above it (encoded bytes to
  byte tiers, decoded tensors to memory tiers);
- writes go through to every tier by default; with ``write_through=False`` they go to the first
  tier only and reach the next one when the memory tier evicts them (write-back);
- a corrupt entry in a byte tier is deleted, counted, and the read falls to the next tier (then,
  if no tier has it, the engine recomputes the chunk);
- ``stream(keys)`` starts loading in background threads and returns at once: each chunk's
  layers arrive in a `LayerStream` while later ones are still being read or decoded."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

import torch

from chunkcache.codec import KVCodec, RawCodec, decode_entry
from chunkcache.device import upload
from chunkcache.errors import CorruptCacheError
from chunkcache.kv import ChunkKV, HeldEntry, StoredEntry
from chunkcache.store.base import Tier
from chunkcache.store.memory import MemoryTier
from chunkcache.store.policy import victims
from chunkcache.store.stream import LayerStream
from chunkcache.timing import stage


log = logging.getLogger(__name__)
_SIZES_KEPT = 4096
_Found = TypeVar("_Found")


class RequestHits:
    """Entries one request found, per tier (counted by the loader threads too)."""

    def __init__(self, tiers: Sequence[str]) -> None:
        self._lock = threading.Lock()
        self._hits = {name: 0 for name in tiers}

    def add(self, tier: str) -> None:
        with self._lock:
            self._hits[tier] = self._hits.get(tier, 0) + 1

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._hits)


# the hits of the request this thread works for (requests are fused side by side, so the tiers'
# own counters, shared by all, cannot tell them apart)
_request_hits: ContextVar[RequestHits | None] = ContextVar("chunkcache_request_hits", default=None)


class TieredStore:
    """Reads through, writes through and keeps per-tier statistics (see the module docstring)."""

    def __init__(self, tiers: Sequence[Tier], codec: KVCodec, write_through: bool = True, workers: int = 4) -> None:
        if not tiers:
            raise ValueError("a TieredStore needs at least one tier")
        self.tiers = list(tiers)
        self.codec = codec
        self.write_through = write_through
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kvprefetch")
        self._lock = threading.Lock()
        # write-back: entries written to the first tier only, with their codec and bytes, until
        # that tier evicts them (or the store closes); then every lower tier gets them
        self._dirty: dict[str, tuple[KVCodec, bytes | None]] = {}
        self._sizes: dict[str, int] = {}  # encoded bytes of the latest puts (`encoded_bytes`)
        first = self.tiers[0]
        if not write_through and isinstance(first, MemoryTier):  # only memory tiers evict into others
            first.on_evict.append(self._write_down)

    def encoded_bytes(self, key: str) -> int | None:
        """The size of the entry this store last encoded for ``key`` (one of its latest
        `_SIZES_KEPT` puts), or None: what a precompute worker reports instead of the tensors."""
        with self._lock:
            return self._sizes.get(key)

    def tier(self, name: str) -> Tier | None:
        return next((t for t in self.tiers if t.name == name), None)

    # --- reads ---------------------------------------------------------------------------
    @contextmanager
    def request_hits(self) -> Iterator[RequestHits]:
        """Count the entries found inside this block (on this thread and in the loads it starts),
        per tier: one request's hits while others are served beside it."""
        token = _request_hits.set(RequestHits([tier.name for tier in self.tiers]))
        try:
            yield _request_hits.get()  # type: ignore[misc]
        finally:
            _request_hits.reset(token)

    def _find(self, key: str, read: Callable[[Tier], _Found | None]) -> tuple[int, _Found] | None:
        """The first tier, fastest first, where ``read`` finds the entry, and what it found; a
        tier whose entry fails its checks drops it, and the walk goes on below."""
        for i, tier in enumerate(self.tiers):
            try:
                found = read(tier)
            except CorruptCacheError as exc:
                tier.drop_corrupt(key, exc)
                continue
            if found is not None:
                hits = _request_hits.get()
                if hits is not None:
                    hits.add(tier.name)
                return i, found
        return None

    def get(self, key: str, model_fingerprint: str | None = None, device: torch.device | str | None = None) -> ChunkKV | None:
        def decoded(tier: Tier) -> tuple[StoredEntry, ChunkKV] | None:
            entry = tier.open(key, model_fingerprint)
            if entry is None:
                return None
            with stage("codec_decode_s"):
                return entry, entry.kv()  # on the host, or where a memory tier holds it: see _moved

        found = self._find(key, decoded)
        if found is None:
            return None
        i, (entry, kv) = found
        self._promote(i, key, HeldEntry(kv, entry))
        return kv if device is None else _moved(kv, device)

    def _promote(self, found_at: int, key: str, entry: StoredEntry, to_gpu: bool = True) -> None:
        """Put a hit into every tier above the one it was found in. ``to_gpu=False`` (loader
        threads) leaves the GPU tier out: its copy would run on the stream the fusion computes
        on, queued before the fusion's own kernels, and carry the chunk over PCIe a second time
        next to the fusion's layer-by-layer copies."""
        for tier in self._above(found_at, to_gpu):
            tier.write(key, entry, self.codec)

    def _above(self, found_at: int, to_gpu: bool) -> list[Tier]:
        return [t for t in self.tiers[:found_at] if to_gpu or t.device.type != "cuda"]

    def stream(self, keys: Sequence[str], model_fingerprint: str | None = None,
               device: torch.device | str | None = None) -> list[LayerStream]:
        """A layer-wise prefetch: one background job per key reads the entry and decodes it layer
        by layer into a `LayerStream`, promoting it when complete. Returns at once.

        The layers stay where the tier holds them (the GPU tier's on the device) or in host
        memory, pinned when ``device`` is a GPU: the fusion moves them one layer ahead on a
        side stream. A loader thread that copied to the GPU itself would wait, and make the
        GPU wait, for the copy."""
        streams = []
        hits = _request_hits.get()
        for key in keys:
            stream = LayerStream(key)
            self._pool.submit(self._stream_job, key, model_fingerprint, device, stream, hits)
            streams.append(stream)
        return streams

    def _stream_job(self, key: str, model_fingerprint: str | None, device: torch.device | str | None,
                    stream: LayerStream, hits: RequestHits | None) -> None:
        token = _request_hits.set(hits)  # the requesting thread's count
        try:
            self._fill_stream(key, model_fingerprint, device, stream)
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, who raises it
            stream.fail(exc)
        finally:
            _request_hits.reset(token)

    def _fill_stream(self, key: str, model_fingerprint: str | None, device: torch.device | str | None,
                     stream: LayerStream) -> None:
        def opened(tier: Tier) -> StoredEntry | None:
            read_at = time.perf_counter()
            try:
                return tier.open(key, model_fingerprint)
            finally:
                stream.read_s += time.perf_counter() - read_at

        found = self._find(key, opened)
        if found is None:
            stream.miss()
            return
        i, entry = found
        stream.start(entry.num_layers, *entry.metadata())
        decode_at = time.perf_counter()
        encoded = False
        try:
            for index in range(entry.num_layers):
                part = entry.layer(index, device)
                encoded = encoded or not isinstance(part, torch.Tensor)
                stream.push(part)
        except CorruptCacheError as exc:
            self.tiers[i].drop_corrupt(key, exc)  # never served: the engine recomputes the chunk
            raise
        finally:
            stream.decode_s += time.perf_counter() - decode_at
        if not self._above(i, to_gpu=False):
            return
        try:  # the memory tiers keep decoded tensors: decoded here, after the fusion got its layers
            self._promote(i, key, entry if encoded else HeldEntry(stream.result(), entry), to_gpu=False)
        except Exception as exc:  # noqa: BLE001 - the chunk was served; only the copy failed
            log.warning("could not promote chunk cache %s: %s", key[:16], exc)

    # --- writes --------------------------------------------------------------------------
    def put(self, key: str, kv: ChunkKV, codec: KVCodec | None = None) -> ChunkKV:
        """Encode once; every tier (or only the first, write-back) gets the entry. Returns the
        KV as the store will serve it (a lossy codec's decoded tensors), so that an answer does
        not depend on whether its chunks were hits or misses."""
        codec = codec or self.codec
        data = codec.encode(kv) if any(t.encoded for t in self.tiers) else None
        if data is not None:
            with self._lock:
                self._sizes[key] = len(data)
                while len(self._sizes) > _SIZES_KEPT:
                    del self._sizes[next(iter(self._sizes))]
        if data is not None and not isinstance(codec, RawCodec):
            kv = _moved(decode_entry(data), kv.kv.device)  # memory tiers hold what the lower tiers return
        first, entry = self.tiers[0], HeldEntry(kv, data)
        if self.write_through or first.encoded:
            for tier in self.tiers:
                tier.write(key, entry, codec)
            return kv
        with self._lock:
            self._dirty[key] = (codec, data)
        if not first.write(key, entry, codec):  # too big for the first tier: straight below
            self._write_down(key, kv)
        return kv

    def _write_down(self, key: str, kv: ChunkKV) -> None:
        with self._lock:
            dirty = self._dirty.pop(key, None)
        if dirty is None:
            return  # clean: the lower tiers already have it
        codec, data = dirty
        entry = HeldEntry(kv, data)
        for tier in self.tiers[1:]:
            tier.write(key, entry, codec)

    def flush(self) -> None:
        """Write every entry still only in the first tier (write-back) to the tiers below."""
        first = self.tiers[0]
        for key in list(self._dirty):
            entry = first.open(key)
            if entry is not None:
                self._write_down(key, entry.kv())

    def contains(self, key: str) -> bool:
        return any(tier.contains(key) for tier in self.tiers)

    def delete(self, key: str) -> None:
        with self._lock:
            self._dirty.pop(key, None)
        for tier in self.tiers:
            tier.delete(key)

    def discard(self, key: str, reason: str) -> None:
        """Drop an entry that decoded cleanly but is not what its key names (written under
        another chunk's key, or behind another context): counted as corrupt in every tier that
        held it, so the caller recomputes it and the next reader does not meet it again."""
        log.warning("dropping cache entry %s: %s", key[:16], reason)
        with self._lock:
            self._dirty.pop(key, None)
        for tier in self.tiers:
            if tier.contains(key):
                tier.stats.count("corrupt")
                tier.delete(key)

    def evict(self, key: str, tier_name: str | None = None) -> None:
        for tier in self.tiers:
            if tier_name in (None, tier.name):
                tier.delete(key)

    def shrink(self, target_bytes: int, tier_name: str | None = None) -> dict[str, tuple[int, str]]:
        """Evict by each tier's policy until it holds at most ``target_bytes`` (every tier, or
        only ``tier_name``). Returns, per tier, how many entries went and by which policy."""
        out = {}
        for tier in self.tiers:
            if tier_name in (None, tier.name):
                infos = tier.infos()
                drop = victims(infos, tier.policy, sum(i.nbytes for i in infos), target_bytes, 0)
                for info in drop:
                    tier.delete(info.key)
                out[tier.name] = (len(drop), tier.policy.name)
        return out

    def clear(self, tier_name: str | None = None) -> None:
        with self._lock:
            if tier_name in (None, self.tiers[0].name):
                self._dirty.clear()
        for tier in self.tiers:
            if tier_name in (None, tier.name):
                tier.clear()

    def keys(self) -> Iterator[str]:
        seen: dict[str, None] = {}
        for tier in self.tiers:
            seen.update(dict.fromkeys(tier.keys()))
        return iter(list(seen))

    def counters(self) -> dict[str, dict[str, Any]]:
        """Per tier: the counters of `TierStats` only (cheap: no pass over the entries)."""
        return {tier.name: tier.stats.snapshot() for tier in self.tiers}

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per tier: entries, bytes, budget and the counters of `TierStats`."""
        return {
            tier.name: {"entries": len(tier), "bytes": tier.size(), "budget_bytes": tier.budget, **tier.stats.snapshot()}
            for tier in self.tiers
        }

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.flush()
        for tier in self.tiers:
            tier.close()


def _moved(kv: ChunkKV, device: torch.device | str) -> ChunkKV:
    """``kv`` on ``device``; host tensors go to a GPU through pinned memory, asynchronously."""
    target = torch.device(device)
    return kv if kv.kv.device == target else kv.holding(upload(kv.kv, target))
