"""Does a chunk entry need per-layer objects or ranged reads in Mooncake Store so fusion can start
before the last byte arrives? Times, per codec, reading a whole entry from a Mooncake Store on
loopback (`MooncakeStore.get_bytes`) against decoding it (`decode_entry`), for Qwen2.5-0.5B- and
Llama-8B-shaped chunks of 512 tokens (random KV: sizes and speeds, not fidelity)."""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from chunkcache.codec import decode_entry, get_codec
from chunkcache.eval.services import MooncakeServer
from chunkcache.kv import ChunkKV
from chunkcache.store.mooncake_store import MooncakeStore

SHAPES = {"qwen2.5-0.5b": (24, 2, 64), "llama-8b": (32, 8, 128)}  # layers, kv heads, head dim
TOKENS, REPEATS = 512, 7


def main(out: Path) -> None:
    folder = Path(tempfile.mkdtemp())
    server = MooncakeServer(folder, segment="2GB")
    server.start()
    rows = []
    try:
        tier = MooncakeStore(server.url, get_codec("raw"), namespace="research")
        for model, (layers, heads, dim) in SHAPES.items():
            g = torch.Generator().manual_seed(0)
            kv = ChunkKV(torch.randn(layers, 2, heads, TOKENS, dim, generator=g), tuple(range(TOKENS)), 0, "m", "p")
            for spec in ("int8", "cachegen-2"):
                data = get_codec(spec).encode(kv)
                tier.put_bytes(f"{model}-{spec}", data, TOKENS)
                reads, decodes = [], []
                for _ in range(REPEATS):
                    start = time.perf_counter()
                    got = tier.get_bytes(f"{model}-{spec}")
                    reads.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    decode_entry(got)
                    decodes.append(time.perf_counter() - start)
                row = {"model": model, "codec": spec, "entry_MB": len(data) / 1e6,
                       "read_ms": 1000 * statistics.median(reads), "decode_ms": 1000 * statistics.median(decodes)}
                row["read_share"] = row["read_ms"] / (row["read_ms"] + row["decode_ms"])
                rows.append(row)
                print(json.dumps(row), flush=True)
        tier.close()
    finally:
        server.close()
    out.write_text(json.dumps({"tokens": TOKENS, "repeats": REPEATS, "rows": rows}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("results.json"))
