"""4 threads and 2 processes reading and writing one store for 10 s: no error, and every
acknowledged entry reads back bit-exact afterwards."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from chunkcache.codec import get_codec
from chunkcache.kv import ChunkKV
from chunkcache.store import LmdbStore, MemoryTier, TieredStore

SECONDS = 10.0
WORKER = """
import json, sys, time, zlib, torch
from pathlib import Path
from chunkcache.codec import get_codec
from chunkcache.kv import ChunkKV
from chunkcache.store import LmdbStore
path, name, seconds, log = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), Path(sys.argv[4])
store = LmdbStore(path, get_codec("raw"))
end, i = time.monotonic() + seconds, 0
with log.open("w") as out:
    while time.monotonic() < end:
        key = f"{name}-{i}"
        g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        store.put(key, ChunkKV(torch.randn(2, 2, 1, 64, 8, generator=g), tuple(range(64)), 0, "m", "p"))
        out.write(key + "\\n"); out.flush()  # acknowledged
        for other in list(store.keys())[-5:]:
            store.get(other)
        i += 1
"""


def _expected(key: str) -> torch.Tensor:
    import zlib

    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return torch.randn(2, 2, 1, 64, 8, generator=g)


def test_threads_and_processes_share_a_store_without_errors_or_loss(store_path: Path, tmp_path: Path) -> None:
    logs = [tmp_path / f"p{i}.log" for i in range(2)]
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(store_path), f"p{i}", str(SECONDS), str(logs[i])])
        for i in range(2)
    ]
    store = TieredStore([MemoryTier("cpu", 64 * 1024), LmdbStore(store_path, get_codec("raw"))], get_codec("raw"))
    acknowledged: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(name: str) -> None:
        rng = random.Random(name)
        end, i = time.monotonic() + SECONDS, 0
        try:
            while time.monotonic() < end:
                key = f"{name}-{i}"
                store.put(key, ChunkKV(_expected(key), tuple(range(64)), 0, "m", "p"))
                with lock:
                    acknowledged.append(key)
                    sample = rng.sample(acknowledged, min(3, len(acknowledged)))
                for other in sample:
                    got = store.get(other)
                    if got is None or not torch.equal(got.kv, _expected(other)):
                        raise AssertionError(f"{other} did not read back")
                i += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"t{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        assert p.wait(timeout=60) == 0
    assert not errors, errors[:3]
    acknowledged += [k for log in logs for k in log.read_text().split()]
    assert len(acknowledged) > 50
    fresh = LmdbStore(store_path, get_codec("raw"))
    for key in acknowledged:
        got = fresh.get(key)
        assert got is not None and torch.equal(got.kv, _expected(key)), key
    assert fresh.corrupt_entries == 0
