"""The lmdb store persists entries across processes, grows, and turns corruption into misses."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from chunkcache.codec import RawCodec
from chunkcache.kv import ChunkKV
from chunkcache.store import LmdbStore, chunk_key, prefix_fingerprint


def _kv(tokens: int = 4) -> ChunkKV:
    return ChunkKV(torch.randn(2, 2, 1, tokens, 4), tuple(range(tokens)), 9, "m", "p")


def test_put_get_contains_delete(store_path: Path) -> None:
    store = LmdbStore(store_path, RawCodec())
    kv = _kv()
    assert store.get("k") is None and not store.contains("k")
    store.put("k", kv)
    assert store.contains("k") and len(store) == 1
    assert torch.equal(store.get("k").kv, kv.kv)
    store.delete("k")
    assert store.get("k") is None


def test_corrupt_entry_is_deleted_and_counted_as_a_miss(store_path: Path) -> None:
    store = LmdbStore(store_path, RawCodec())
    store.put("k", _kv())
    data = bytearray(store.get_bytes("k"))
    data[len(data) // 2] ^= 0xFF
    store.put_bytes("k", bytes(data))
    assert store.get("k") is None
    assert store.corrupt_entries == 1
    assert not store.contains("k")


def test_map_grows_when_full(store_path: Path) -> None:
    store = LmdbStore(store_path, RawCodec(), map_size=1 << 16)
    big = ChunkKV(torch.randn(2, 2, 2, 512, 16), tuple(range(512)), 0, "m", "p")
    for i in range(4):
        store.put(f"k{i}", big)
    assert len(store) == 4 and store.get("k3") is not None


def test_a_map_grown_by_another_process_is_adopted(store_path: Path) -> None:
    store = LmdbStore(store_path, RawCodec(), map_size=1 << 16)
    store.put("small", _kv())
    code = (
        "import torch; from pathlib import Path; from chunkcache.codec import RawCodec;"
        "from chunkcache.kv import ChunkKV; from chunkcache.store import LmdbStore;"
        f"s = LmdbStore(Path({str(store_path)!r}), RawCodec(), map_size=1 << 16);"
        "[s.put(f'big{i}', ChunkKV(torch.randn(2, 2, 2, 512, 16), tuple(range(512)), 0, 'm', 'p')) for i in range(4)]"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert store.get("big3") is not None and store.get("small") is not None
    store.put("after", _kv())
    assert len(store) == 6


def test_another_process_reads_what_this_one_wrote(store_path: Path) -> None:
    store = LmdbStore(store_path, RawCodec())
    kv = _kv()
    store.put("shared", kv)
    code = (
        "import sys, torch; from pathlib import Path; from chunkcache.codec import RawCodec;"
        "from chunkcache.store import LmdbStore;"
        f"kv = LmdbStore(Path({str(store_path)!r}), RawCodec()).get('shared');"
        "print(kv.kv.sum().item(), kv.position_offset)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert abs(float(out[0]) - kv.kv.sum().item()) < 1e-4 and out[1] == "9"


def test_keys_are_deterministic_across_processes_and_sensitive_to_inputs() -> None:
    expr = "chunk_key('fp', prefix_fingerprint('fp', [1, 2]), 'raw', [5, 6, 7])"
    code = f"from chunkcache.store import chunk_key, prefix_fingerprint; print({expr})"
    runs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout.strip()
        for seed in ("1", "2")
    }
    here = chunk_key("fp", prefix_fingerprint("fp", [1, 2]), "raw", [5, 6, 7])
    assert runs == {here} and len(here) == 64
    variants = {
        chunk_key("fp2", prefix_fingerprint("fp", [1, 2]), "raw", [5, 6, 7]),
        chunk_key("fp", prefix_fingerprint("fp", [1, 3]), "raw", [5, 6, 7]),
        chunk_key("fp", prefix_fingerprint("fp", [1, 2]), "int8", [5, 6, 7]),
        chunk_key("fp", prefix_fingerprint("fp", [1, 2]), "raw", [5, 6, 8]),
    }
    assert here not in variants and len(variants) == 4


def test_process_killed_mid_write_leaves_every_acknowledged_entry_intact(store_path: Path, tmp_path: Path) -> None:
    log = tmp_path / "acknowledged.log"
    code = (
        "import sys, torch; from pathlib import Path; from chunkcache.codec import RawCodec;"
        "from chunkcache.kv import ChunkKV; from chunkcache.store import LmdbStore;"
        f"s = LmdbStore(Path({str(store_path)!r}), RawCodec()); out = open({str(log)!r}, 'w');"
        "i = 0\nwhile True:\n"
        "    g = torch.Generator().manual_seed(i)\n"
        "    s.put(f'k{i}', ChunkKV(torch.randn(4, 2, 2, 256, 32, generator=g), tuple(range(256)), 0, 'm', 'p'))\n"
        "    out.write(f'{i}\\n'); out.flush(); i += 1"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.2)
            if log.exists() and len(log.read_text().split()) >= 5:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    store = LmdbStore(store_path, RawCodec())
    acknowledged = [int(i) for i in log.read_text().split()]
    assert len(acknowledged) >= 5
    for i in acknowledged:
        g = torch.Generator().manual_seed(i)
        got = store.get(f"k{i}")
        assert got is not None and torch.equal(got.kv, torch.randn(4, 2, 2, 256, 32, generator=g))
    assert all(store.get(k) is not None for k in store.keys())  # no torn entry is visible
    assert store.corrupt_entries == 0


def test_two_stores_on_one_folder_in_one_process_share_it(store_path: Path) -> None:
    first, second = LmdbStore(store_path, RawCodec()), LmdbStore(store_path, RawCodec())
    first.put("k", _kv())
    assert second.contains("k")
    first.close()
    first.close()  # closing twice is harmless
    assert second.get("k") is not None  # the other store still works
    second.close()
    third = LmdbStore(store_path, RawCodec())
    assert third.contains("k")
    third.close()


def test_entries_decode_by_their_own_codec_and_foreign_models_miss(store_path: Path) -> None:
    from chunkcache.codec import get_codec

    store = LmdbStore(store_path, RawCodec())
    kv = _kv(tokens=40)
    store.put("lossy", kv, get_codec("int8"))
    back = store.get("lossy", model_fingerprint="m")
    assert back is not None and not torch.equal(back.kv, kv.kv)
    assert torch.allclose(back.kv, kv.kv, atol=kv.kv.abs().max().item() / 100)
    assert store.get("lossy", model_fingerprint="another model") is None
    assert store.corrupt_entries == 1 and not store.contains("lossy")


_DAMAGE_CHILD = r'''
import json, logging, random, struct, sys
from pathlib import Path
from chunkcache.codec import RawCodec
from chunkcache.store import LmdbStore
folder, seed = Path(sys.argv[1]), int(sys.argv[2])
store = LmdbStore(folder, RawCodec())
rng = random.Random(0)
for i in range(60):
    store.put_bytes(f"{i:064x}", rng.randbytes(200 + 37 * i), tokens=10)
store.close()
data = bytearray((folder / "data.mdb").read_bytes())
tree = [p for p in range(2, len(data) // 4096) if struct.unpack_from("<H", data, p * 4096 + 10)[0] & 0x03]
rng = random.Random(seed)
for _ in range(4):  # bits of branch and leaf page headers: lmdb's own structure, not entry bytes
    data[rng.choice(tree) * 4096 + rng.randrange(10, 40)] ^= 1 << rng.randrange(8)
(folder / "data.mdb").write_bytes(bytes(data))
logging.disable(logging.CRITICAL)
store = LmdbStore(folder, RawCodec(), budget_bytes=10**6)
keys = list(store.keys())
store.infos(); store.size(); len(store)
served = sum(store.get_bytes(k) is not None for k in keys)
store.put_bytes("f" * 64, b"x" * 5000, tokens=3); store.contains("f" * 64); store.delete("0" * 64)
damaged = store._damaged
store.clear()  # the way back: a damaged database is moved aside, a new one started
store.put_bytes("e" * 64, b"y" * 100, tokens=1)
print(json.dumps({"damaged": damaged, "served": served, "recovered": store.get_bytes("e" * 64) == b"y" * 100,
                  "kept": [p.name for p in folder.glob("data.mdb.damaged-*")]}))
store.close()
'''


def test_damaged_lmdb_pages_are_misses_and_clear_recovers(tmp_path: Path) -> None:
    outcomes = []
    for seed in range(10):  # seeded damage to a fixed layout; a crash would fail the child, not pytest
        run = subprocess.run([sys.executable, "-c", _DAMAGE_CHILD, str(tmp_path / f"s{seed}"), str(seed)],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, f"seed {seed}: {run.stderr[-2000:]}"
        outcomes.append(json.loads(run.stdout))
    assert all(o["recovered"] for o in outcomes)
    assert all(o["kept"] for o in outcomes if o["damaged"])  # moved aside, not deleted
    assert sum(o["damaged"] for o in outcomes) >= 4  # many seeds reached lmdb's corruption reports
