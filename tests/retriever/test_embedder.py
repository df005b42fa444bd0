"""The MiniLM embedder: normalised float32 vectors from the packaged model or any local folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from chunkcache.retriever import DEFAULT_EMBEDDER, Embedder, EmbedderNotFoundError, MiniLMEmbedder, default_model_path


def test_vectors_are_normalised_float32_and_batch_independent(embedder: MiniLMEmbedder) -> None:
    texts = ["The cat sat on the mat.", "Stock markets fell sharply on Monday.", "A kitten rests on a rug."]
    vectors = embedder.embed(texts)
    assert isinstance(embedder, Embedder)
    assert (embedder.name, embedder.dim) == (DEFAULT_EMBEDDER, 384)
    assert vectors.dtype == np.float32 and vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(embedder.embed([texts[1]])[0], vectors[1], atol=1e-5)  # padding-free alone
    sims = vectors @ vectors.T
    assert sims[0, 2] > sims[0, 1] + 0.3  # cat/kitten closer than cat/stocks
    assert embedder.embed([]).shape == (0, 384)


def test_any_local_folder_works_and_has_the_same_fingerprint(tmp_path: Path, embedder: MiniLMEmbedder) -> None:
    folder = tmp_path / "my-minilm"
    source = default_model_path()
    for path in source.rglob("*"):
        if path.is_file():
            (folder / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            (folder / path.relative_to(source)).symlink_to(path)
    local = MiniLMEmbedder(folder, batch_size=2)
    assert local.name == "my-minilm" and local.fingerprint == embedder.fingerprint
    texts = ["one", "two words", "and three words"]
    np.testing.assert_allclose(local.embed(texts), embedder.embed(texts), atol=1e-5)


def test_a_folder_without_a_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EmbedderNotFoundError, match="not a transformers model folder"):
        MiniLMEmbedder(tmp_path)


def test_queries_run_on_query_threads_and_leave_torchs_thread_count_alone(embedder: MiniLMEmbedder) -> None:
    import torch

    before, threads = torch.get_num_threads(), embedder.query_threads
    try:
        embedder.query_threads = 0
        pooled = embedder.embed(["Who built the stone bridge?"])
        embedder.query_threads = 1
        one_thread = embedder.embed(["Who built the stone bridge?"])
    finally:
        embedder.query_threads = threads
    np.testing.assert_allclose(one_thread, pooled, atol=1e-5)
    assert torch.get_num_threads() == before
