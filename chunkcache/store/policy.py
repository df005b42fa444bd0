"""Eviction policies and per-tier statistics shared by every tier.

A tier keeps one `EntryInfo` per entry; when a put would exceed its byte budget, the policy
orders the entries and the tier drops them from the front until the new entry fits."""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

from chunkcache.errors import InvalidInputError


@dataclass
class EntryInfo:
    key: str
    nbytes: int
    tokens: int
    hits: int = 0
    last_access: float = field(default_factory=time.monotonic)


class EvictionPolicy(Protocol):
    name: str

    def order(self, entries: Iterable[EntryInfo]) -> list[EntryInfo]:
        """Entries in the order they should be evicted (first = first to go)."""


class LRU:
    name = "lru"

    def order(self, entries: Iterable[EntryInfo]) -> list[EntryInfo]:
        return sorted(entries, key=lambda e: e.last_access)


class CostAware:
    """Keep what saves the most recompute per byte: (hits + 1) x tokens / bytes, least first.

    The put counts as a use, so a new entry is not the first victim just for being new; ties
    go to the least recently used."""

    name = "cost"

    def order(self, entries: Iterable[EntryInfo]) -> list[EntryInfo]:
        return sorted(entries, key=lambda e: ((e.hits + 1) * e.tokens / max(1, e.nbytes), e.last_access))


POLICIES: dict[str, type[LRU] | type[CostAware]] = {"lru": LRU, "cost": CostAware}


def get_policy(name: str) -> EvictionPolicy:
    if name not in POLICIES:
        raise InvalidInputError(f"unknown eviction policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name]()


def victims(entries: Iterable[EntryInfo], policy: EvictionPolicy, used: int, budget: int, incoming: int) -> list[EntryInfo]:
    """The entries to drop so that ``used + incoming <= budget``, in policy order."""
    out, free = [], budget - used - incoming
    for entry in policy.order(entries):
        if free >= 0:
            break
        out.append(entry)
        free += entry.nbytes
    return out


class TierStats:
    """Hits, misses, evictions, corrupt entries, errors, bytes moved and get/put latency of one tier."""

    _KEEP = 4096  # latency samples kept per operation (the most recent)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = self.corrupt = self.errors = 0
        self.read_bytes = self.written_bytes = 0  # entry bytes moved (byte tiers)
        self._latency: dict[str, list[float]] = {"get": [], "put": []}

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def timed(self, op: str, seconds: float) -> None:
        with self._lock:
            samples = self._latency[op]
            samples.append(seconds)
            if len(samples) > self._KEEP:
                del samples[: len(samples) - self._KEEP]

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = {
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "corrupt": self.corrupt, "errors": self.errors,
                "read_bytes": self.read_bytes, "written_bytes": self.written_bytes,
            }
            for op, samples in self._latency.items():
                out[f"{op}_p50_ms"] = 1000 * statistics.median(samples) if samples else None
                out[f"{op}_p99_ms"] = 1000 * quantile(samples, 0.99) if samples else None
        return out


def quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def parse_bytes(text: str | int | None) -> int | None:
    """``"2GiB"``, ``"512MB"``, ``1000`` -> bytes; None or ``""`` -> no budget."""
    if text is None or text == "":
        return None
    if isinstance(text, int):
        return text
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "kb": 10**3, "mb": 10**6,
             "gb": 10**9, "tb": 10**12, "b": 1}
    raw = text.strip().lower().replace(" ", "")
    for unit, scale in units.items():
        if raw.endswith(unit):
            number = raw[: -len(unit)]
            break
    else:
        number, scale = raw, 1
    try:
        value = float(number)
    except ValueError:
        raise InvalidInputError(f"a byte budget looks like 512MiB, 2GB or 1000000, not {text!r}") from None
    if value < 0:
        raise InvalidInputError(f"a byte budget cannot be negative: {text!r}")
    return int(value * scale)
