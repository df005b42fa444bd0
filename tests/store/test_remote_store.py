"""The remote tier's contract, for each backend against a real service (redis-server, Mooncake
Store): round trips with metadata, corruption detected and deleted, promotion into the tiers
above, the service going away (answers still come, as misses) and coming back."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from chunkcache.codec import get_codec
from chunkcache.errors import InvalidInputError
from chunkcache.kv import ChunkKV
from chunkcache.store import LmdbStore, MemoryTier, TieredStore
from chunkcache.store.encoded import EncodedTier
from chunkcache.store.mooncake_store import MooncakeStore, MooncakeURL
from chunkcache.store.redis_store import RedisStore
from chunkcache.store.remote import open_remote
from tests.conftest import RedisServer

RAW = get_codec("raw")


def _kv(tokens: int = 16, seed: int = 0) -> ChunkKV:
    g = torch.Generator().manual_seed(seed)
    return ChunkKV(torch.randn(2, 2, 1, tokens, 4, generator=g), tuple(range(tokens)), 3, "m", "p")


@dataclass
class Backend:
    """One remote service under test: how to open its tier, overwrite an object behind the
    tier's back, and stop / start the service."""

    name: str
    url: str
    namespace: str
    overwrite: Callable[[EncodedTier, str, bytes], None]
    stop: Callable[[], None]
    start: Callable[[], None]

    def open(self, codec=RAW, **kw) -> EncodedTier:  # type: ignore[no-untyped-def]
        return open_remote(self.url, codec, namespace=self.namespace, **kw)


def _redis_overwrite(tier: EncodedTier, name: str, data: bytes) -> None:
    tier.client.set(name, data)  # type: ignore[attr-defined]


def _mooncake_overwrite(tier: EncodedTier, name: str, data: bytes) -> None:
    tier._connected().upsert(name, data)  # type: ignore[attr-defined]


