"""The Ray backend on a local Ray instance with 2 workers writing straight to a real shared tier
(redis-server, Mooncake Store) gives the same keys and the same bytes as the local backend with
the same batch size, chunks computed behind their neighbours in the index included; the workers
send back keys and sizes only."""

from __future__ import annotations

from pathlib import Path

import pytest

from chunkcache.codec import get_codec
from chunkcache.config import Settings
from chunkcache.engine import ChunkCacheEngine
from chunkcache.jobs.precompute import index_chunks, precompute_index
from chunkcache.retriever import ChunkIndex, Chunker, Document
from chunkcache.store import LmdbStore
from chunkcache.store.remote import open_remote

pytest.importorskip("ray")


@pytest.mark.parametrize("backend", [pytest.param("redis", marks=pytest.mark.slow), "mooncake"])
def test_ray_backend_matches_the_local_backend(tmp_path: Path, backend: str, embedder,  # type: ignore[no-untyped-def]
                                               request: pytest.FixtureRequest) -> None:
    shared_url = request.getfixturevalue("redis_url") if backend == "redis" else \
        request.getfixturevalue("mooncake_server").url
    from transformers import AutoTokenizer

    from chunkcache.jobs.ray_backend import precompute_ray
    from chunkcache.model.registry import resolve_model_dir

    local = Settings.load(env={}, store_path=tmp_path / "local", store_tiers="disk", threads=1,
                          chunk_primer="neighbours")
    index = ChunkIndex.build(tmp_path / "index", embedder)
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_dir(local.model, local.models_dir)))
    docs = [Document(f"d{i}", f"Item {i} is made in town {i}. " * 12) for i in range(5)]
    index.ingest_documents(docs, Chunker(tokenizer, 64, 0, name=local.model))

    engine = ChunkCacheEngine(local)
    summary = precompute_index(engine, index, batch_size=2, progress=False)  # the same prefill batches
    keys = sorted(engine.chunk_key(text) for text in index_chunks(index))
    engine.close()

    remote = Settings.load(env={}, store_path=tmp_path / "unused", store_tiers="remote", remote_url=shared_url,
                           threads=1, chunk_primer="neighbours")
    ray_summary, ray_keys = precompute_ray(index, remote, workers=2, batch_size=2)
    index.close()
    assert ray_keys == keys and ray_summary.computed == summary.computed == len(keys)
    assert ray_summary.context_tokens == summary.context_tokens > 0
    disk = LmdbStore(tmp_path / "local", get_codec("raw"))
    shared = open_remote(shared_url, get_codec("raw"))
    for key in keys:
        assert shared.get_bytes(key) == disk.get_bytes(key)
    assert ray_summary.written_bytes == sum(len(disk.get_bytes(key)) for key in keys)
    shared.clear()  # the session's shared service outlives this test
    shared.close()
