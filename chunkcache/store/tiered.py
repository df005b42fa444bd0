"""`TieredStore`: the store the engine reads through, over tiers ordered fastest first
(gpu, cpu, disk, remote).

- read-through: a hit in a lower tier is promoted into every tier above it (encoded bytes to
  byte tiers, decoded tensors to memory tiers);
- writes go through to every tier by default; with ``write_through=False`` they go to the first
  tier only and reach the next one when the memory tier evicts them (write-back);
- a corrupt entry in a byte tier is deleted, counted, and the read falls to the next tier (then,
  if no tier has it, the engine recomputes the chunk);
- ``prefetch(keys)`` starts loading in background threads and returns at once; ``get`` waits on
  a pending load; ``iter_layers`` yields a chunk's layers while later ones are still decoding."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from chunkcache.codec import KVCodec, RawCodec, codec_for, decode_entry, unpack
from chunkcache.codec.base import LEGACY_VERSIONS, peek_version
from chunkcache.device import pinned, upload
from chunkcache.errors import CorruptCacheError
from chunkcache.kv import ChunkKV
from chunkcache.store.memory import MemoryTier
from chunkcache.store.policy import EntryInfo, TierStats
from chunkcache.store.stream import LayerStream
from chunkcache.timing import stage


log = logging.getLogger(__name__)
_MAX_PENDING = 256
_SIZES_KEPT = 4096


class ByteTier(Protocol):
    """A tier of encoded entries (disk, remote)."""

    name: str
    budget: int | None
    stats: TierStats

    def get_bytes(self, key: str) -> bytes | None: ...

    def put_bytes(self, key: str, data: bytes, tokens: int | None = None) -> None: ...

    def drop_corrupt(self, key: str, exc: Exception) -> None: ...

    def contains(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def keys(self) -> Iterator[str]: ...

    def infos(self) -> list[EntryInfo]: ...

    def size(self) -> int: ...

    def clear(self) -> None: ...

    def close(self) -> None: ...

    def __len__(self) -> int: ...


Tier = MemoryTier | ByteTier


@dataclass
class PrefetchHandle:
    """Loads started by `TieredStore.prefetch`; ``wait()`` returns once all have finished."""

    futures: dict[str, Future]
    seconds: dict[str, float]  # background load time per key, filled as loads finish
    release: Callable[[Sequence[str]], None] = lambda keys: None

    def wait(self) -> dict[str, ChunkKV | None]:
        """The loaded caches (None for misses); the store then forgets them (use `get` instead
        to take one at a time)."""
        out = {key: future.result() for key, future in self.futures.items()}
        self.release(list(self.futures))
        return out

    def load_s(self) -> float:
        """Seconds the background threads spent loading (summed over keys)."""
        return sum(self.seconds.values())

    def done(self) -> bool:
        return all(f.done() for f in self.futures.values())


class TieredStore:
    """Reads through, writes through and keeps per-tier statistics (see the module docstring)."""

    def __init__(self, tiers: Sequence[Tier], codec: KVCodec, write_through: bool = True, workers: int = 4) -> None:
        if not tiers:
            raise ValueError("a TieredStore needs at least one tier")
        self.tiers = list(tiers)
        self.codec = codec
        self.write_through = write_through
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kvprefetch")
        self._pending: dict[str, Future] = {}
        self._lock = threading.Lock()
        # write-back: entries written to the first tier only, with their codec and bytes, until
        # that tier evicts them (or the store closes); then every lower tier gets them
        self._dirty: dict[str, tuple[KVCodec, bytes | None]] = {}
        self._sizes: dict[str, int] = {}  # encoded bytes of the latest puts (`encoded_bytes`)
        first = self.tiers[0]
        if not write_through and isinstance(first, MemoryTier):
            first.on_evict.append(self._write_down)

    def encoded_bytes(self, key: str) -> int | None:
        """The size of the entry this store last encoded for ``key`` (one of its latest
        `_SIZES_KEPT` puts), or None: what a precompute worker reports instead of the tensors."""
        with self._lock:
            return self._sizes.get(key)

    def tier(self, name: str) -> Tier | None:
        return next((t for t in self.tiers if t.name == name), None)

    # --- reads ---------------------------------------------------------------------------
    def get(self, key: str, model_fingerprint: str | None = None, device: torch.device | str | None = None) -> ChunkKV | None:
        with self._lock:
            pending = self._pending.pop(key, None)
        if pending is None:
            return self._load(key, model_fingerprint, device)
        kv = pending.result()  # a prefetch already went through every tier: None is a miss
        if kv is None or (model_fingerprint is not None and kv.model_fingerprint != model_fingerprint):
            return None
        if device is not None and kv.kv.device != torch.device(device):
            kv = _moved(kv, device)
        return kv

    def _load(self, key: str, model_fingerprint: str | None, device: torch.device | str | None) -> ChunkKV | None:
        for i, tier in enumerate(self.tiers):
            if isinstance(tier, MemoryTier):
                kv = tier.get(key, model_fingerprint, device)
                if kv is not None:
                    self._promote(i, key, kv, None)
                    return kv
                continue
            with stage("store_read_s"):
                data = tier.get_bytes(key)
            if data is None:
                continue
            try:
                with stage("codec_decode_s"):
                    kv = decode_entry(data, model_fingerprint)  # on the host: see _moved
            except CorruptCacheError as exc:
                tier.drop_corrupt(key, exc)
                continue
            self._promote(i, key, kv, data)
            return kv if device is None else _moved(kv, device)
        return None

    def _promote(self, found_at: int, key: str, kv: ChunkKV, data: bytes | None, to_gpu: bool = True) -> None:
        """Put a hit into every tier above the one it was found in. ``to_gpu=False`` (loader
        threads) leaves the GPU tier out: its copy would run on the stream the fusion computes
        on, queued before the fusion's own kernels, and carry the chunk over PCIe a second time
        next to the fusion's layer-by-layer copies."""
        for tier in self._above(found_at, to_gpu):
            self._put_tier(tier, key, kv, data, None)

    def _above(self, found_at: int, to_gpu: bool) -> list[Tier]:
        return [t for t in self.tiers[:found_at] if to_gpu or not (isinstance(t, MemoryTier) and t.device.type == "cuda")]

    def prefetch(self, keys: Sequence[str], model_fingerprint: str | None = None,
                 device: torch.device | str | None = None) -> PrefetchHandle:
        """Start loading ``keys`` in background threads; `get` picks up the result."""
        handle = PrefetchHandle({}, {}, self._forget_pending)

        def load(key: str) -> ChunkKV | None:
            start = time.perf_counter()
            try:
                return self._load(key, model_fingerprint, device)
            finally:
                handle.seconds[key] = time.perf_counter() - start

        with self._lock:
            if len(self._pending) > _MAX_PENDING:  # prefetches nobody read: keep the newest
                for old in [k for k, f in self._pending.items() if f.done()][: len(self._pending) - _MAX_PENDING]:
                    del self._pending[old]
            for key in dict.fromkeys(keys):
                future = self._pending.get(key)
                if future is None:
                    future = self._pool.submit(load, key)
                    self._pending[key] = future
                handle.futures[key] = future
        return handle

    def stream(self, keys: Sequence[str], model_fingerprint: str | None = None,
               device: torch.device | str | None = None) -> list[LayerStream]:
        """A layer-wise prefetch: one background job per key reads the entry and decodes it layer
        by layer into a `LayerStream`, promoting it when complete. Returns at once.

        The layers stay where the tier holds them (the GPU tier's on the device) or in host
        memory, pinned when ``device`` is a GPU: the fusion moves them one layer ahead on a
        side stream. A loader thread that copied to the GPU itself would wait, and make the
        GPU wait, for the copy."""
        streams = []
        for key in keys:
            stream = LayerStream(key)
            self._pool.submit(self._stream_job, key, model_fingerprint, device, stream)
            streams.append(stream)
        return streams

    def _stream_job(self, key: str, model_fingerprint: str | None, device: torch.device | str | None,
                    stream: LayerStream) -> None:
        try:
            self._fill_stream(key, model_fingerprint, device, stream)
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, who raises it
            stream.fail(exc)

    def _fill_stream(self, key: str, model_fingerprint: str | None, device: torch.device | str | None,
                     stream: LayerStream) -> None:
        for i, tier in enumerate(self.tiers):
            if isinstance(tier, MemoryTier):
                kv = tier.get(key, model_fingerprint)
                if kv is not None:
                    stream.start_from(kv)
                    self._promote(i, key, kv, None, to_gpu=False)
                    return
                continue
            read_at = time.perf_counter()
            data = tier.get_bytes(key)
            stream.read_s += time.perf_counter() - read_at
            if data is None:
                continue
            decode_at = time.perf_counter()
            try:
                if peek_version(data) in LEGACY_VERSIONS:
                    kv = decode_entry(data, model_fingerprint)
                    stream.decode_s += time.perf_counter() - decode_at
                    stream.start_from(ChunkKV(pinned(kv.kv, device), *_metadata(kv)))
                    self._promote(i, key, kv, data, to_gpu=False)
                    return
                entry = unpack(data, model_fingerprint=model_fingerprint)
                codec = codec_for(entry.header["codec"])
            except CorruptCacheError as exc:
                tier.drop_corrupt(key, exc)
                continue
            stream.start(len(entry.sections), *entry.metadata())
            host = torch.device("cpu")
            encoded = False
            try:
                for layer in range(len(entry.sections)):
                    # a GPU decodes what it can itself (compressed bytes cross PCIe, the host
                    # only unpacks); the rest is decoded here into pinned memory
                    part = codec.device_layer(entry, layer, device)
                    encoded = encoded or part is not None
                    stream.push(part if part is not None else pinned(codec.layer(entry, layer, host), device))
            except CorruptCacheError as exc:
                tier.drop_corrupt(key, exc)  # never served: the engine recomputes the chunk
                raise
            finally:
                stream.decode_s += time.perf_counter() - decode_at
            if not self._above(i, to_gpu=False):
                return
            try:  # the memory tiers keep decoded tensors: decoded here, after the fusion got its layers
                kv = codec.decode_entry(entry) if encoded else stream.result()
                self._promote(i, key, kv, data, to_gpu=False)
            except Exception as exc:  # noqa: BLE001 - the chunk was served; only the copy failed
                log.warning("could not promote chunk cache %s: %s", key[:16], exc)
            return
        stream.miss()

    def iter_layers(self, key: str, model_fingerprint: str | None = None,
                    device: torch.device | str | None = None) -> Iterator[torch.Tensor] | None:
        """The chunk's layers in order as they are decoded, or None on a miss. The whole chunk is
        promoted into the memory tiers once its last layer has been read."""
        for i, tier in enumerate(self.tiers):
            if isinstance(tier, MemoryTier):
                kv = tier.get(key, model_fingerprint, device)
                if kv is not None:
                    return iter(kv.kv.unbind(0))
                continue
            data = tier.get_bytes(key)
            if data is None:
                continue
            try:
                if peek_version(data) in LEGACY_VERSIONS:  # one tensor: nothing to stream
                    kv = decode_entry(data, model_fingerprint, device)
                    self._promote(i, key, kv, data)
                    return iter(kv.kv.unbind(0))
                entry = unpack(data, model_fingerprint=model_fingerprint)
                codec = codec_for(entry.header["codec"])
            except CorruptCacheError as exc:
                tier.drop_corrupt(key, exc)
                continue
            return self._stream(i, key, codec.iter_layers(data, model_fingerprint, device), entry.chunk_kv, data)
        return None

    def _stream(self, found_at: int, key: str, layers: Iterator[torch.Tensor], build: Any, data: bytes) -> Iterator[torch.Tensor]:
        got = []
        for layer in layers:
            got.append(layer)
            yield layer
        self._promote(found_at, key, build(torch.stack(got)), data)

    # --- writes --------------------------------------------------------------------------
    def put(self, key: str, kv: ChunkKV, codec: KVCodec | None = None) -> ChunkKV:
        """Encode once; every tier (or only the first, write-back) gets the entry. Returns the
        KV as the store will serve it (a lossy codec's decoded tensors), so that an answer does
        not depend on whether its chunks were hits or misses."""
        codec = codec or self.codec
        self._forget_pending([key])
        data = codec.encode(kv) if any(not isinstance(t, MemoryTier) for t in self.tiers) else None
        if data is not None:
            with self._lock:
                self._sizes[key] = len(data)
                while len(self._sizes) > _SIZES_KEPT:
                    del self._sizes[next(iter(self._sizes))]
        if data is not None and not isinstance(codec, RawCodec):
            kv = _moved(decode_entry(data), kv.kv.device)  # memory tiers hold what the lower tiers return
        first = self.tiers[0]
        if self.write_through or not isinstance(first, MemoryTier):
            for tier in self.tiers:
                self._put_tier(tier, key, kv, data, codec)
            return kv
        with self._lock:
            self._dirty[key] = (codec, data)
        if not first.put(key, kv):  # too big for the first tier: straight to the ones below
            self._write_down(key, kv)
        return kv

    def _write_down(self, key: str, kv: ChunkKV) -> None:
        with self._lock:
            dirty = self._dirty.pop(key, None)
        if dirty is None:
            return  # clean: the lower tiers already have it
        codec, data = dirty
        for tier in self.tiers[1:]:
            self._put_tier(tier, key, kv, data, codec)

    def _put_tier(self, tier: Tier, key: str, kv: ChunkKV, data: bytes | None, codec: KVCodec | None) -> None:
        if isinstance(tier, MemoryTier):
            tier.put(key, kv)
        else:
            tier.put_bytes(key, data if data is not None else (codec or self.codec).encode(kv), kv.num_tokens)

    def flush(self) -> None:
        """Write every entry still only in the first tier (write-back) to the tiers below."""
        first = self.tiers[0]
        for key in list(self._dirty):
            kv = first.get(key) if isinstance(first, MemoryTier) else None
            if kv is not None:
                self._write_down(key, kv)

    def _forget_pending(self, keys: Sequence[str]) -> None:
        with self._lock:
            for key in keys:
                self._pending.pop(key, None)

    def put_bytes(self, key: str, data: bytes) -> None:
        """Store already encoded bytes in the byte tiers (e.g. copied from another store)."""
        for tier in self.tiers:
            if not isinstance(tier, MemoryTier):
                tier.put_bytes(key, data)

    def get_bytes(self, key: str) -> bytes | None:
        """The encoded entry from the first byte tier that has it."""
        for tier in self.tiers:
            if not isinstance(tier, MemoryTier):
                data = tier.get_bytes(key)
                if data is not None:
                    return data
        return None

    def contains(self, key: str) -> bool:
        return any(tier.contains(key) for tier in self.tiers)

    def delete(self, key: str) -> None:
        self._forget_pending([key])
        with self._lock:
            self._dirty.pop(key, None)
        for tier in self.tiers:
            tier.delete(key)

    def discard(self, key: str, reason: str) -> None:
        """Drop an entry that decoded cleanly but is not what its key names (written under
        another chunk's key, or behind another context): counted as corrupt in every tier that
        held it, so the caller recomputes it and the next reader does not meet it again."""
        log.warning("dropping cache entry %s: %s", key[:16], reason)
        self._forget_pending([key])
        with self._lock:
            self._dirty.pop(key, None)
        for tier in self.tiers:
            if tier.contains(key):
                tier.stats.count("corrupt")
                tier.delete(key)

    def evict(self, key: str, tier_name: str | None = None) -> None:
        self._forget_pending([key])
        for tier in self.tiers:
            if tier_name in (None, tier.name):
                tier.delete(key)

    def clear(self, tier_name: str | None = None) -> None:
        with self._lock:
            self._pending.clear()
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


def _metadata(kv: ChunkKV) -> tuple[tuple[int, ...], int, str, str]:
    return kv.token_ids, kv.position_offset, kv.model_fingerprint, kv.prefix_fingerprint


def _moved(kv: ChunkKV, device: torch.device | str) -> ChunkKV:
    """``kv`` on ``device``; host tensors go to a GPU through pinned memory, asynchronously."""
    target = torch.device(device)
    return kv if kv.kv.device == target else ChunkKV(upload(kv.kv, target), *_metadata(kv))
