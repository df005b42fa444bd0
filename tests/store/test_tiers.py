"""Memory tiers, eviction policies and the `TieredStore`: budgets, promotion, write policies,
corruption falling through to a miss, layer streaming (version-1 entries too)."""

from __future__ import annotations

import hashlib
import json
import struct
import time
from pathlib import Path

import pytest
import torch
import zstandard

from chunkcache.codec import get_codec
from chunkcache.errors import InvalidInputError
from chunkcache.kv import ChunkKV
from chunkcache.store import LmdbStore, MemoryTier, TieredStore
from chunkcache.store.policy import CostAware, EntryInfo, LRU, parse_bytes
from chunkcache.config import Settings
from chunkcache.store.registry import tier_names

RAW = get_codec("raw")


def _kv(tokens: int = 8, seed: int = 0) -> ChunkKV:
    g = torch.Generator().manual_seed(seed)
    return ChunkKV(torch.randn(2, 2, 1, tokens, 4, generator=g), tuple(range(tokens)), 3, "m", "p")


def test_memory_tier_stays_within_budget_and_evicts_least_recently_used() -> None:
    size = _kv().nbytes
    tier = MemoryTier("cpu", budget_bytes=3 * size)
    for i in range(3):
        tier.put(f"k{i}", _kv(seed=i))
    assert tier.get("k0") is not None  # k0 is now the most recently used
    tier.put("k3", _kv(seed=3))
    assert tier.size() <= 3 * size and not tier.contains("k1")
    assert {k for k in tier.keys()} == {"k0", "k2", "k3"}
    assert tier.stats.snapshot()["evictions"] == 1
    tier.put("huge", _kv(tokens=100))  # bigger than the whole budget: not kept, nothing evicted
    assert not tier.contains("huge") and len(tier) == 3


def test_cost_aware_policy_keeps_what_saves_most_recompute_per_byte() -> None:
    entries = [
        EntryInfo("cold-big", nbytes=1000, tokens=10, hits=0, last_access=3.0),
        EntryInfo("hot", nbytes=1000, tokens=10, hits=9, last_access=1.0),
        EntryInfo("dense", nbytes=100, tokens=10, hits=0, last_access=2.0),
    ]
    assert [e.key for e in CostAware().order(entries)] == ["cold-big", "hot", "dense"]
    assert [e.key for e in LRU().order(entries)] == ["hot", "dense", "cold-big"]
    tier = MemoryTier("cpu", budget_bytes=2 * _kv().nbytes, policy=CostAware())
    tier.put("a", _kv(seed=1))
    tier.put("b", _kv(seed=2))
    for _ in range(3):
        tier.get("a")
    tier.put("c", _kv(seed=3))
    assert tier.contains("a") and not tier.contains("b")


def test_disk_tier_budget_is_never_exceeded_and_evicts_by_policy(store_path: Path) -> None:
    blob_size = len(RAW.encode(_kv()))
    disk = LmdbStore(store_path, RAW, budget_bytes=3 * blob_size)
    for i in range(3):
        disk.put(f"k{i}", _kv(seed=i))
        time.sleep(0.01)
    assert disk.get("k0") is not None
    disk.put("k3", _kv(seed=3))
    assert disk.size() <= 3 * blob_size
    assert set(disk.keys()) == {"k0", "k2", "k3"} and disk.stats.snapshot()["evictions"] == 1
    disk.close()
    reopened = LmdbStore(store_path, RAW, budget_bytes=3 * blob_size)
    assert set(reopened.keys()) == {"k0", "k2", "k3"}  # metadata survives a reopen
    reopened.close()


def test_the_disk_budget_holds_through_replacements_deletes_and_other_writers(store_path: Path) -> None:
    blob = b"x" * 1000
    unbounded = LmdbStore(store_path, RAW)  # another writer without a budget keeps the total too
    for i in range(4):
        unbounded.put_bytes(f"u{i}", blob, tokens=1)
    unbounded.close()
    disk = LmdbStore(store_path, RAW, budget_bytes=5000)
    disk.put_bytes("u0", b"y" * 1500, tokens=1)  # a replacement counts its new size only
    assert disk.size() == 4500 and len(disk) == 4
    disk.delete("u1")
    for i in range(6):
        disk.put_bytes(f"n{i}", blob, tokens=1)
        assert disk.size() <= 5000
    assert 4000 <= disk.size() <= 5000  # a wrong running total would evict too much or too little
    assert disk.stats.snapshot()["evictions"] >= 4
    disk.close()


