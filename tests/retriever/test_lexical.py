"""The BM25 index alone (no embedder): tokenisation, scoring, versions, ties, and its file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from chunkcache.retriever import BM25Params, tokenize
from chunkcache.retriever.lexical import LexicalIndex

TEXTS = {
    11: "Guido van Rossum created the Python programming language.",
    22: "Mount Etna is an active volcano in Sicily; Etna erupts often.",
    33: "The Pokémon franchise was created by Satoshi Tajiri.",
    44: "Green tea is made from the leaves of Camellia sinensis.",
}


def _index() -> LexicalIndex:
    return LexicalIndex.empty().added(list(TEXTS), list(TEXTS.values()))


def _ids(index: LexicalIndex, query: str, k: int = 4) -> list[int]:
    return [int(i) for i in index.search(query, k, BM25Params())[1]]


def test_tokens_are_case_and_accent_folded_words() -> None:
    assert tokenize("Pokémon's ÉTÉ, 1998-2001!") == ["pokemon", "s", "ete", "1998", "2001"]


def test_bm25_ranks_the_chunk_with_the_rare_words_first_and_skips_chunks_without_them() -> None:
    index = _index()
    assert _ids(index, "Who created Pokemon?") == [33, 11]  # "created" is in both; "pokemon" only in 33
    assert _ids(index, "etna")[0] == 22 and _ids(index, "nothing matches this") == []
    scores, _ = index.search("volcano etna", 4, BM25Params())
    assert scores[0] > 0 and len(scores) == 1


def test_removed_rows_are_never_returned_and_their_words_leave_the_vocabulary() -> None:
    index = _index().removed([22])
    assert 22 not in _ids(index, "Etna volcano Sicily tea") and len(index) == 3
    assert "etna" not in index.vocab and "tea" in index.vocab
    again = index.added([22], [TEXTS[22]])
    assert _ids(again, "etna") == [22]


def test_ties_go_to_the_smaller_id_whatever_the_insertion_order() -> None:
    same = "Identical words in every chunk."
    forward = LexicalIndex.empty().added([9, 3, 7], [same] * 3)
    backward = LexicalIndex.empty().added([7, 3, 9], [same] * 3)
    assert _ids(forward, "identical words", 2) == _ids(backward, "identical words", 2) == [3, 7]


def test_the_file_round_trips_and_a_damaged_one_reads_as_missing(tmp_path: Path) -> None:
    path = tmp_path / "lexical.npz"
    index = _index().at_generation(5)
    index.save(path)
    loaded = LexicalIndex.load(path)
    assert loaded is not None and loaded.generation == 5 and loaded.vocab == index.vocab
    np.testing.assert_array_equal(loaded.search("created python", 4, BM25Params())[1],
                                  index.search("created python", 4, BM25Params())[1])
    assert [p.name for p in tmp_path.iterdir()] == ["lexical.npz"]  # no temporary file left
    path.write_bytes(b"not a zip file")
    assert LexicalIndex.load(path) is None and LexicalIndex.load(tmp_path / "absent.npz") is None
