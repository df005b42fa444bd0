"""`chunkcache bench precompute`: precompute throughput on a corpus of real passages, beside the
bare batched prefill loop on the same chunks (interleaved batches), into a throwaway store."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from chunkcache.engine import ChunkCacheEngine
from chunkcache.eval.datasets import load_examples
from chunkcache.eval.machine import describe
from chunkcache.jobs.precompute import precompute_texts
from chunkcache.retriever import Chunker

_PASSAGES_PER_DOCUMENT = 8  # passages are shorter than a chunk: documents of several are chunked


def corpus_chunks(paths: Sequence[Path], count: int, chunker: Chunker) -> list[str]:
    """``count`` chunks of the datasets' distinct passages, joined into documents of several
    passages in file order and cut by ``chunker``."""
    passages = list(dict.fromkeys(p for path in paths for e in load_examples(path) for p in e.chunks))
    chunks: list[str] = []
    for start in range(0, len(passages), _PASSAGES_PER_DOCUMENT):
        text = " ".join(passages[start : start + _PASSAGES_PER_DOCUMENT])
        chunks.extend(text[s:e] for s, e in chunker.split(text))
        if len(chunks) >= count:
            return chunks[:count]
    raise ValueError(f"the datasets give only {len(chunks)} chunks of {chunker.size} tokens; {count} were asked")


def bench_precompute(
    engine: ChunkCacheEngine, paths: Sequence[Path], count: int = 2000, chunk_tokens: int = 256,
    batch_size: int | None = None, bare_every: int = 5, progress: bool = True,
) -> dict[str, Any]:
    """Precompute ``count`` chunks into a temporary store with the engine's model, codec and
    tiers, timing the bare batched prefill loop on every ``bare_every``-th batch beside it."""
    texts = corpus_chunks(paths, count, Chunker(engine.model.tokenizer, chunk_tokens, 0, name=engine.settings.model))
    tokens = [len(engine.model.template.chunk_ids(t)) for t in texts]
    scratch = Path(tempfile.mkdtemp(prefix="chunkcache-bench-precompute-"))
    try:
        settings = replace(engine.settings, store_path=scratch)
        with ChunkCacheEngine(settings, model=engine.model) as bench_engine:
            summary = precompute_texts(bench_engine, texts, batch_size, progress, bare_every)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "model": engine.settings.model,
        "dtype": engine.settings.dtype,
        "codec": engine.codec.spec,
        "store_tiers": engine.settings.store_tiers,
        "device": describe(engine.model.executor.device),
        "datasets": [str(p) for p in paths],
        "chunk_tokens": chunk_tokens,
        "chunk_tokens_mean": sum(tokens) / len(tokens),
        "chunk_tokens_min": min(tokens),
        "chunk_tokens_max": max(tokens),
        "summary": summary.to_dict(),
    }


def format_table(report: dict[str, Any]) -> str:
    s = report["summary"]
    return "\n".join([
        f"precompute: {report['model']} ({report['dtype']}, codec {report['codec']}), {s['computed']} chunks of "
        f"{report['chunk_tokens_mean']:.0f} tokens on average, batches of {s['batch_size']}",
        "| loop | tokens/s | chunks/s |",
        "|---|---:|---:|",
        f"| precompute (prefill + encode + store) | {s['tokens_per_s']:.0f} | {s['chunks_per_s']:.2f} |",
        f"| bare batched prefill ({s['bare_batches']} of the same batches) | {s['bare_tokens_per_s'] or 0:.0f} | |",
        f"precompute / bare on the same batches: {s['vs_bare'] or 0:.1%}; stored "
        f"{(s['stored_bytes'] or 0) / 1e9:.2f} GB",
    ])