def test_the_running_total_equals_a_scan_after_any_mix_of_writes(store_path: Path) -> None:
    import random

    rng = random.Random(7)
    disk = LmdbStore(store_path, RAW, budget_bytes=20_000)
    for i in range(5):  # exactly the budget: nothing to evict (a total counted twice evicted here)
        disk.put_bytes(f"k{i}", b"x" * 4000, tokens=1)
        assert disk.size() == 4000 * (i + 1)
    assert len(disk) == 5 and disk.stats.snapshot()["evictions"] == 0
    for step in range(120):
        key, op = f"k{rng.randrange(12)}", rng.random()
        if op < 0.6:
            disk.put_bytes(key, b"x" * rng.randrange(1, 4000), tokens=1)
        elif op < 0.9:
            disk.delete(key)
        else:
            disk.close()  # a reopen reads the total the last writer left
            disk = LmdbStore(store_path, RAW, budget_bytes=20_000)
        assert disk.size() == sum(i.nbytes for i in disk.infos()), f"step {step}"
    disk.close()


def test_a_hit_in_a_lower_tier_is_promoted(store_path: Path) -> None:
    cpu, disk = MemoryTier("cpu", None), LmdbStore(store_path, RAW)
    store = TieredStore([cpu, disk], RAW)
    disk.put("k", _kv())
    assert not cpu.contains("k")
    got = store.get("k")
    assert got is not None and torch.equal(got.kv, _kv().kv)
    assert cpu.contains("k")
    stats = store.stats()
    assert stats["cpu"]["misses"] == 1 and stats["disk"]["hits"] == 1
    store.get("k")
    assert store.stats()["cpu"]["hits"] == 1


def test_write_through_and_write_back(store_path: Path, tmp_path: Path) -> None:
    cpu, disk = MemoryTier("cpu", None), LmdbStore(store_path, RAW)
    TieredStore([cpu, disk], RAW).put("k", _kv())
    assert cpu.contains("k") and disk.contains("k")

    size = _kv().nbytes
    cpu2, disk2 = MemoryTier("cpu", 2 * size), LmdbStore(tmp_path / "back", RAW)
    back = TieredStore([cpu2, disk2], RAW, write_through=False)
    back.put("a", _kv(seed=1))
    back.put("b", _kv(seed=2))
    assert not disk2.contains("a")  # only the first tier so far
    back.put("c", _kv(seed=3))  # evicts a from memory: it is written down, not lost
    assert disk2.contains("a") and torch.equal(back.get("a").kv, _kv(seed=1).kv)


def test_memory_tiers_hold_what_a_lossy_codec_returns(store_path: Path) -> None:
    codec = get_codec("int8")
    cpu, disk = MemoryTier("cpu", None), LmdbStore(store_path, codec)
    store = TieredStore([cpu, disk], codec)
    kv = _kv(tokens=32)
    store.put("k", kv)
    assert torch.equal(cpu.get("k").kv, disk.get("k").kv)  # same answer whichever tier serves it
    assert not torch.equal(cpu.get("k").kv, kv.kv)


