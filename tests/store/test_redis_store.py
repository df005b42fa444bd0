"""The remote tier against a real redis-server: round trips, corruption, and the service going
away (answers still come, as misses)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import redis
import torch

from chunkcache.codec import get_codec
from chunkcache.kv import ChunkKV
from chunkcache.store import LmdbStore, MemoryTier, TieredStore
from chunkcache.store.redis_store import RedisStore
from tests.conftest import RedisServer

RAW = get_codec("raw")


def _kv(tokens: int = 16, seed: int = 0) -> ChunkKV:
    g = torch.Generator().manual_seed(seed)
    return ChunkKV(torch.randn(2, 2, 1, tokens, 4, generator=g), tuple(range(tokens)), 3, "m", "p")


def test_round_trip_with_metadata(redis_url: str) -> None:
    remote = RedisStore(redis_url, get_codec("kivi2"))
    remote.put("k", _kv())
    assert remote.contains("k") and list(remote.keys()) == ["k"] and len(remote) == 1
    info = remote.infos()[0]
    assert info.tokens == 16 and info.nbytes == len(remote.get_bytes("k"))
    back = remote.get("k", model_fingerprint="m")
    assert back is not None and back.kv.shape == _kv().kv.shape
    remote.delete("k")
    assert remote.get("k") is None and remote.stats.snapshot()["misses"] == 1


def test_a_flipped_byte_in_redis_is_detected_deleted_and_a_miss(redis_url: str) -> None:
    remote = RedisStore(redis_url, RAW)
    remote.put("k", _kv())
    client = redis.Redis.from_url(redis_url)
    data = bytearray(client.get("chunkcache:e:k"))
    data[len(data) // 2] ^= 0x01
    client.set("chunkcache:e:k", bytes(data))
    assert remote.get("k") is None
    assert remote.stats.snapshot()["corrupt"] == 1 and not remote.contains("k")


def test_promotion_from_remote_to_disk_and_memory(redis_url: str, store_path: Path) -> None:
    cpu, disk, remote = MemoryTier("cpu", None), LmdbStore(store_path, RAW), RedisStore(redis_url, RAW)
    remote.put("k", _kv())
    store = TieredStore([cpu, disk, remote], RAW)
    assert torch.equal(store.get("k").kv, _kv().kv)
    assert cpu.contains("k") and disk.contains("k")


def test_redis_going_down_means_misses_and_one_warning(
    redis_server: RedisServer, store_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    private = RedisServer(redis_server.folder)  # its own server: this test stops it
    private.start()
    try:
        remote = RedisStore(private.url, RAW, timeout_s=0.5, retry_s=0.2)
        store = TieredStore([LmdbStore(store_path, RAW), remote], RAW)
        store.put("k", _kv())
        private.stop()
        with caplog.at_level(logging.WARNING):
            assert remote.get("k") is None
            store.put("k2", _kv(seed=2))  # the disk tier still takes it; no exception
            assert store.get("k2") is not None and store.get("gone") is None
        warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
        assert len(warnings) == 1 and remote.stats.snapshot()["errors"] >= 1
        private.start()
        import time

        time.sleep(0.3)  # past retry_s: the tier tries the service again
        remote.put("k3", _kv(seed=3))
        assert remote.get("k3") is not None
    finally:
        private.stop()
