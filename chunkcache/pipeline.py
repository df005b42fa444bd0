"""`RAGPipeline`: retrieve chunks from a `ChunkIndex`, then answer from their cached KV through the
engine; the drop-in component the CLI's `query` and the framework adapters build on."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from chunkcache.engine import Answer, ChunkCacheEngine
from chunkcache.errors import InvalidInputError
from chunkcache.retriever import ChunkIndex, Hit


@dataclass
class RAGAnswer:
    answer: Answer
    sources: list[Hit]
    timings: dict[str, float] = field(default_factory=dict)  # retrieve_s, load_s, blend_s, ttft_s, total_s

    @property
    def text(self) -> str:
        return self.answer.text

    def to_dict(self) -> dict[str, Any]:
        return {
            "answer": self.answer.text,
            "sources": [{"doc_id": h.doc_id, "chunk_id": h.chunk_id, "score": h.score, "text": h.text,
                         "retrievers": h.ranks} for h in self.sources],
            "timings": self.timings,
            "cache": {"hits": self.answer.cache_hits, "misses": self.answer.cache_misses,
                      "reused_tokens": self.answer.reused_tokens, "recomputed_tokens": self.answer.recomputed_tokens},
            "strategy": self.answer.strategy,
        }


class RAGPipeline:
    """``answer(question, top_k)``: the top-k chunks, best first, fused from their caches.
    ``retrieval`` (dense | lexical | hybrid) overrides the index's own mode (`ChunkIndex.options`)."""

    def __init__(self, index: ChunkIndex, engine: ChunkCacheEngine) -> None:
        self.index = index
        self.engine = engine
        engine.use_index(index)  # chunk_primer: neighbours computes its chunks behind their neighbours

    def retrieve(self, question: str, top_k: int = 5, retrieval: str | None = None) -> list[Hit]:
        if top_k < 1:
            raise InvalidInputError(f"top_k must be >= 1, got {top_k}")
        return self.index.search(question, k=top_k, retrieval=retrieval)

    def answer(self, question: str, top_k: int = 5, strategy: str | None = None, retrieval: str | None = None,
               **params: Any) -> RAGAnswer:
        start = time.perf_counter()
        hits = self.retrieve(question, top_k, retrieval)
        retrieved = time.perf_counter()
        if not hits:
            raise InvalidInputError("the index returned no chunks; ingest documents first (chunkcache ingest)")
        answer = self.engine.answer(question, [h.text for h in hits], strategy=strategy, **params)
        timings = {
            "retrieve_s": retrieved - start,
            "load_s": answer.timings.get("load_s", 0.0),
            "blend_s": answer.timings.get("blend_s", 0.0),
            "ttft_s": (retrieved - start) + answer.ttft_s,
            "total_s": time.perf_counter() - start,
        }
        return RAGAnswer(answer, hits, timings)
