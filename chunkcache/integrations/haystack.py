"""`ChunkCacheGenerator`: a Haystack generator component that answers a query from the documents
it is given (one chunk each, in order) through a `ChunkCacheEngine`."""

from __future__ import annotations

from typing import Any

from chunkcache.integrations import answer_meta, require

require("haystack", "haystack")

from haystack import Document, component  # noqa: E402

from chunkcache.engine import ChunkCacheEngine  # noqa: E402
from chunkcache.errors import InvalidInputError  # noqa: E402


@component
class ChunkCacheGenerator:
    """Connect a retriever's ``documents`` and the ``query``; outputs ``replies`` (one answer) and
    ``meta`` (strategy, TTFT, reused/recomputed tokens, cache hits)."""

    def __init__(self, engine: ChunkCacheEngine | None = None, strategy: str | None = None,
                 max_new_tokens: int | None = None, **params: Any) -> None:
        self.engine = engine or ChunkCacheEngine()
        self.strategy, self.max_new_tokens, self.params = strategy, max_new_tokens, params

    @component.output_types(replies=list[str], meta=list[dict[str, Any]])
    def run(self, query: str, documents: list[Document], strategy: str | None = None,
            max_new_tokens: int | None = None) -> dict[str, Any]:
        chunks = [d.content for d in documents if d.content]
        if not chunks:
            raise InvalidInputError("no document with text content reached ChunkCacheGenerator")
        answer = self.engine.answer(query, chunks, strategy=strategy or self.strategy,
                                    max_new_tokens=max_new_tokens or self.max_new_tokens, **self.params)
        meta = answer_meta(answer) | {"document_ids": [d.id for d in documents if d.content]}
        return {"replies": [answer.text], "meta": [meta]}
