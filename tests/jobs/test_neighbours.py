"""`chunk_primer: neighbours`: chunks of an index are computed behind their nearest chunks, their
keys name what they were computed behind, a changed neighbour set is recomputed by the next
precompute, and fusion over such caches still equals full prefill at ratio 1.0."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chunkcache.config import Settings
from chunkcache.engine import ChunkCacheEngine
from chunkcache.jobs.precompute import precompute_index
from chunkcache.model import LoadedModel
from chunkcache.pipeline import RAGPipeline
from chunkcache.retriever import ChunkIndex, Chunker, Document

DOCS = {
    "etna": "Mount Etna is an active volcano on the east coast of Sicily, above the city of Catania.",
    "vesuvius": "Mount Vesuvius is a volcano near Naples; its eruption in 79 AD buried Pompeii.",
    "stromboli": "Stromboli is a small volcanic island north of Sicily that has erupted for centuries.",
    "tea": "Green tea is made from unoxidised leaves of Camellia sinensis and is popular in Japan.",
    "coffee": "Coffee beans are the roasted seeds of the Coffea plant, first traded through Yemen.",
}
QUESTION = "Which volcano is near Catania?"


def _docs(**extra: str) -> list[Document]:
    return [Document(k, v) for k, v in {**DOCS, **extra}.items()]


@pytest.fixture()
def chunker(minilm_tokenizer) -> Chunker:  # type: ignore[no-untyped-def]
    return Chunker(minilm_tokenizer, 64, 0)


@pytest.fixture()
def index(tmp_path: Path, embedder, chunker: Chunker) -> ChunkIndex:  # type: ignore[no-untyped-def]
    index = ChunkIndex.build(tmp_path / "index", embedder)
    index.ingest_documents(_docs(), chunker)
    yield index
    index.close()


def _engine(smollm2: LoadedModel, store: Path, primer: str = "neighbours") -> ChunkCacheEngine:
    return ChunkCacheEngine(Settings.load(env={}, store_path=store, chunk_primer=primer, neighbours=2), model=smollm2)


def test_the_index_names_each_chunks_nearest_other_chunks(index: ChunkIndex) -> None:
    etna, tea = DOCS["etna"], DOCS["tea"]
    near = index.neighbours([etna, tea, "a passage that is not in the index"], 2)
    assert near[2] is None
    assert set(near[0]) <= {DOCS["vesuvius"], DOCS["stromboli"]} and len(near[0]) == 2  # volcanoes
    assert etna not in near[0] and near[1][-1] == DOCS["coffee"]  # not itself; the nearest is last
    assert index.neighbours([etna], 2) == [near[0]]  # deterministic


def test_the_chunks_beside_a_chunk_in_its_document_are_not_its_neighbours(  # type: ignore[no-untyped-def]
    tmp_path: Path, embedder, minilm_tokenizer
) -> None:
    parts = [f"Part {i} of the report on the harbour of Genoa and its cranes." for i in range(4)]
    with ChunkIndex.build(tmp_path / "ix", embedder) as index:
        index.ingest_documents([Document("report", "\n\n".join(parts))], Chunker(minilm_tokenizer, 16, 0))
        chunks = [index.get(c).text for c in index.doc_chunks("report")]  # type: ignore[union-attr]
        assert len(chunks) == 4
        assert index.neighbours([chunks[1]], 2) == [(chunks[3],)]  # 0 and 2 sit beside it


def test_keys_name_the_neighbours_and_a_changed_set_is_recomputed(
    smollm2: LoadedModel, store_path: Path, index: ChunkIndex, chunker: Chunker
) -> None:
    with _engine(smollm2, store_path, "builtin") as plain, _engine(smollm2, store_path) as engine:
        adhoc = plain.chunk_key(DOCS["etna"])
        assert engine.chunk_key(DOCS["etna"]) == adhoc  # no index: the primer, as before
        engine.use_index(index)
        plain.use_index(index)  # chunk_primer builtin: the index changes nothing
        assert plain.chunk_key(DOCS["etna"]) == adhoc
        keys = {doc: engine.chunk_key(text) for doc, text in DOCS.items()}
        assert adhoc not in keys.values() and len(set(keys.values())) == len(DOCS)
        summary = precompute_index(engine, index, progress=False, bare_every=0)
        assert (summary.computed, summary.skipped) == (5, 0) and summary.context_tokens > summary.tokens
        assert not plain.stored(DOCS["etna"]) and engine.stored(DOCS["etna"])

        # a new volcano passage becomes a neighbour of the volcano chunks only: they are recomputed
        index.ingest_documents(_docs(hekla="Hekla is a volcano in Iceland, like Etna in Sicily an active one."),
                               chunker)
        moved = {doc for doc, text in DOCS.items() if engine.chunk_key(text) != keys[doc]}
        assert "etna" in moved and "coffee" not in moved
        again = precompute_index(engine, index, progress=False, bare_every=0)
        assert again.computed == len(moved) + 1 and again.skipped == len(DOCS) - len(moved)


def test_fusion_over_neighbour_caches_at_ratio_one_equals_full(
    smollm2: LoadedModel, store_path: Path, index: ChunkIndex
) -> None:
    with _engine(smollm2, store_path) as engine:
        pipeline = RAGPipeline(index, engine)
        precompute_index(engine, index, progress=False, bare_every=0)
        chunks = [DOCS["etna"], DOCS["tea"], DOCS["stromboli"]]
        full = engine.answer(QUESTION, chunks, strategy="full", max_new_tokens=6, keep_logits=True)
        exact = engine.answer(QUESTION, chunks, strategy="cacheblend:1.0", max_new_tokens=6, keep_logits=True)
        reused = engine.answer(QUESTION, chunks, strategy="reuse", max_new_tokens=6, keep_logits=True)
        assert reused.cache_hits == 3 and reused.cache_misses == 0
        torch.testing.assert_close(exact.first_token_logits, full.first_token_logits, atol=2e-4, rtol=1e-4)
        assert exact.text == full.text
        assert pipeline.answer(QUESTION, top_k=3, strategy="reuse", max_new_tokens=2).answer.cache_misses == 0
