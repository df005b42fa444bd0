"""`chunkcache demo`: the whole path on a small bundled corpus (MuSiQue passages): ingest into an
index, precompute every chunk's cache, then answer a few questions by retrieval with a full
prefill and with CacheBlend, showing answers, sources and TTFT side by side."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from chunkcache.engine import ChunkCacheEngine
from chunkcache.jobs.ingest import model_tokenizer, open_or_build
from chunkcache.jobs.precompute import precompute_index
from chunkcache.pipeline import RAGPipeline
from chunkcache.retriever import Chunker, Document


def demo_documents() -> tuple[list[Document], list[dict]]:
    """The bundled passages as documents (each once) and the questions asked about them."""
    sample = json.loads(resources.files("chunkcache").joinpath("data/demo.json").read_text(encoding="utf-8"))
    docs: dict[str, Document] = {}
    for i, example in enumerate(sample["examples"]):
        for j, passage in enumerate(example["chunks"]):
            docs.setdefault(passage, Document(f"demo/q{i + 1}-p{j + 1}", passage))
    return list(docs.values()), sample["examples"]


def run_demo(engine: ChunkCacheEngine, index_dir: Path, limit: int, ratio: float, max_new_tokens: int | None,
             top_k: int = 6) -> None:
    documents, examples = demo_documents()
    index = open_or_build(index_dir, "Flat")
    try:
        chunker = Chunker(model_tokenizer(engine.settings), 512, 0, name=engine.settings.model)
        report = index.ingest_documents(documents, chunker)
        print(f"model {engine.settings.model} ({engine.settings.dtype}), codec {engine.codec.spec}; index {index_dir}: "
              f"{len(index)} chunks ({report.added} documents added, {report.unchanged} unchanged)")
        summary = precompute_index(engine, index, progress=False)
        print(f"precompute: {summary.computed} chunk caches computed, {summary.skipped} already stored\n")
        rag = RAGPipeline(index, engine)
        for example in examples[:limit]:
            rows = []
            for strategy, params in (("full", {}), ("cacheblend", {"recompute_ratio": ratio})):
                result = rag.answer(example["question"], top_k=top_k, strategy=strategy,
                                    max_new_tokens=max_new_tokens, **params)
                rows.append((strategy + (f":{ratio}" if params else ""), result))
            first = rows[0][1]
            print(f"Q: {example['question']}   (gold: {'; '.join(map(str, example['answers']))}, "
                  f"{first.answer.prompt_tokens} prompt tokens)")
            print("  sources: " + ", ".join(f"{h.doc_id} ({h.score:.2f})" for h in first.sources))
            for label, result in rows:
                print(f"  {label:<16} ttft {result.timings['ttft_s'] * 1000:7.0f} ms   {result.text!r}")
            speedup = rows[0][1].timings["ttft_s"] / max(rows[1][1].timings["ttft_s"], 1e-9)
            print(f"  TTFT speed-up of {rows[1][0]} over full prefill (retrieval included): {speedup:.1f}x\n")
    finally:
        index.close()
