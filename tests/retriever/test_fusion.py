"""Fusion alone (no index): the link step of hybrid search, titles of documents, option checks."""

from __future__ import annotations

import pytest

from chunkcache.errors import InvalidInputError
from chunkcache.retriever import SearchOptions
from chunkcache.retriever.fusion import fuse, indexed_text, title_of
from chunkcache.retriever.lexical import LexicalIndex

LISTS = {"dense": [(1, 0.9), (2, 0.5), (4, 0.4)], "lexical": [(1, 3.0), (3, 1.0), (9, 0.5)]}


def test_a_candidate_named_by_top_hits_is_lifted_and_says_so() -> None:
    names = {1: {9, 1, 77}, 2: {9}}  # hits 1 and 2 name chunk 9 (1 names itself, ignored, and 77)
    plain = fuse(LISTS, 6, SearchOptions())
    linked = fuse(LISTS, 6, SearchOptions(), lambda cid: names.get(cid, set()))
    by_id = {f.id: f for f in plain}
    assert [f.id for f in plain][-1] == 9
    assert linked[0].id == 9 and linked[0].ranks == {"lexical": 3, "link": 1}
    assert linked[0].score == pytest.approx(by_id[9].score * (1 + 2 * 2.0))  # link_weight x itself, per namer
    assert 77 not in [f.id for f in linked]  # named, but no retriever found it for the question
    assert linked[1].id == 1 and linked[1].ranks == {"dense": 1, "lexical": 1}
    assert fuse(LISTS, 6, SearchOptions(link_hops=0), lambda cid: names.get(cid, set())) == plain


def test_titles_are_found_as_whole_words_in_a_text() -> None:
    index = LexicalIndex.empty().added([5, 6, 7], ["a", "b", "c"], ["Shirley Temple", "Temple", ""])
    assert index.named_in("The film starred shirley TEMPLE as Corliss.") == {5, 6}
    assert index.named_in("Templeton is not a temple-free word") == {6}
    assert index.removed([6]).named_in("Shirley Temple's temple") == {5}


def test_a_documents_title_comes_from_metadata_a_heading_or_its_file_name() -> None:
    assert title_of("text", {"title": "  Page\n title "}, "x") == "Page title"
    assert title_of("intro\n## Install steps ##\nmore", {}, "x") == "Install steps"
    assert title_of("no heading", {"format": "text", "source": "/d/user_guide-v2.txt"}, "x") == "user guide v2"
    assert title_of("no heading", {"format": "jsonl"}, "17") is None
    assert indexed_text("Body.", "Title") == "Title\nBody." and indexed_text("Title\nBody.", "Title") == "Title\nBody."


def test_bad_options_are_refused_with_what_is_allowed() -> None:
    with pytest.raises(InvalidInputError, match="link_hops >= 0"):
        SearchOptions(link_hops=-1)
    with pytest.raises(InvalidInputError, match="dense_weight=1.5"):
        SearchOptions(dense_weight=1.5)
