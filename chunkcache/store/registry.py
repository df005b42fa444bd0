"""The store's tiers, fastest first, in one table: how each is built from `Settings`, whether
`store_tiers: auto` includes it, what it needs, and whether it outlives the process. Adding a tier
is one `TierKind` here plus its own module; `build_store`, `store_tiers` checking, `chunkcache
cache` and precompute's size report all read this table."""

from __future__ import annotations

import os

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from chunkcache.codec import KVCodec
from chunkcache.errors import InvalidInputError
from chunkcache.store.memory import MemoryTier
from chunkcache.store.policy import get_policy, parse_bytes
from chunkcache.store.base import Tier
from chunkcache.store.tiered import TieredStore


@dataclass(frozen=True)
class TierKind:
    name: str
    persistent: bool  # outlives the process: `chunkcache cache` inspects it, precompute sizes it
    make: Callable[[Any, KVCodec], Tier]  # (settings, codec) -> the tier
    in_auto: Callable[[Any, bool], bool]  # (settings, model on a GPU) -> part of store_tiers=auto
    missing: Callable[[Any], str | None] = lambda settings: None  # what the settings lack for it


def _memory(name: str, device: str, budget: str) -> Callable[[Any, KVCodec], Tier]:
    return lambda s, codec: MemoryTier(name, parse_bytes(getattr(s, budget)), get_policy(s.eviction), device)


def _disk(s: Any, codec: KVCodec) -> Tier:
    from chunkcache.store.lmdb_store import LmdbStore

    return LmdbStore(s.store_path, codec, budget_bytes=parse_bytes(s.disk_budget), policy=get_policy(s.eviction))


def _remote(s: Any, codec: KVCodec) -> Tier:
    from chunkcache.store.remote import open_remote

    secret = os.environ.get(s.remote_key_env, "") if s.remote_key_env else ""
    return open_remote(s.remote_url, codec, timeout_s=s.remote_timeout_s, mac_key=secret.encode() or None)


def _remote_missing(s: Any) -> str | None:
    from chunkcache.store.remote import URL_HELP

    return None if s.remote_url else f"the remote tier needs remote_url: {URL_HELP}"


TIERS: tuple[TierKind, ...] = (
    # a gpu tier only serves a model that runs on the GPU
    TierKind("gpu", False, _memory("gpu", "cuda", "gpu_budget"), lambda s, on_gpu: on_gpu),
    TierKind("cpu", False, _memory("cpu", "cpu", "cpu_budget"), lambda s, on_gpu: True),
    TierKind("disk", True, _disk, lambda s, on_gpu: True),
    TierKind("remote", True, _remote, lambda s, on_gpu: bool(s.remote_url), _remote_missing),
)
TIER_NAMES = tuple(k.name for k in TIERS)
PERSISTENT_TIERS = tuple(k.name for k in TIERS if k.persistent)
_KINDS = {k.name: k for k in TIERS}


def on_gpu(settings: Any) -> bool:
    """Whether the model runs on a GPU ("auto" picks CUDA when present)."""
    device = str(settings.device)
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def tier_names(settings: Any, gpu: bool = False) -> list[str]:
    """The tiers ``settings.store_tiers`` names, fastest first (checked against the table)."""
    spec = settings.store_tiers
    if spec.strip() == "auto":
        return [k.name for k in TIERS if k.in_auto(settings, gpu)]
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in _KINDS]
    if unknown or not names:
        raise InvalidInputError(f"store_tiers takes 'auto' or a list of {', '.join(TIER_NAMES)}, got {spec!r}")
    if sorted(names, key=TIER_NAMES.index) != names or len(set(names)) != len(names):
        raise InvalidInputError(f"store_tiers must list each tier once, fastest first ({', '.join(TIER_NAMES)})")
    for name in names:
        missing = _KINDS[name].missing(settings)
        if missing:
            raise InvalidInputError(missing)
    return names


def build_store(settings: Any, codec: KVCodec, persistent_only: bool = False) -> TieredStore:
    """The `TieredStore` a `Settings` describes (only its tiers that outlive the process, for
    tools that inspect what is stored: memory tiers live in one process)."""
    names = tier_names(settings, on_gpu(settings))
    if persistent_only:
        names = [n for n in names if _KINDS[n].persistent]
        if not names:
            raise InvalidInputError(f"the configured store has no persistent tier ({', '.join(PERSISTENT_TIERS)})")
    return TieredStore([_KINDS[n].make(settings, codec) for n in names], codec, write_through=settings.write_through)
