"""LlamaIndex adapters: `ChunkCacheQueryEngine` (a ``CustomQueryEngine`` that answers from the
retrieved nodes, one chunk each) and `ChunkCacheRetriever` (a ``BaseRetriever`` over a
`ChunkIndex`)."""

from __future__ import annotations

from typing import Any

from chunkcache.integrations import answer_meta, require

require("llama_index.core", "llama-index")

from llama_index.core.base.response.schema import Response  # noqa: E402
from llama_index.core.query_engine import CustomQueryEngine  # noqa: E402
from llama_index.core.retrievers import BaseRetriever  # noqa: E402
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode  # noqa: E402
from pydantic import ConfigDict  # noqa: E402

from chunkcache.errors import InvalidInputError  # noqa: E402


class ChunkCacheRetriever(BaseRetriever):
    """The top ``top_k`` chunks of a `ChunkIndex` as nodes (id = chunk id, ref doc = document)."""

    def __init__(self, index: Any, top_k: int = 5, **kwargs: Any) -> None:
        self._index, self._top_k = index, top_k
        super().__init__(**kwargs)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        hits = self._index.search(query_bundle.query_str, k=self._top_k)
        return [NodeWithScore(node=TextNode(id_=h.chunk_id, text=h.text, metadata={"doc_id": h.doc_id}),
                              score=h.score) for h in hits]


class ChunkCacheQueryEngine(CustomQueryEngine):
    """Retrieve with ``retriever``, then answer from the nodes' cached KV through ``engine``."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    retriever: BaseRetriever
    engine: Any
    strategy: str | None = None
    max_new_tokens: int | None = None

    def custom_query(self, query_str: str) -> Response:
        nodes = self.retriever.retrieve(query_str)
        chunks = [n.node.get_content() for n in nodes if n.node.get_content()]
        if not chunks:
            raise InvalidInputError("the retriever returned no node with text")
        answer = self.engine.answer(query_str, chunks, strategy=self.strategy, max_new_tokens=self.max_new_tokens)
        return Response(response=answer.text, source_nodes=nodes, metadata=answer_meta(answer))