def test_a_corrupt_disk_entry_is_deleted_counted_and_read_from_the_next_tier(store_path: Path, tmp_path: Path) -> None:
    disk, lower = LmdbStore(store_path, RAW), LmdbStore(tmp_path / "lower", RAW)
    lower.name = "lower"  # stands in for the remote tier
    store = TieredStore([disk, lower], RAW)
    store.put("k", _kv())
    data = bytearray(disk.get_bytes("k"))
    data[len(data) // 3] ^= 0x10
    disk.put_bytes("k", bytes(data))
    got = store.get("k")
    assert got is not None and torch.equal(got.kv, _kv().kv)  # served from the intact tier
    assert store.stats()["disk"]["corrupt"] == 1
    assert torch.equal(disk.get("k").kv, _kv().kv)  # and promoted back, intact
    lower.put_bytes("k", bytes(data))
    disk.delete("k")
    assert store.get("k") is None  # corrupt everywhere: a miss (the engine recomputes)


def _version1(kv: ChunkKV) -> bytes:
    """An entry as chunkcache wrote them before the layered format: raw, one zstd'd tensor."""
    header = {"codec": "raw", "dtype": "float32", "shape": list(kv.kv.shape), "raw_bytes": kv.nbytes,
              "token_ids": list(kv.token_ids), "position_offset": kv.position_offset,
              "model_fingerprint": kv.model_fingerprint, "prefix_fingerprint": kv.prefix_fingerprint}
    head = json.dumps(header).encode()
    body = struct.pack("<4sHI", b"CCKV", 1, len(head)) + head + zstandard.compress(kv.kv.numpy().tobytes())
    return body + hashlib.blake2b(body, digest_size=32).digest()


def test_streamed_layers_from_every_tier_and_container_version(store_path: Path) -> None:
    codec = get_codec("cachegen-3")
    cpu, disk = MemoryTier("cpu", None), LmdbStore(store_path, codec)
    store = TieredStore([cpu, disk], codec)
    for i in range(2):
        disk.put(f"k{i}", _kv(tokens=20, seed=i))
    old = _kv(tokens=20, seed=9)
    disk.put_bytes("v1", _version1(old))
    cpu.put("held", _kv(seed=5))
    streams = store.stream(["k0", "k1", "v1", "held", "missing"], model_fingerprint="m")
    assert [s.found() for s in streams] == [True, True, True, True, False]
    for stream, want in zip(streams[:4], [disk.get("k0"), disk.get("k1"), old, _kv(seed=5)]):
        layers = [stream.layer(i) for i in range(stream.num_layers)]
        assert torch.equal(torch.stack(layers), want.kv)
        assert (stream.token_ids, stream.position_offset) == (want.token_ids, want.position_offset)
    for key in ("k0", "k1", "v1"):
        deadline = time.monotonic() + 5
        while not cpu.contains(key) and time.monotonic() < deadline:
            time.sleep(0.01)  # promoted once every layer was read, after the stream's last layer
        assert cpu.contains(key)
    assert torch.equal(store.get("v1").kv, old.kv)
    assert store.stream(["k0"], model_fingerprint="another model")[0].found() is False


def _tiers(spec: str, remote_url: str = "", gpu: bool = False) -> list[str]:
    return tier_names(Settings.load(env={}, store_tiers=spec, remote_url=remote_url), gpu)


def test_settings_name_the_tiers_and_budgets() -> None:
    assert _tiers("cpu,disk") == ["cpu", "disk"]
    assert _tiers("auto", "redis://x") == ["cpu", "disk", "remote"] and _tiers("auto") == ["cpu", "disk"]
    assert _tiers("auto", gpu=True)[0] == "gpu"
    for bad in ("disk,cpu", "cpu,cpu", "tape", ""):
        with pytest.raises(InvalidInputError):
            _tiers(bad)
    with pytest.raises(InvalidInputError, match="remote_url"):
        _tiers("cpu,remote")
    assert parse_bytes("2GiB") == 2 << 30 and parse_bytes("512MB") == 512 * 10**6 and parse_bytes("") is None
    with pytest.raises(InvalidInputError):
        parse_bytes("lots")


def test_streams_deliver_layers_in_order_and_report_misses(store_path: Path) -> None:
    codec = get_codec("int8")
    cpu, disk = MemoryTier("cpu", None), LmdbStore(store_path, codec)
    store = TieredStore([cpu, disk], codec)
    disk.put("k", _kv(tokens=24))
    hit, miss = store.stream(["k", "nope"])
    assert hit.found() and not miss.found()
    assert hit.token_ids == tuple(range(24)) and hit.position_offset == 3
    assert torch.equal(torch.stack([hit.layer(0), hit.layer(1)]), disk.get("k").kv)
    assert hit.load_s > 0 and hit.wait_s >= 0
    for _ in range(100):  # promotion happens right after the last layer, in the background
        if cpu.contains("k"):
            break
        time.sleep(0.01)
    assert cpu.contains("k")


@pytest.mark.parametrize("spec", ["int8", "kivi2"])
def test_for_a_gpu_layers_stream_encoded_and_the_memory_tier_gets_them_decoded(
    store_path: Path, monkeypatch: pytest.MonkeyPatch, spec: str
) -> None:
    """Bound for a GPU, a disk hit streams encoded layers (the device decodes them as fusion
    reaches them); each decodes to what the host decoder gives, and the CPU tier is still
    promoted with the decoded chunk. (No GPU here: a CUDA runtime is pretended and the encoded
    layers decode onto the CPU; cachegen's, through its kernel, in tests/codec/test_rans.py.)"""
    import chunkcache.codec.base as codec_base

    monkeypatch.setattr(codec_base, "cuda_runtime", lambda device: True)
    codec = get_codec(spec)
    cpu, disk = MemoryTier("cpu", None), LmdbStore(store_path, codec)
    store = TieredStore([cpu, disk], codec)
    disk.put("k", _kv(tokens=24))
    (hit,) = store.stream(["k"], device="cuda")
    assert hit.found()
    expected = disk.get("k").kv
    for i in range(2):
        layer = hit.layer(i)
        assert not isinstance(layer, torch.Tensor) and layer.device.type == "cpu" and layer.shape == (2, 1, 24, 4)
        decoded = torch.empty(2, 1, 24, 4)
        layer.into(decoded)
        assert torch.equal(decoded, expected[i])
    for _ in range(200):
        if cpu.contains("k"):
            break
        time.sleep(0.01)
    assert torch.equal(cpu.get("k").kv, expected)


def test_a_stream_that_fails_after_its_header_raises_only_for_missing_layers() -> None:
    from chunkcache.errors import CorruptCacheError
    from chunkcache.store.stream import LayerStream

    stream = LayerStream("k")
    stream.start(3, (1, 2), 0, "m", "p")
    stream.push(torch.zeros(2, 1, 2, 4))
    stream.fail(CorruptCacheError("layer 1 is damaged"))
    assert stream.found()  # its header and first layer are good
    assert stream.layer(0).shape == (2, 1, 2, 4)
    with pytest.raises(CorruptCacheError, match="layer 1 is damaged"):
        stream.layer(1)
    early = LayerStream("e")
    early.fail(CorruptCacheError("unreadable"))
    assert not early.found()  # nothing usable: read as a miss, and the chunk is recomputed


def test_an_entry_of_a_newer_format_is_a_miss_but_is_kept(store_path: Path) -> None:
    import hashlib
    import struct

    from chunkcache.codec.base import MAGIC

    disk = LmdbStore(store_path, RAW)
    body = bytearray(RAW.encode(_kv())[:-32])
    struct.pack_into("<4sH", body, 0, MAGIC, 99)
    disk.put_bytes("k", bytes(body) + hashlib.blake2b(bytes(body), digest_size=32).digest())
    assert TieredStore([disk], RAW).get("k") is None
    assert disk.contains("k") and disk.stats.snapshot()["corrupt"] == 0


def test_write_back_keeps_each_entry_s_codec_and_flushes_on_close(tmp_path: Path) -> None:
    lossy = get_codec("cachegen-2")
    size = _kv(tokens=32).nbytes
    cpu, disk = MemoryTier("cpu", 2 * size), LmdbStore(tmp_path / "d", RAW)
    store = TieredStore([cpu, disk], RAW, write_through=False)
    store.put("lossy", _kv(tokens=32, seed=1), lossy)
    store.put("plain", _kv(tokens=32, seed=2))
    store.put("third", _kv(tokens=32, seed=3))  # evicts "lossy": written down with ITS codec
    from chunkcache.codec import read_header

    assert read_header(disk.get_bytes("lossy"))["codec"] == "cachegen"
    store.put("huge", _kv(tokens=200, seed=4))  # bigger than the memory budget: straight down
    assert disk.contains("huge")
    store.get("lossy")  # promoted back: clean, so evicting it again writes nothing new
    store.close()  # "plain"/"third" were only in memory: flushed now
    reopened = LmdbStore(tmp_path / "d", RAW)
    assert {"lossy", "plain", "third", "huge"} <= set(reopened.keys())
    assert torch.equal(reopened.get("plain").kv, _kv(tokens=32, seed=2).kv)
