"""`chunkcache bench store`: put/get throughput and latency of each tier for a real chunk of the
model, and the TTFT of CacheBlend with caches served from each tier, side by side with `full`."""

from __future__ import annotations

import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from chunkcache.engine import ChunkCacheEngine
from chunkcache.eval.datasets import Example
from chunkcache.kv import ChunkKV
from chunkcache.store import LmdbStore, MemoryTier, TieredStore
from chunkcache.store.policy import quantile


def _chunk_of(engine: ChunkCacheEngine, examples: Sequence[Example], tokens: int) -> ChunkKV:
    """A chunk of ``tokens`` tokens of real text, computed by the engine's model."""
    tokenizer = engine.model.tokenizer
    text = " ".join(p for e in examples for p in e.chunks)
    ids = tokenizer.encode(text, add_special_tokens=False)[:tokens]
    chunk = tokenizer.decode(ids)
    key = engine.precompute([chunk])[0]
    kv = engine.store.get(key)
    if kv is None:
        raise RuntimeError("the chunk just precomputed is not in the store")
    return kv


def _tier_io(tier: Any, kv: ChunkKV, codec: Any, count: int) -> dict[str, Any]:
    store = TieredStore([tier], codec)
    keys = [f"bench-{i}" for i in range(count)]
    start = time.perf_counter()
    for key in keys:
        store.put(key, kv)
    put_s = time.perf_counter() - start
    latencies = []
    for key in keys:
        t0 = time.perf_counter()
        got = store.get(key)
        latencies.append(time.perf_counter() - t0)
        if got is None:
            raise RuntimeError(f"tier {tier.name} lost {key}")
    total = kv.nbytes * count
    out = {
        "put_GBps": total / put_s / 1e9,
        "get_GBps": total / sum(latencies) / 1e9,
        "get_p50_ms": 1000 * statistics.median(latencies),
        "get_p99_ms": 1000 * quantile(latencies, 0.99),
        "entry_bytes_decoded": kv.nbytes,
        "entries": count,
    }
    for key in keys:
        store.delete(key)
    return out


def _ttft(engine: ChunkCacheEngine, example: Example, strategy: str, params: dict[str, Any], repeats: int) -> float:
    chunks = list(example.chunks)
    engine.answer(example.question, chunks, strategy=strategy, max_new_tokens=1, **params)  # warm
    return statistics.median(
        engine.answer(example.question, chunks, strategy=strategy, max_new_tokens=1, **params).ttft_s
        for _ in range(repeats)
    )


def bench_store(
    engine: ChunkCacheEngine, examples: Sequence[Example], remote_urls: Sequence[str], entry_tokens: int = 512,
    count: int = 20, repeats: int = 3, ratio: float = 0.15,
) -> dict[str, Any]:
    from chunkcache.store.remote import open_remote

    codec = engine.codec
    kv = _chunk_of(engine, examples, entry_tokens)
    tmp = Path(tempfile.mkdtemp(prefix="chunkcache-bench-store-"))
    tiers: dict[str, Any] = {
        "cpu": lambda: MemoryTier("cpu", None),
        "disk": lambda: LmdbStore(tmp / "disk", codec),
    }
    if torch.cuda.is_available():
        tiers = {"gpu": lambda: MemoryTier("gpu", None, device="cuda"), **tiers}
    for url in remote_urls:  # each remote backend measured as a tier of its own: remote:redis, remote:mooncake
        backend = "redis" if url.startswith(("redis", "unix")) else url.split(":", 1)[0]
        tiers[f"remote:{backend}"] = lambda url=url: open_remote(url, codec, namespace="chunkcache-bench")
    report: dict[str, Any] = {"tiers": {}, "ttft_s": {}}
    original = engine.store
    example = examples[0]
    try:
        for name, make in tiers.items():
            tier = make()
            report["tiers"][name] = _tier_io(tier, kv, codec, count)
            tier.close()
        report["ttft_s"]["full"] = _ttft(engine, example, "full", {}, repeats)
        for name, make in tiers.items():
            tier = make()
            engine.store = TieredStore([tier], codec)
            engine.precompute(list(example.chunks))
            report["ttft_s"][name] = _ttft(engine, example, "cacheblend", {"recompute_ratio": ratio}, repeats)
            engine.store.clear()
            engine.store.close()
    finally:
        engine.store = original
        shutil.rmtree(tmp, ignore_errors=True)
    cpu = report["ttft_s"].get("cpu")
    return {
        "model": engine.settings.model,
        "dtype": engine.settings.dtype,
        "codec": codec.spec,
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "entry_tokens": kv.num_tokens,
        "strategy": f"cacheblend:{ratio}",
        "prompt_chunks": len(example.chunks),
        **report,
        "ttft_vs_cpu": {k: v / cpu for k, v in report["ttft_s"].items()} if cpu else {},
    }


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"bench store: {report['model']} ({report['dtype']}), codec {report['codec']}, one chunk of "
        f"{report['entry_tokens']} tokens per entry; {report['machine']}",
        "",
        "| tier | put GB/s | get GB/s | get p50 ms | get p99 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, t in report["tiers"].items():
        lines.append(f"| {name} | {t['put_GBps']:.2f} | {t['get_GBps']:.2f} | {t['get_p50_ms']:.2f} | {t['get_p99_ms']:.2f} |")
    lines += ["", f"TTFT of {report['strategy']} ({report['prompt_chunks']} chunks) by the tier serving the caches:", "",
              "| served from | TTFT s | vs cpu |", "|---|---:|---:|"]
    for name, s in report["ttft_s"].items():
        ratio = report["ttft_vs_cpu"].get(name)
        lines.append(f"| {name} | {s:.3f} | {ratio:.2f}x |" if ratio else f"| {name} | {s:.3f} | - |")
    return "\n".join(lines)
