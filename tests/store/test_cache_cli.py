"""`chunkcache cache stats|ls|evict|clear` on the configured disk store."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from chunkcache.codec import get_codec
from chunkcache.kv import ChunkKV
from chunkcache.store import LmdbStore
from tests.test_cli import chunkcache


def _fill(path: Path, n: int) -> int:
    store = LmdbStore(path, get_codec("raw"))
    for i in range(n):
        store.put(f"key{i}", ChunkKV(torch.randn(2, 2, 1, 32, 8), tuple(range(32)), 0, "m", "p"))
    size = store.size()
    store.close()
    return size


def test_stats_ls_evict_and_clear(tmp_path: Path) -> None:
    store = tmp_path / "store"
    size = _fill(store, 4)
    stats = chunkcache("cache", "stats", "--json", store=store)
    assert stats.returncode == 0, stats.stderr
    disk = json.loads(stats.stdout)["disk"]
    assert disk["entries"] == 4 and disk["bytes"] == size
    listing = chunkcache("cache", "ls", store=store).stdout.splitlines()
    assert len(listing) == 4 and all(line.split("\t")[0] == "disk" and line.split("\t")[3] == "32" for line in listing)
    assert chunkcache("cache", "evict", "key0", store=store).returncode == 0
    evicted = chunkcache("cache", "evict", "--to-bytes", str(size // 2), store=store)
    assert evicted.returncode == 0 and "by lru" in evicted.stdout
    assert json.loads(chunkcache("cache", "stats", "--json", store=store).stdout)["disk"]["bytes"] <= size // 2
    refused = chunkcache("cache", "clear", store=store)
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert chunkcache("cache", "clear", "--yes", store=store).returncode == 0
    assert json.loads(chunkcache("cache", "stats", "--json", store=store).stdout)["disk"]["entries"] == 0
