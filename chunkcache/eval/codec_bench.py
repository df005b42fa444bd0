"""`chunkcache bench codec`: size, speed and reconstruction error of every codec on real chunks,
and whether reading + decoding them from disk hides behind CacheBlend's recompute of the same
chunks (both measured in the same run)."""

from __future__ import annotations

import dataclasses

import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from chunkcache.codec import BENCH_CODECS, get_codec
from chunkcache.engine import ChunkCacheEngine
from chunkcache.eval.datasets import Example
from chunkcache.kv import ChunkKV
from chunkcache.store.lmdb_store import LmdbStore

BF16_BYTES = 2


def _rel_err(decoded: torch.Tensor, original: torch.Tensor, kind: int) -> list[float]:
    """Relative L2 error per layer of K (kind 0) or V (kind 1)."""
    d, o = decoded[:, kind].float(), original[:, kind].float()
    num = (d - o).flatten(1).norm(dim=1)
    den = o.flatten(1).norm(dim=1).clamp_min(1e-12)
    return (num / den).tolist()


def _timed(fn: Any, repeats: int) -> tuple[float, Any]:
    """Median seconds of ``repeats`` calls, and the last result."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _decode_all(codec: Any, blobs: list[bytes], device: torch.device) -> list[ChunkKV]:
    out = [codec.decode(b, device=device) for b in blobs]
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the kernels are asynchronous: time them to the end
    return out


def bench_codecs(
    engine: ChunkCacheEngine, example: Example, codecs: Sequence[str] = BENCH_CODECS, repeats: int = 3,
    recompute_ratio: float = 0.15, device: str | None = None,
) -> dict[str, Any]:
    """Size, speed and error of each codec over one example's chunk caches; decoding runs on
    ``device`` (default: the engine's), where the fused prefill would use the caches."""
    dev = torch.device(device) if device else engine.model.executor.device
    chunks = list(example.chunks)
    codec_before = engine.codec.spec
    engine.use_codec("raw")
    try:
        keys = engine.precompute(chunks)
        kvs: list[ChunkKV] = [kv for key in keys if (kv := engine.store.get(key)) is not None]
        answer = engine.answer(example.question, chunks, strategy="cacheblend", recompute_ratio=recompute_ratio,
                               max_new_tokens=1)
        recompute_s = statistics.median(
            (a := engine.answer(example.question, chunks, strategy="cacheblend", recompute_ratio=recompute_ratio,
                                max_new_tokens=1)).timings.get("select_s", 0.0) + a.timings.get("recompute_s", 0.0)
            for _ in range(repeats)
        )
    finally:
        engine.use_codec(codec_before)
    tokens = sum(kv.num_tokens for kv in kvs)
    model_bytes = sum(kv.nbytes for kv in kvs)
    elements = sum(kv.kv.numel() for kv in kvs)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        disk = LmdbStore(Path(tmp), get_codec("raw"))
        try:
            for spec in codecs:
                codec = get_codec(spec, engine.settings.zstd_level)
                enc_s, blobs = _timed(lambda: [codec.encode(kv) for kv in kvs], repeats)
                for i, blob in enumerate(blobs):
                    disk.put_bytes(f"{spec}/{i}", blob)
                read_s, _ = _timed(lambda: [disk.get_bytes(f"{spec}/{i}") for i in range(len(blobs))], repeats)
                _decode_all(codec, blobs[:1], dev)  # kernels compiled (numba, Triton) before timing
                dec_s, decoded = _timed(lambda: _decode_all(codec, blobs, dev), repeats)
                decoded = [dataclasses.replace(d, kv=d.kv.cpu()) for d in decoded]
                size = sum(len(b) for b in blobs)
                err_k = [e for kv, d in zip(kvs, decoded) for e in _rel_err(d.kv, kv.kv, 0)]
                err_v = [e for kv, d in zip(kvs, decoded) for e in _rel_err(d.kv, kv.kv, 1)]
                results[spec] = {
                    "bytes": size,
                    "bytes_per_token": size / tokens,
                    "bits_per_element": 8 * size / elements,
                    "ratio_vs_model_dtype": model_bytes / size,
                    "ratio_vs_bf16": elements * BF16_BYTES / size,
                    "encode_MBps": model_bytes / enc_s / 1e6,
                    "decode_MBps": model_bytes / dec_s / 1e6,
                    "decode_s": dec_s,
                    "disk_read_s": read_s,
                    "rel_err_k": statistics.fmean(err_k),
                    "rel_err_v": statistics.fmean(err_v),
                    "rel_err_k_max_layer": max(err_k),
                    "rel_err_v_max_layer": max(err_v),
                    "hides_behind_recompute": read_s + dec_s <= recompute_s,
                }
        finally:
            disk.close()
    int8 = results.get("int8")
    for r in results.values():
        r["ratio_vs_int8"] = int8["bytes"] / r["bytes"] if int8 else None
    return {
        "model": engine.settings.model,
        "dtype": engine.settings.dtype,
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "decode_device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "chunks": len(kvs),
        "tokens": tokens,
        "model_dtype_bytes": model_bytes,
        "cacheblend_recompute_s": recompute_s,
        "cacheblend_recompute_ratio": recompute_ratio,
        "cacheblend_prompt_tokens": answer.prompt_tokens,
        "codecs": results,
    }


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"bench codec: {report['model']} ({report['dtype']}), {report['chunks']} chunks, {report['tokens']} tokens, "
        f"{report['model_dtype_bytes'] / 1e6:.1f} MB of KV; {report['machine']}",
        f"cacheblend:{report['cacheblend_recompute_ratio']} recompute (select + recompute) of these chunks: "
        f"{report['cacheblend_recompute_s']:.3f} s",
        "",
        "| codec | bits/elem | vs bf16 | vs int8 | encode MB/s | decode MB/s | disk read + decode s | hides | rel err K | rel err V |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for name, r in report["codecs"].items():
        vs_int8 = f"{r['ratio_vs_int8']:.2f}x" if r["ratio_vs_int8"] else "-"
        lines.append(
            f"| {name} | {r['bits_per_element']:.2f} | {r['ratio_vs_bf16']:.2f}x | {vs_int8} | "
            f"{r['encode_MBps']:.0f} | {r['decode_MBps']:.0f} | {r['disk_read_s'] + r['decode_s']:.3f} | "
            f"{'yes' if r['hides_behind_recompute'] else 'no'} | {r['rel_err_k']:.4f} | {r['rel_err_v']:.4f} |"
        )
    return "\n".join(lines)
