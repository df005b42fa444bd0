"""The framework adapters against each framework's real package: the answer is the engine's for
the same question and the same documents, passed as separate chunks in retrieval order."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from chunkcache.config import Settings
from chunkcache.engine import ChunkCacheEngine
from chunkcache.model import LoadedModel
from chunkcache.retriever import ChunkIndex, Chunker, Document

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")

TEXTS = {
    "mill": "The old mill was built in Tarnow in 1820 on the river Vela.",
    "bridge": "The stone bridge of Tarnow was finished in 1846 by the engineer Ilse Marr.",
    "school": "Tarnow's first school opened in 1871 next to the church.",
}
QUESTION = "Who finished the stone bridge?"


@pytest.fixture()
def engine(smollm2: LoadedModel, tmp_path: Path) -> ChunkCacheEngine:
    return ChunkCacheEngine(Settings.load(env={}, store_path=tmp_path / "store", max_new_tokens=8), model=smollm2)


@pytest.fixture()
def index(tmp_path: Path, embedder, smollm2: LoadedModel) -> ChunkIndex:  # type: ignore[no-untyped-def]
    idx = ChunkIndex.build(tmp_path / "index", embedder)
    idx.ingest_documents([Document(k, v) for k, v in TEXTS.items()], Chunker(smollm2.tokenizer, 64, 0))
    return idx


def test_haystack_generator_in_a_pipeline(engine: ChunkCacheEngine) -> None:
    pytest.importorskip("haystack")
    from haystack import Document as HDocument
    from haystack import Pipeline
    from haystack.components.retrievers.in_memory import InMemoryBM25Retriever
    from haystack.document_stores.in_memory import InMemoryDocumentStore

    from chunkcache.integrations.haystack import ChunkCacheGenerator

    store = InMemoryDocumentStore()
    store.write_documents([HDocument(id=k, content=v) for k, v in TEXTS.items()])
    pipe = Pipeline()
    pipe.add_component("retriever", InMemoryBM25Retriever(store, top_k=2))
    pipe.add_component("llm", ChunkCacheGenerator(engine, strategy="cacheblend"))
    pipe.connect("retriever.documents", "llm.documents")
    out = pipe.run({"retriever": {"query": QUESTION}, "llm": {"query": QUESTION}}, include_outputs_from={"retriever"})
    docs = out["retriever"]["documents"]
    expected = engine.answer(QUESTION, [d.content for d in docs], strategy="cacheblend")
    assert out["llm"]["replies"] == [expected.text]
    meta = out["llm"]["meta"][0]
    assert meta["document_ids"] == [d.id for d in docs] and meta["cache_misses"] == 2  # computed here first
    assert expected.cache_hits == 2  # the pipeline stored both chunks' caches


def test_llama_index_query_engine_over_a_chunk_index(engine: ChunkCacheEngine, index: ChunkIndex) -> None:
    pytest.importorskip("llama_index.core")
    from chunkcache.integrations.llama_index import ChunkCacheQueryEngine, ChunkCacheRetriever

    retriever = ChunkCacheRetriever(index, top_k=2)
    query_engine = ChunkCacheQueryEngine(retriever=retriever, engine=engine)
    response = query_engine.query(QUESTION)
    nodes = response.source_nodes
    assert [n.node.metadata["doc_id"] for n in nodes][0] == "bridge" and len(nodes) == 2
    expected = engine.answer(QUESTION, [n.node.get_content() for n in nodes])
    assert response.response == expected.text
    assert response.metadata["reused_tokens"] == expected.reused_tokens


def test_langchain_chat_model_and_retriever(engine: ChunkCacheEngine, index: ChunkIndex) -> None:
    pytest.importorskip("langchain_core")
    from langchain_core.messages import HumanMessage, SystemMessage

    from chunkcache.integrations.langchain import ChunkCacheChatModel, ChunkCacheRetriever

    docs = ChunkCacheRetriever(index=index, k=2).invoke(QUESTION)
    assert docs[0].metadata["doc_id"] == "bridge"
    model = ChunkCacheChatModel(engine=engine)
    expected = engine.answer(QUESTION, [d.page_content for d in docs])
    reply = model.invoke([HumanMessage(QUESTION)], documents=docs)
    assert reply.content == expected.text and reply.response_metadata["cache_hits"] == 2  # stored by `expected`
    assert "".join(c.content for c in model.stream([HumanMessage(QUESTION)], documents=docs)) == expected.text
    bound = model.bind(documents=[d.page_content for d in docs])
    assert bound.invoke([HumanMessage(QUESTION)]).content == expected.text
    system = model.invoke([SystemMessage("Be brief."), HumanMessage(QUESTION)], documents=docs)
    assert system.content == engine.answer(f"Be brief.\n\n{QUESTION}", [d.page_content for d in docs]).text
    with pytest.raises(ValueError, match="documents"):
        model.invoke([HumanMessage(QUESTION)])
    cut_at = expected.text[3:5]
    head = expected.text[: expected.text.find(cut_at)]
    assert model.invoke([HumanMessage(QUESTION)], documents=docs, stop=[cut_at]).content == head
    assert "".join(c.content for c in model.stream([HumanMessage(QUESTION)], documents=docs, stop=[cut_at])) == head
    blocks = HumanMessage(content=[{"type": "text", "text": QUESTION}])
    assert model.invoke([blocks], documents=docs).content == expected.text
