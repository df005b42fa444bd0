"""`precompute_texts`: batched, idempotent, and timed beside the bare batched prefill loop."""

from __future__ import annotations

from pathlib import Path

import pytest

from chunkcache.config import Settings
from chunkcache.engine import ChunkCacheEngine
from chunkcache.errors import InvalidInputError
from chunkcache.jobs.precompute import precompute_texts
from chunkcache.model import LoadedModel

TEXTS = [f"Town {i} lies on river {i % 3}; its bridge was rebuilt in {1900 + i}." for i in range(5)]


def test_precompute_batches_compares_with_the_bare_loop_and_skips_stored_chunks(
    smollm2: LoadedModel, store_path: Path
) -> None:
    with ChunkCacheEngine(Settings.load(env={}, store_path=store_path), model=smollm2) as engine:
        summary = precompute_texts(engine, TEXTS, batch_size=2, progress=False, bare_every=2)
        assert (summary.computed, summary.skipped, summary.batch_size) == (5, 0, 2)
        assert summary.bare_batches == 2  # batches 0 and 2 of 3
        assert summary.vs_bare is not None and summary.vs_bare > 0 and summary.bare_tokens_per_s
        assert all(engine.stored(t) for t in TEXTS)
        again = precompute_texts(engine, TEXTS + TEXTS[:1], progress=False)
        assert (again.computed, again.skipped, again.bare_batches, again.vs_bare) == (0, 6, 0, None)
        answer = engine.answer("Which river?", TEXTS[:3], strategy="reuse", max_new_tokens=2)
        assert (answer.cache_hits, answer.cache_misses) == (3, 0)
        with pytest.raises(InvalidInputError, match="batch_size"):
            precompute_texts(engine, TEXTS, batch_size=0, progress=False)


def test_answering_prefills_its_missing_chunks_together_and_stores_them(
    smollm2: LoadedModel, store_path: Path
) -> None:
    with ChunkCacheEngine(Settings.load(env={}, store_path=store_path), model=smollm2) as engine:
        engine.precompute(TEXTS[:1])
        chunks = [TEXTS[0], TEXTS[1], TEXTS[2], TEXTS[1]]  # a repeated chunk is computed once
        first = engine.answer("Which river?", chunks, strategy="reuse", max_new_tokens=4)
        assert (first.cache_hits, first.cache_misses) == (1, 3)
        assert all(engine.stored(t) for t in TEXTS[:3])
        second = engine.answer("Which river?", chunks, strategy="reuse", max_new_tokens=4)
        assert (second.cache_hits, second.cache_misses, second.text) == (4, 0, first.text)