@pytest.fixture(params=["redis", "mooncake"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    namespace = f"t{uuid.uuid4().hex[:8]}"
    if request.param == "redis":
        server = RedisServer(tmp_path)  # its own server: the outage test stops it
        server.start()
        yield Backend("redis", server.url, namespace, _redis_overwrite, server.stop, server.start)
        server.stop()
    else:
        mc = request.getfixturevalue("mooncake_server")
        yield Backend("mooncake", mc.url, namespace, _mooncake_overwrite, mc.stop, mc.start)
        if mc.master is None:
            mc.start()


def test_round_trip_with_metadata(backend: Backend) -> None:
    remote = backend.open(get_codec("kivi2"))
    remote.put("k", _kv())
    assert remote.contains("k") and list(remote.keys()) == ["k"] and len(remote) == 1
    info = remote.infos()[0]
    assert info.tokens == 16 and info.nbytes == len(remote.get_bytes("k"))
    back = remote.get("k", model_fingerprint="m")
    assert back is not None and back.kv.shape == _kv().kv.shape
    remote.put("k", _kv(seed=5))  # a rewrite replaces the entry
    assert torch.allclose(remote.get("k").kv, get_codec("kivi2").decode(get_codec("kivi2").encode(_kv(seed=5))).kv)
    remote.delete("k")
    assert remote.get("k") is None and not remote.contains("k") and len(remote) == 0
    assert remote.stats.snapshot()["misses"] == 1 and remote.stats.snapshot()["errors"] == 0
    remote.close()


def test_flipped_bits_and_cut_entries_are_detected_deleted_and_misses(backend: Backend) -> None:
    import random

    rng = random.Random(5)
    remote = backend.open()
    for round_ in range(12):  # a bit flipped or the entry cut, at a random offset (header included)
        remote.put("k", _kv(seed=round_))
        data = bytearray(remote.get_bytes("k"))
        if round_ % 2:
            data = data[: rng.randrange(len(data))]
        else:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        backend.overwrite(remote, f"{backend.namespace}:e:k", bytes(data))
        assert remote.get("k") is None, f"round {round_}"
        assert remote.stats.snapshot()["corrupt"] == round_ + 1 and not remote.contains("k")
    remote.close()


def test_promotion_from_remote_to_disk_and_memory(backend: Backend, store_path: Path) -> None:
    cpu, disk, remote = MemoryTier("cpu", None), LmdbStore(store_path, RAW), backend.open()
    remote.put("k", _kv())
    store = TieredStore([cpu, disk, remote], RAW)
    assert torch.equal(store.get("k").kv, _kv().kv)
    assert cpu.contains("k") and disk.contains("k")
    store.close()


def test_the_service_going_down_means_misses_one_warning_then_recovery(
    backend: Backend, store_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    remote = backend.open(timeout_s=0.5, retry_s=0.2)
    bystander = backend.open(timeout_s=0.5)  # connected, but makes no call during the outage
    store = TieredStore([LmdbStore(store_path, RAW), remote], RAW)
    store.put("k", _kv())
    assert bystander.contains("k")
    backend.stop()
    with caplog.at_level(logging.WARNING):
        assert remote.get("k") is None
        store.put("k2", _kv(seed=2))  # the disk tier still takes it; no exception
        assert store.get("k2") is not None and store.get("gone") is None
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1 and remote.stats.snapshot()["errors"] >= 1
    backend.start()
    # its first call after the restart reconnects and lands (no lost write, no retry_s of misses)
    bystander.put("k4", _kv(seed=4))
    assert bystander.stats.snapshot()["errors"] == 0
    time.sleep(0.3)  # past retry_s: the tier tries the service again
    remote.put("k3", _kv(seed=3))
    assert remote.get("k3") is not None and remote.contains("k3") and remote.contains("k4")
    store.close()
    bystander.close()


def test_remote_urls_are_checked_before_anything_connects() -> None:
    assert isinstance(open_remote("redis://127.0.0.1:1/0", RAW), RedisStore)
    with pytest.raises(InvalidInputError, match="redis://HOST:6379/0 .* mooncake://"):
        open_remote("memcached://x:1", RAW)
    for bad, why in [("mooncake://host", "MASTER|HOST:PORT"), ("mooncake://h:1?sement=1GB", "unknown .*sement"),
                     ("mooncake://h:1?protocol=udp", "tcp or rdma"), ("mooncake://h:1?replicas=0", "replicas")]:
        with pytest.raises(InvalidInputError, match=why):
            MooncakeURL.parse(bad)
    c = MooncakeURL.parse("mooncake://10.0.0.5:50051?segment=1GiB&host=10.0.0.9")
    assert (c.master, c.metadata, c.admin, c.segment, c.host) == (
        "10.0.0.5:50051", "http://10.0.0.5:8080/metadata", "http://10.0.0.5:9003", 1 << 30, "10.0.0.9")


def test_mooncake_tier_setup_is_lazy_so_a_master_down_at_start_is_a_miss(caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("mooncake.store")
    remote = MooncakeStore("mooncake://127.0.0.1:9?metadata=http://127.0.0.1:9/metadata&host=127.0.0.1", RAW,
                           timeout_s=0.2)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        assert remote.get("k") is None and not remote.contains("k")
        remote.put("k", _kv())  # no exception
    assert time.monotonic() - start < 2  # not Mooncake's minute-long setup against no master
    assert remote.stats.snapshot()["errors"] == 1  # then skipped for retry_s
    assert any("unavailable" in r.getMessage() for r in caplog.records)


def test_a_mooncake_master_that_stops_answering_is_an_outage_not_a_hang(mooncake_server) -> None:  # type: ignore[no-untyped-def]
    import os
    import signal

    remote = MooncakeStore(mooncake_server.url, RAW, namespace=f"t{uuid.uuid4().hex[:8]}", timeout_s=0.5)
    remote.put("k", _kv())
    os.kill(mooncake_server.master.pid, signal.SIGSTOP)  # alive, accepting nothing: Mooncake waits forever
    try:
        start = time.monotonic()
        assert not remote.contains("k") and remote.get("k") is None
        assert time.monotonic() - start < 3 and remote.stats.snapshot()["errors"] == 1
    finally:
        os.kill(mooncake_server.master.pid, signal.SIGCONT)
    remote.close()


def test_a_full_mooncake_store_evicts_or_refuses_with_one_warning(
    mooncake_server, tmp_path: Path, caplog: pytest.LogCaptureFixture  # type: ignore[no-untyped-def]
) -> None:
    from chunkcache.eval.services import MooncakeServer

    small = MooncakeServer(tmp_path, segment="16MB")  # its capacity: 16 MB
    small.start()
    try:
        remote = MooncakeStore(small.url, RAW)
        with caplog.at_level(logging.WARNING):
            for i in range(12):  # 24 MB into 16 MB: no exception
                remote.put_bytes(f"k{i}", bytes([i]) * (2 << 20), tokens=1)
        kept = [i for i in range(12) if remote.contains(f"k{i}")]
        assert 0 < len(kept) < 12 and remote.get_bytes(f"k{kept[-1]}") == bytes([kept[-1]]) * (2 << 20)
        refusals = [r for r in caplog.records if "refused put" in r.getMessage()]
        assert len(refusals) <= 1 and all("segment" in r.getMessage() for r in refusals)
        remote.close()
    finally:
        small.close()


def test_with_a_key_only_sealed_entries_are_served(backend: Backend) -> None:
    remote = backend.open(mac_key=b"shared secret")
    remote.put("k", _kv())
    assert torch.equal(remote.get("k").kv, _kv().kv)  # its own sealed write reads back
    forged = RAW.encode(_kv(seed=9))  # a sound container (its checksum holds) written without the key
    backend.overwrite(remote, f"{remote._ns}:e:k", forged)
    assert remote.get("k") is None and remote.stats.snapshot()["corrupt"] == 1
    remote.put("a", _kv(seed=1))
    moved = remote.client.get(f"{remote._ns}:e:a") if backend.name == "redis" else None
    if moved is not None:  # a sealed entry copied under another key is refused too
        backend.overwrite(remote, f"{remote._ns}:e:b", moved)
        assert remote.get("b") is None
    other = backend.open(mac_key=b"another secret")
    assert other.get("a") is None  # signed with another key: a miss
    unkeyed = backend.open()  # a server without the key: it neither reads nor drops sealed entries
    assert unkeyed.get("a") is None and unkeyed.stats.snapshot()["corrupt"] == 0 and "a" not in set(unkeyed.keys())
    unkeyed.put("a", _kv(seed=2))  # its own unsealed entry, beside the sealed one
    assert torch.equal(remote.get("a").kv, _kv(seed=1).kv) and torch.equal(unkeyed.get("a").kv, _kv(seed=2).kv)
    remote.close()
    other.close()
    unkeyed.close()
