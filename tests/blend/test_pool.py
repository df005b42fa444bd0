"""`KVPool`: zeroed buffers by size class, reused after release, all within the byte budget."""

from __future__ import annotations

import pytest
import torch

from chunkcache.blend.pool import KVPool
from chunkcache.model import LoadedModel


def test_buffers_are_zeroed_reused_by_class_and_stay_within_the_budget(smollm2: LoadedModel) -> None:
    ex = smollm2.executor
    pool = KVPool(ex, budget=10 * 64 * 46080, granule=64)  # SmolLM2: 46,080 bytes a token
    assert pool.token_bytes == 46080 and pool.tokens_for(1) == 64 and pool.tokens_for(65) == 128
    a = pool.acquire(100)
    assert a.shape == (ex.num_layers, 2, ex.num_kv_heads, 128, ex.head_dim) and not a.any()
    a.fill_(1.0)
    pool.release(a)
    b = pool.acquire(70)  # same class: the same memory, zeroed again
    assert b.data_ptr() == a.data_ptr() and not b.any()
    assert pool.used == pool.bytes_for(70)
    assert not pool.fits(9 * 64)  # 2 of 10 granules in use
    with pytest.raises(MemoryError):
        pool.acquire(9 * 64)
    pool.release(b)
    c = pool.acquire(10 * 64)  # needs the whole budget: the free 128-token buffer is dropped first
    assert pool.used == pool.total and pool._held == 0
    pool.release(c)
    assert pool.used == 0


def test_a_pool_buffer_gives_the_same_answer_as_a_fresh_one(smollm2: LoadedModel, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from chunkcache.config import Settings
    from chunkcache.engine import ChunkCacheEngine

    engine = ChunkCacheEngine(Settings.load(env={}, store_path=tmp_path / "store"), model=smollm2)
    chunks = ["The lighthouse stands on the northern cliff.", "Its lamp was first lit in 1874."]
    pool = KVPool(smollm2.executor, 2**28, granule=256)
    for strategy in ("full", "cacheblend", "ape"):
        fresh = engine.answer("When was the lamp first lit?", chunks, strategy=strategy, max_new_tokens=6)
        plan = engine.plan("When was the lamp first lit?", chunks, strategy, 6)
        buf = pool.acquire(plan.kv_tokens)  # a class larger than the request: capacity to spare
        generation = engine.begin(plan, buf)
        while not generation.done:
            engine.decode_step([generation])
        assert generation.answer().token_ids == fresh.token_ids, strategy
        assert generation.seq.cache.kv.data_ptr() == buf.data_ptr()  # the fusion filled the pool's buffer
        pool.release(buf)
    with pytest.raises(ValueError, match="cannot hold"):
        engine.begin(engine.plan("When?", chunks, "full", 6), torch.zeros(1, 2, 3, 4, 5))


def test_what_a_failed_fusion_left_to_place_goes_with_its_fused_buffer(smollm2: LoadedModel) -> None:
    import gc

    from chunkcache.blend import layout
    from chunkcache.kv import ChunkKV
    from chunkcache.model.prompt import PromptPieces

    ex = smollm2.executor
    pool = KVPool(ex, 2**26, granule=64)
    pieces = PromptPieces((1, 2, 3), ((4, 5),), (6,))
    lay = layout.sequential_layout(pieces)
    head = ChunkKV(torch.ones(ex.num_layers, 2, ex.num_kv_heads, 3, ex.head_dim), (1, 2, 3), 0, "m", "")
    chunk = ChunkKV(torch.ones(ex.num_layers, 2, ex.num_kv_heads, 2, ex.head_dim), (4, 5), 0, "m", "p")
    buf = pool.acquire(lay.length + 4)
    fused = layout.assemble_cache(ex, lay, head, (chunk,), buf)  # layers placed when first read
    assert fused.kv is buf and fused.layer(0)[1, :, :5].eq(1).all() and buf[1].eq(0).all()  # values; layer 1 not yet
    del fused  # a fusion that failed before it reached every layer
    gc.collect()
    pool.release(buf)
    again = pool.acquire(lay.length + 4)
    assert again.data_ptr() == buf.data_ptr() and again.eq(0).all()  # nothing placed into the reused buffer
    fused = layout.assemble_cache(ex, lay, head, (chunk,), again)
    assert fused.place_all()[:, 1, :, :5].eq(1).all() and fused._placement is None  # placed, sources let go
    pool.release(again)
