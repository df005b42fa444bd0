"""Chunking keeps every chunk within the token size, overlaps neighbours by at most the overlap,
cuts at paragraph and sentence ends where it can, covers the whole text, and gives stable ids."""

from __future__ import annotations

import hashlib
import random
import re
import subprocess
import sys
from typing import Any

import pytest

from chunkcache.errors import InvalidInputError
from chunkcache.retriever import Chunker, Document, content_hash, token_counter

WORDS = ("river bank model cache token prefix attention layer question answer paris museum "
         "quantum ledger harbour violin granite orchard lantern meadow").split()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def _text(seed: int = 0, paragraphs: int = 12) -> str:
    rng = random.Random(seed)
    return "\n\n".join(
        " ".join(_sentence(rng, rng.randint(3, 30)) for _ in range(rng.randint(1, 6)))
        for _ in range(paragraphs)
    )


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int] | None:
    return (b[0], a[1]) if b[0] < a[1] else None


@pytest.mark.parametrize(("size", "overlap"), [(32, 0), (48, 8), (64, 16), (20, 12)])
def test_chunks_respect_size_overlap_and_cover_the_text(minilm_tokenizer: Any, size: int, overlap: int) -> None:
    chunker = Chunker(minilm_tokenizer, size, overlap)
    text = _text(size)
    spans = chunker.split(text)
    assert len(spans) > 3
    count = token_counter(minilm_tokenizer)
    for s, e in spans:
        assert 0 < count(text[s:e]) <= size
    overlaps = 0
    for a, b in zip(spans, spans[1:]):
        assert a[0] < b[0] and a[1] < b[1]  # always progresses
        shared = _overlap(a, b)
        if shared:
            overlaps += 1
            assert count(text[shared[0]:shared[1]]) <= overlap
    assert (overlaps > 0) == (overlap > 0)
    covered = set()
    for s, e in spans:
        covered.update(range(s, e))
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace())


def test_chunks_end_at_sentence_ends(minilm_tokenizer: Any) -> None:
    text = _text(3)
    spans = Chunker(minilm_tokenizer, 64, 0).split(text)
    assert all(text[s:e].endswith(".") for s, e in spans)  # every sentence is shorter than 64 tokens
    assert all(text[s].isupper() for s, _ in spans)


def test_a_paragraph_end_is_preferred_to_filling_the_chunk(minilm_tokenizer: Any) -> None:
    rng = random.Random(1)
    first = " ".join(_sentence(rng, 8) for _ in range(4))
    second = " ".join(_sentence(rng, 8) for _ in range(4))
    count = token_counter(minilm_tokenizer)
    size = count(first) + count(second) // 2  # the first paragraph plus half the second would fit
    chunks = Chunker(minilm_tokenizer, size, 0).chunk(Document("d", f"{first}\n\n{second}"))
    assert chunks[0].text == first
    assert chunks[1].text == second


def test_long_sentences_and_huge_words_are_cut_within_the_size(minilm_tokenizer: Any) -> None:
    rng = random.Random(2)
    run_on = " ".join(rng.choice(WORDS) for _ in range(400))  # no punctuation at all
    blob = "x9Qz" * 300  # one 1200-character "word"
    text = f"{run_on}\n\n{blob}\n\nA short closing sentence."
    chunker = Chunker(minilm_tokenizer, 40, 8)
    count = token_counter(minilm_tokenizer)
    chunks = chunker.chunk(Document("d", text))
    assert all(count(c.text) <= 40 for c in chunks)
    assert "".join(c.text for c in chunks).count("x9Qz") >= 300
    assert chunks[-1].text.endswith("A short closing sentence.")


def test_chunk_metadata_and_ids(minilm_tokenizer: Any) -> None:
    doc = Document("doc-1", _text(5))
    chunks = Chunker(minilm_tokenizer, 48, 8).chunk(doc)
    for n, c in enumerate(chunks):
        assert c.doc_id == "doc-1"
        assert c.chunk_id == hashlib.sha256(c.text.encode()).hexdigest() == content_hash(c.text)
        assert c.metadata["chunk_index"] == n
        assert doc.text[c.metadata["start"]:c.metadata["end"]] == c.text
    again = Chunker(minilm_tokenizer, 48, 8).chunk(Document("doc-1", _text(5)))
    assert [c.chunk_id for c in again] == [c.chunk_id for c in chunks]


def test_ids_are_stable_across_processes() -> None:
    code = (
        "from chunkcache.retriever import Chunker, Document;"
        "import sys; t = sys.stdin.read();"
        "print(' '.join(c.chunk_id for c in Chunker(str.split, 30, 5).chunk(Document('d', t))))"
    )
    text = _text(7)
    here = " ".join(c.chunk_id for c in Chunker(str.split, 30, 5).chunk(Document("d", text)))
    out = subprocess.run([sys.executable, "-c", code], input=text, capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == here


def test_plain_callables_count_tokens() -> None:
    chunker = Chunker(lambda t: re.findall(r"\w+|[^\w\s]", t), 10, 2)
    text = "One two three. Four five six seven. Eight nine ten eleven twelve."
    spans = chunker.split(text)
    assert len(spans) >= 2 and all(chunker.count(text[s:e]) <= 10 for s, e in spans)
    assert Chunker(str.split, 5, 0).split("") == []


@pytest.mark.parametrize(("size", "overlap"), [(0, 0), (10, 10), (10, -1), (10, 2.5)])
def test_bad_sizes_are_refused(size: int, overlap: int) -> None:
    with pytest.raises(InvalidInputError, match="chunk_tokens|overlap_tokens"):
        Chunker(str.split, size, overlap)


def test_an_object_that_cannot_count_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="Hugging Face tokenizer"):
        Chunker(42, 10, 0)
