"""The in-memory tiers: decoded chunk caches in host memory (`cpu`, pinned when CUDA is present)
or resident on the GPU (`gpu`), within a byte budget, evicting by the tier's policy."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import torch

from chunkcache.errors import InvalidInputError
from chunkcache.kv import ChunkKV, HeldEntry, StoredEntry
from chunkcache.device import pinned
from chunkcache.store.policy import EntryInfo, EvictionPolicy, LRU, TierStats, victims


class MemoryTier:
    """Decoded `ChunkKV`s keyed by chunk key (a `Tier`). Entries bigger than the whole budget
    are not kept."""

    encoded = False

    def __init__(self, name: str, budget_bytes: int | None, policy: EvictionPolicy | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.name = name
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidInputError("the gpu tier needs a CUDA device; leave it out of store_tiers on this machine")
        self.budget = budget_bytes
        self.policy = policy or LRU()
        self.stats = TierStats()
        self._entries: dict[str, tuple[ChunkKV, EntryInfo]] = {}
        self._used = 0
        self._lock = threading.Lock()
        self.on_evict: list = []  # callbacks (key, kv) run for every evicted entry (write-back)

    def _place(self, kv: ChunkKV) -> ChunkKV:
        if self.device.type == "cuda":  # from pinned memory, asynchronously: nobody waits for it
            tensor = pinned(kv.kv, self.device).to(self.device, non_blocking=True)
        else:
            tensor = kv.kv.to(self.device)
            if torch.cuda.is_available():
                tensor = tensor.pin_memory()  # fast, asynchronous copies to the GPU
        return kv.holding(tensor)

    def get(self, key: str, model_fingerprint: str | None = None, device: torch.device | str | None = None) -> ChunkKV | None:
        start = time.perf_counter()
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                found[1].hits += 1
                found[1].last_access = time.monotonic()
        self.stats.timed("get", time.perf_counter() - start)
        if found is None or (model_fingerprint is not None and found[0].model_fingerprint != model_fingerprint):
            self.stats.count("misses")
            return None
        self.stats.count("hits")
        kv = found[0]
        if device is not None and torch.device(device) != kv.kv.device:
            target = torch.device(device)
            # non_blocking only towards CUDA: a GPU -> host copy may return before it has landed
            kv = kv.holding(kv.kv.to(target, non_blocking=target.type == "cuda"))
        return kv

    def put(self, key: str, kv: ChunkKV, codec: object = None) -> bool:
        """Keep ``kv`` (evicting by the policy); False when it is bigger than the whole budget."""
        start = time.perf_counter()
        nbytes = kv.nbytes
        if self.budget is not None and nbytes > self.budget:
            return False
        placed = self._place(kv)
        evicted = []
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._used -= old[1].nbytes
            if self.budget is not None:
                for info in victims((e[1] for e in self._entries.values()), self.policy, self._used, self.budget, nbytes):
                    evicted.append((info.key, self._entries.pop(info.key)[0]))
                    self._used -= info.nbytes
            hits = old[1].hits if old is not None else 0
            self._entries[key] = (placed, EntryInfo(key, nbytes, kv.num_tokens, hits))
            self._used += nbytes
        self.stats.count("evictions", len(evicted))
        for evicted_key, evicted_kv in evicted:
            for callback in self.on_evict:
                callback(evicted_key, evicted_kv)
        self.stats.timed("put", time.perf_counter() - start)
        return True

    def open(self, key: str, model_fingerprint: str | None = None) -> HeldEntry | None:
        kv = self.get(key, model_fingerprint)
        return None if kv is None else HeldEntry(kv)

    def write(self, key: str, entry: StoredEntry, codec: object = None) -> bool:
        return self.put(key, entry.kv())

    def drop_corrupt(self, key: str, exc: Exception) -> None:
        """Decoded tensors cannot fail a check; kept for the `Tier` interface."""
        self.stats.count("corrupt")
        self.delete(key)

    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def delete(self, key: str) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._used -= old[1].nbytes

    def keys(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._entries))

    def infos(self) -> list[EntryInfo]:
        with self._lock:
            return [e[1] for e in self._entries.values()]

    def size(self) -> int:
        """Bytes held."""
        return self._used

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._used = 0

    def close(self) -> None:
        self.clear()
