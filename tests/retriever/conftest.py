"""Fixtures the retriever tests share: a small-chunk Chunker on the MiniLM tokenizer."""

from __future__ import annotations

from typing import Any

import pytest

from chunkcache.retriever import Chunker


@pytest.fixture()
def chunker(minilm_tokenizer: Any) -> Chunker:
    """24-token chunks overlapping by 4: several chunks from each short test document."""
    return Chunker(minilm_tokenizer, 24, 4)
