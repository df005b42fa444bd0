"""`RAGPipeline`: retrieve chunks from a `ChunkIndex` (by a search, or a document's chunks by its
id), then answer from their cached KV through the engine; the drop-in component that the CLI's
`query` and the service's retrieval build on."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from chunkcache.engine import Answer, ChunkCacheEngine
from chunkcache.errors import InvalidInputError
from chunkcache.retriever import ChunkIndex, Hit


class EmptyIndexError(InvalidInputError):
    """Retrieval from an index that holds no chunks yet."""


class NotFoundError(InvalidInputError):
    """A named document is not in the index, or retrieval found no chunk."""


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

    def search(self, query: str, top_k: int = 5, retrieval: str | None = None) -> list[Hit]:
        """The best ``top_k`` chunks for ``query``, best first (possibly none)."""
        if top_k < 1:
            raise InvalidInputError(f"top_k must be >= 1, got {top_k}")
        return self.index.search(query, k=top_k, retrieval=retrieval)

    def retrieve(self, question: str, top_k: int = 5, retrieval: str | None = None) -> list[Hit]:
        """`search`, where finding nothing is an error that says why."""
        hits = self.search(question, top_k, retrieval)
        if not hits and len(self.index) == 0:
            raise EmptyIndexError("the index has no chunks yet; add documents first "
                                  "(chunkcache ingest, or POST /v1/documents to a server)")
        if not hits:
            raise NotFoundError("no chunk of the index matches the question with this retrieval mode; "
                                "try hybrid or dense, or send documents")
        return hits

    def documents(self, doc_ids: Sequence[str]) -> list[Hit]:
        """Every chunk of the named documents, in order."""
        hits = []
        for doc_id in doc_ids:
            try:
                ids = self.index.doc_chunks(doc_id)
            except InvalidInputError:  # its message names the index's folder
                ids = []
            if not ids:
                raise NotFoundError(f"document {doc_id!r} is not in the index")
            hits.extend(h for h in (self.index.get(c) for c in ids) if h is not None)
        return hits

    def answer(self, question: str, top_k: int = 5, strategy: str | None = None, retrieval: str | None = None,
               **params: Any) -> RAGAnswer:
        start = time.perf_counter()
        hits = self.retrieve(question, top_k, retrieval)
        retrieved = time.perf_counter()
        answer = self.engine.answer(question, [h.text for h in hits], strategy=strategy, **params)
        timings = {
            "retrieve_s": retrieved - start,
            "load_s": answer.timings.get("load_s", 0.0),
            "blend_s": answer.timings.get("blend_s", 0.0),
            "ttft_s": (retrieved - start) + answer.ttft_s,
            "total_s": time.perf_counter() - start,
        }
        return RAGAnswer(answer, hits, timings)
