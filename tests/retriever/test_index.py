"""ChunkIndex with the real MiniLM embedder and real faiss: search quality, persistence, deletion,
incremental ingest, crash recovery and the refusal of another embedder."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from chunkcache.errors import InvalidInputError
from chunkcache.retriever import (
    ChunkIndex,
    Chunker,
    Document,
    EmbedderMismatchError,
    IndexChangedError,
    IndexExistsError,
    IndexNotFoundError,
    MiniLMEmbedder,
    UnknownDocumentError,
)

DOCS = {
    "paris.txt": "Paris is the capital of France. The Eiffel Tower stands on the Champ de Mars.\n\n"
                 "The Louvre is the most visited art museum in the world.",
    "python.md": "# Python\n\nPython is a programming language created by Guido van Rossum. "
                 "It is known for significant indentation.",
    "volcano.txt": "Mount Etna is an active volcano on the east coast of Sicily. "
                   "Its eruptions have shaped the landscape for thousands of years.",
    "tea.txt": "Green tea is made from unoxidised leaves of Camellia sinensis. "
               "It is popular in Japan and China.",
}


def _docs(**changes: str) -> list[Document]:
    return [Document(name, changes.get(name.split(".")[0], text), {"source": name}) for name, text in DOCS.items()]


@pytest.fixture()
def index(tmp_path: Path, embedder: MiniLMEmbedder, chunker: Chunker) -> ChunkIndex:
    ix = ChunkIndex.build(tmp_path / "ix", embedder)
    ix.ingest_documents(_docs(), chunker)
    yield ix
    ix.close()


class FakeEmbedder:
    def __init__(self, name: str = "fake", dim: int = 8) -> None:
        self.name, self.dim = name, dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return np.ones((len(texts), self.dim), dtype=np.float32)


def test_an_obvious_query_ranks_the_right_chunk_first(index: ChunkIndex) -> None:
    hits = index.search("Who created the Python programming language?", k=3)
    assert hits[0].doc_id == "python.md" and "Guido van Rossum" in hits[0].text
    assert hits[0].score > hits[1].score and 0 < hits[0].score <= 1.0001
    assert hits[0].metadata["source"] == "python.md" and "chunk_index" in hits[0].metadata
    assert index.search("Which volcano is in Sicily?", k=1)[0].doc_id == "volcano.txt"


def test_round_trip_on_disk(index: ChunkIndex, tmp_path: Path, embedder: MiniLMEmbedder) -> None:
    queries = ["famous art museum", "leaves used for tea", "active volcano"]
    before = index.search_many(queries, k=4)
    manifest = index.manifest
    index.close()
    folder = tmp_path / "ix"
    assert {p.name for p in folder.iterdir()} == {"index.faiss", "lexical.npz", "docstore", "manifest.json"}
    on_disk = json.loads((folder / "manifest.json").read_text())
    assert on_disk == manifest
    assert on_disk["embedder"] == {"name": "all-MiniLM-L6-v2", "dim": 384, "fingerprint": embedder.fingerprint,
                                   "path": on_disk["embedder"]["path"]}
    assert (on_disk["metric"], on_disk["factory"]) == ("inner_product", "Flat")
    assert on_disk["counts"]["documents"] == 4 and on_disk["counts"]["vectors"] == on_disk["counts"]["chunks"] > 4
    with ChunkIndex.load(folder) as loaded:  # embedder taken from the manifest
        after = loaded.search_many(queries, k=4)
        assert loaded.documents() == sorted(DOCS)
    assert [[(h.chunk_id, h.doc_id, h.text, h.metadata) for h in r] for r in after] == \
        [[(h.chunk_id, h.doc_id, h.text, h.metadata) for h in r] for r in before]
    np.testing.assert_allclose([[h.score for h in r] for r in after], [[h.score for h in r] for r in before], atol=1e-5)


def test_delete_removes_a_documents_chunks(index: ChunkIndex) -> None:
    chunk_ids = set(index.doc_chunks("volcano.txt"))
    vectors = len(index)
    assert index.delete("volcano.txt") == len(chunk_ids)
    assert len(index) == vectors - len(chunk_ids) and "volcano.txt" not in index.documents()
    hits = index.search("Which volcano is in Sicily?", k=len(index))
    assert not {h.chunk_id for h in hits} & chunk_ids and all(h.doc_id != "volcano.txt" for h in hits)
    with pytest.raises(UnknownDocumentError, match="no document 'volcano.txt'"):
        index.delete("volcano.txt")


def test_a_chunk_shared_by_two_documents_stays_until_both_are_gone(index: ChunkIndex, chunker: Chunker) -> None:
    copy = Document("copy-of-tea", DOCS["tea.txt"])
    report = index.ingest_documents([copy], chunker)
    assert (report.added, report.chunks_added) == (1, 0)  # same text, same chunk ids: nothing to embed
    shared = index.doc_chunks("tea.txt")
    assert index.delete("tea.txt") == 0
    assert index.search("leaves used for green tea", k=1)[0].doc_id == "copy-of-tea"
    assert index.delete("copy-of-tea") == len(shared)


def test_reingesting_unchanged_documents_changes_nothing(index: ChunkIndex, chunker: Chunker, tmp_path: Path) -> None:
    faiss_file = tmp_path / "ix" / "index.faiss"
    stamp, manifest = faiss_file.stat().st_mtime_ns, index.manifest
    report = index.ingest_documents(_docs(), chunker)
    assert (report.unchanged, report.added, report.updated, report.chunks_added, report.chunks_removed) == (4, 0, 0, 0, 0)
    assert faiss_file.stat().st_mtime_ns == stamp and index.manifest == manifest


def test_a_changed_document_replaces_its_chunks(index: ChunkIndex, chunker: Chunker) -> None:
    old = set(index.doc_chunks("volcano.txt"))
    new_text = "Mount Fuji is a dormant volcano on Honshu, the highest mountain in Japan."
    report = index.ingest_documents(_docs(volcano=new_text), chunker)
    assert (report.updated, report.unchanged, report.chunks_removed) == (1, 3, len(old))
    assert index.doc_chunks("volcano.txt") != list(old)
    hits = index.search("the highest mountain in Japan", k=len(index))
    assert hits[0].doc_id == "volcano.txt" and "Fuji" in hits[0].text
    assert not {h.chunk_id for h in hits} & old
    assert index.manifest["counts"]["vectors"] == len(index) == index.manifest["counts"]["chunks"]


def test_another_embedder_is_refused(index: ChunkIndex, tmp_path: Path) -> None:
    index.close()
    with pytest.raises(EmbedderMismatchError, match="built with embedder 'all-MiniLM-L6-v2'.*not 'fake'.*overwrite=True") as err:
        ChunkIndex.load(tmp_path / "ix", FakeEmbedder())
    assert isinstance(err.value, InvalidInputError)
    with pytest.raises(EmbedderMismatchError, match="dimension 384"):
        ChunkIndex.load(tmp_path / "ix", FakeEmbedder("all-MiniLM-L6-v2", 8))


def test_build_refuses_an_existing_index_and_load_a_missing_one(index: ChunkIndex, tmp_path: Path,
                                                                 embedder: MiniLMEmbedder) -> None:
    with pytest.raises(IndexExistsError, match="overwrite=True"):
        ChunkIndex.build(tmp_path / "ix", embedder)
    with pytest.raises(IndexNotFoundError, match="manifest.json is missing"):
        ChunkIndex.load(tmp_path / "nothing-here", embedder)
    with pytest.raises(InvalidInputError, match="factory string 'Nonsense42'"):
        ChunkIndex.build(tmp_path / "other", embedder, factory="Nonsense42")


def test_hnsw_index_supports_delete(tmp_path: Path, embedder: MiniLMEmbedder, chunker: Chunker) -> None:
    with ChunkIndex.build(tmp_path / "hnsw", embedder, factory="HNSW32,Flat") as ix:
        ix.ingest_documents(_docs(), chunker)
        ix.delete("paris.txt")
        assert all(h.doc_id != "paris.txt" for h in ix.search("capital of France", k=len(ix)))
    with ChunkIndex.load(tmp_path / "hnsw", embedder) as ix:
        assert ix.search("green tea", k=1)[0].doc_id == "tea.txt" and ix.manifest["factory"] == "HNSW32,Flat"


def test_ivf_index_is_trained_on_the_first_chunks(tmp_path: Path, embedder: MiniLMEmbedder,
                                                   chunker: Chunker) -> None:
    with ChunkIndex.build(tmp_path / "ivf", embedder, factory="IVF2,Flat") as ix:
        ix.ingest_documents(_docs(), chunker)
        ix.delete("tea.txt")
        assert len(ix) == ix.manifest["counts"]["chunks"] and "tea.txt" not in ix.documents()
        assert ix.search("Who created Python?", k=1)  # nprobe 1 of 2 lists: some hit
    with ChunkIndex.build(tmp_path / "ivf64", embedder, factory="IVF64,Flat") as ix:
        with pytest.raises(InvalidInputError, match="must be trained.*too few"):
            ix.ingest_documents(_docs(), chunker)
        assert len(ix) == 0 and ix.documents() == []


def test_views_of_one_directory_take_in_each_others_commits(index: ChunkIndex, tmp_path: Path,
                                                             embedder: MiniLMEmbedder, chunker: Chunker) -> None:
    """Several servers over one index directory: what one commits, the others search and extend."""
    other = ChunkIndex.load(tmp_path / "ix", embedder)
    index.ingest_documents([Document("one.txt", "Saturn's rings are made of ice and rock.")], chunker)
    assert other.search("rings of Saturn", k=1)[0].doc_id == "one.txt"
    other.ingest_documents([Document("two.txt", "The Danube flows through Vienna and Budapest.")], chunker)
    assert index.search("river through Vienna", k=1)[0].doc_id == "two.txt"
    other.delete("one.txt")
    assert all(h.doc_id != "one.txt" for h in index.search("rings of Saturn", k=5))
    assert len(index) == len(other) == index.manifest["counts"]["chunks"]
    other.close()


def test_a_writer_overtaken_while_it_plans_is_refused(index: ChunkIndex, tmp_path: Path,
                                                      embedder: MiniLMEmbedder, chunker: Chunker) -> None:
    other = ChunkIndex.load(tmp_path / "ix", embedder)

    def documents():  # type: ignore[no-untyped-def]
        yield Document("two.txt", "The second writer must retry.")
        index.ingest_documents([Document("one.txt", "The first writer commits meanwhile.")], chunker)

    with pytest.raises(IndexChangedError, match="changed by another process"):
        other.ingest_documents(documents(), chunker)
    other.ingest_documents([Document("two.txt", "The second writer must retry.")], chunker)  # a retry works
    assert {"one.txt", "two.txt"} <= set(index.documents())
    other.close()


def test_a_faiss_file_left_behind_by_a_crash_is_rebuilt(index: ChunkIndex, tmp_path: Path,
                                                        embedder: MiniLMEmbedder, chunker: Chunker) -> None:
    folder, saved = tmp_path / "ix", tmp_path / "saved"
    saved.mkdir()
    for name in ("index.faiss", "manifest.json"):
        shutil.copy(folder / name, saved / name)
    index.ingest_documents([Document("new.txt", "Saturn's rings are made of ice and rock.")], chunker)
    index.close()
    for name in ("index.faiss", "manifest.json"):  # as if killed after the docstore commit
        shutil.copy(saved / name, folder / name)
    with ChunkIndex.load(folder, embedder) as ix:
        assert ix.search("rings of Saturn", k=1)[0].doc_id == "new.txt"
        assert len(ix) == ix.manifest["counts"]["chunks"]
