"""ChunkIndex's two retrievers (faiss and BM25) kept in step through ingest, delete, re-ingest and
interrupted writes; the hybrid ranking; titles in the index; the options Settings gives."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from chunkcache.config import Settings
from chunkcache.errors import InvalidInputError
from chunkcache.retriever import MODES, ChunkIndex, Chunker, Document, MiniLMEmbedder, SearchOptions
from chunkcache.retriever.fusion import fuse
from chunkcache.retriever.lexical import LexicalIndex

DOCS = {
    "etna.txt": "Mount Etna is an active volcano on the east coast of Sicily. Its eruptions shaped the island.",
    "rossum.txt": "Guido van Rossum is a Dutch programmer. He created the Python programming language.",
    "tea.txt": "Green tea is made from unoxidised leaves of Camellia sinensis, popular in Japan.",
    "k2.txt": "K2 is the second-highest mountain on Earth, on the border of Pakistan and China.",
}
QUERIES = ["Which volcano is on Sicily?", "Who created Python?", "leaves used for tea", "K2 mountain height"]


@pytest.fixture()
def index(tmp_path: Path, embedder: MiniLMEmbedder, chunker: Chunker) -> ChunkIndex:
    ix = ChunkIndex.build(tmp_path / "ix", embedder)
    ix.ingest_documents([Document(n, t, {"source": n}) for n, t in DOCS.items()], chunker)
    yield ix
    ix.close()


def _found(index: ChunkIndex, query: str) -> dict[str, set[str]]:
    """Chunk ids each mode returns when asked for every chunk."""
    return {mode: {h.chunk_id for h in index.search(query, len(index), mode)} for mode in MODES}


def _in_step(index: ChunkIndex) -> None:
    counts = index.manifest["counts"]
    assert counts["chunks"] == counts["vectors"] == counts["lexical"] == len(index)


def test_each_mode_finds_the_obvious_chunk_and_says_which_retriever_found_it(index: ChunkIndex) -> None:
    for mode in MODES:
        assert index.search("Who created the Python language?", 1, mode)[0].doc_id == "rossum.txt"
    dense, lexical, hybrid = (index.search("Guido van Rossum", 3, m) for m in MODES)
    assert set(dense[0].ranks) == {"dense"} and set(lexical[0].ranks) == {"lexical"}
    assert hybrid[0].ranks == {"dense": 1, "lexical": 1} and hybrid[0].score > hybrid[-1].score
    assert index.search("Guido van Rossum", 3) == hybrid  # hybrid is the default
    with pytest.raises(InvalidInputError, match="retrieval must be one of dense, lexical, hybrid"):
        index.search("x", 1, "sparse")


def test_delete_and_reingest_keep_both_indexes_in_step(index: ChunkIndex, chunker: Chunker,
                                                       tmp_path: Path, embedder: MiniLMEmbedder) -> None:
    _in_step(index)
    gone = set(index.doc_chunks("etna.txt"))
    index.delete("etna.txt")
    _in_step(index)
    for query in QUERIES:
        for mode, ids in _found(index, query).items():
            assert not ids & gone, (mode, query)
    assert index.search("Etna Sicily volcano", 5, "lexical") == []  # its words left with it
    changed = "K2, also called Chogori, is in the Karakoram range."
    old_k2 = set(index.doc_chunks("k2.txt"))
    index.ingest_documents([Document("k2.txt", changed), Document("etna.txt", DOCS["etna.txt"])], chunker)
    _in_step(index)
    assert index.search("Chogori Karakoram", 1, "lexical")[0].doc_id == "k2.txt"
    assert not _found(index, "second-highest mountain Pakistan")["lexical"] & old_k2
    assert index.search("Etna", 1, "lexical")[0].doc_id == "etna.txt"
    index.close()
    with ChunkIndex.load(tmp_path / "ix", embedder) as loaded:  # the same on disk
        _in_step(loaded)
        assert loaded.search("Chogori Karakoram", 1, "lexical")[0].doc_id == "k2.txt"


def test_a_write_killed_before_the_lexical_file_leaves_both_consistent(index: ChunkIndex, chunker: Chunker,
                                                                       tmp_path: Path, embedder: MiniLMEmbedder,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def killed(self: LexicalIndex, path: Path) -> None:
        raise SystemExit("killed")  # after the docstore commit and index.faiss, before lexical.npz

    monkeypatch.setattr(LexicalIndex, "save", killed)
    with pytest.raises(SystemExit):
        index.ingest_documents([Document("nile.txt", "The Nile flows north through Egypt into the sea.")], chunker)
    with pytest.raises(SystemExit):
        index.delete("tea.txt")
    monkeypatch.undo()
    index.close()
    with ChunkIndex.load(tmp_path / "ix", embedder) as ix:
        _in_step(ix)
        assert "tea.txt" not in ix.documents()
        for mode in MODES:
            assert ix.search("Nile Egypt", 1, mode)[0].doc_id == "nile.txt"
            assert all(h.doc_id != "tea.txt" for h in ix.search("green tea leaves", len(ix), mode))


def test_a_lexical_file_left_behind_or_lost_is_rebuilt(index: ChunkIndex, chunker: Chunker, tmp_path: Path,
                                                       embedder: MiniLMEmbedder) -> None:
    folder = tmp_path / "ix"
    shutil.copy(folder / "lexical.npz", tmp_path / "old.npz")
    index.ingest_documents([Document("nile.txt", "The Nile flows north through Egypt.")], chunker)
    index.close()
    shutil.copy(tmp_path / "old.npz", folder / "lexical.npz")  # as if killed after index.faiss
    with ChunkIndex.load(folder, embedder) as ix:
        assert ix.search("Nile Egypt", 1, "lexical")[0].doc_id == "nile.txt"
    (folder / "lexical.npz").unlink()  # an index built before lexical search existed
    with ChunkIndex.load(folder, embedder) as ix:
        assert ix.search("Nile Egypt", 1, "lexical")[0].doc_id == "nile.txt"
        _in_step(ix)


def test_hybrid_ranking_is_deterministic(index: ChunkIndex, tmp_path: Path, embedder: MiniLMEmbedder) -> None:
    def ranking(ix: ChunkIndex) -> list[list[tuple[str, float, dict[str, int]]]]:
        return [[(h.chunk_id, round(h.score, 9), h.ranks) for h in ix.search(q, 5)] for q in QUERIES]

    first = ranking(index)
    assert ranking(index) == first
    index.close()
    with ChunkIndex.load(tmp_path / "ix", embedder) as loaded:
        assert ranking(loaded) == first
    # equal fused scores: the dense order first, then the smaller id, whatever order the lists came in
    options = SearchOptions()
    tied = fuse({"dense": [(7, 0.9), (3, 0.8)], "lexical": [(3, 5.0), (7, 4.0)]}, 2, options)
    assert [f.id for f in tied] == [7, 3] and tied[0].score == tied[1].score
    swapped = fuse({"lexical": [(3, 5.0), (7, 4.0)], "dense": [(7, 0.9), (3, 0.8)]}, 2, options)
    assert swapped == tied
    lexical_only = SearchOptions(dense_weight=0.0)  # dense ranks weigh nothing: every chunk ties at 0
    assert [f.id for f in fuse({"dense": [(9, 0.9), (4, 0.5)]}, 2, lexical_only)] == [9, 4]


def test_weighted_fusion_and_its_weight(index: ChunkIndex) -> None:
    index.options = SearchOptions(fusion="weighted", dense_weight=1.0)
    assert [h.chunk_id for h in index.search("Who created Python?", 3)] == \
        [h.chunk_id for h in index.search("Who created Python?", 3, "dense")]
    with pytest.raises(InvalidInputError, match="fusion must be one of rrf, weighted"):
        SearchOptions(fusion="max")


def test_a_documents_title_goes_into_both_indexes_not_into_the_chunk_text(tmp_path: Path, embedder: MiniLMEmbedder,
                                                                          chunker: Chunker) -> None:
    body = ("It was founded in 1810 as a small trading post. " * 3).strip()
    with ChunkIndex.build(tmp_path / "titled", embedder) as ix:
        ix.ingest_documents([Document("a.html", body, {"title": "Zanzibar Harbour", "format": "html"}),
                             Document("b.md", "# Quokka Island\n\nSmall marsupials live here."),
                             Document("notes/kookaburra_calls.txt", "They laugh at dawn.", {"format": "text"})],
                            chunker)
        hits = ix.search("Zanzibar", 5, "lexical")
        assert hits and all(h.doc_id == "a.html" and "Zanzibar" not in h.text for h in hits)
        assert hits[0].metadata["title"] == "Zanzibar Harbour"
        assert ix.search("quokka", 1, "lexical")[0].doc_id == "b.md"
        assert ix.search("kookaburra", 1, "lexical")[0].doc_id == "notes/kookaburra_calls.txt"
        assert ix.search("Zanzibar Harbour", 1, "dense")[0].doc_id == "a.html"


def test_settings_name_the_search_options() -> None:
    assert SearchOptions.from_settings(Settings()) == SearchOptions()  # the defaults agree
    settings = Settings.load(env={"CHUNKCACHE_RETRIEVAL": "lexical", "CHUNKCACHE_RRF_K": "10",
                                  "CHUNKCACHE_BM25_B": "0.5"})
    options = SearchOptions.from_settings(settings)
    assert (options.retrieval, options.rrf_k, options.bm25.b) == ("lexical", 10, 0.5)
    assert SearchOptions.from_settings(settings, "dense").retrieval == "dense"
    with pytest.raises(InvalidInputError, match="retrieval must be one of"):
        SearchOptions.from_settings(Settings(retrieval="both"))
