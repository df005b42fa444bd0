"""The engine through the tiered store with SmolLM2: damaged entries on disk or in redis are
recomputed and the answer is the one a clean store gives; redis down still answers."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import redis
import torch

from chunkcache.config import Settings
from chunkcache.engine import ChunkCacheEngine
from chunkcache.model import LoadedModel
from tests.conftest import RedisServer

QUESTION = "Which city has the Brandenburg gate?"
CHUNKS = [
    "Paris is the capital of France. It has the Eiffel tower.",
    "Berlin is the capital of Germany. It has the Brandenburg gate.",
]


def _flip(data: bytes, at: float = 0.5, bit: int = 0x04) -> bytes:
    damaged = bytearray(data)
    damaged[int(len(damaged) * at)] ^= bit
    return bytes(damaged)


def _damage(data: bytes, rng: random.Random) -> bytes:
    """A bit flipped, or the entry cut short, at a random offset (header included)."""
    if rng.random() < 0.5:
        return _flip(data, rng.random(), 1 << rng.randrange(8))
    return data[: rng.randrange(len(data))]


def test_damaged_entries_are_recomputed_and_the_answer_is_unchanged(
    smollm2: LoadedModel, store_path: Path, redis_url: str
) -> None:
    settings = Settings.load(env={}, store_path=store_path, store_tiers="disk,remote", remote_url=redis_url)
    engine = ChunkCacheEngine(settings, model=smollm2)
    clean = engine.answer(QUESTION, CHUNKS, strategy="cacheblend", max_new_tokens=12)
    disk, remote = engine.store.tiers
    keys = [engine.chunk_key(c) for c in CHUNKS]
    client = redis.Redis.from_url(redis_url)
    for key in keys:
        disk.put_bytes(key, _flip(disk.get_bytes(key)))
        client.set(f"chunkcache:e:{key}", _flip(client.get(f"chunkcache:e:{key}")))
    again = engine.answer(QUESTION, CHUNKS, strategy="cacheblend", max_new_tokens=12)
    assert again.text == clean.text and again.cache_misses == 2
    stats = engine.store.stats()
    assert stats["disk"]["corrupt"] == 2 and stats["remote"]["corrupt"] == 2
    third = engine.answer(QUESTION, CHUNKS, strategy="cacheblend", max_new_tokens=12)
    assert third.cache_hits == 2 and third.text == clean.text  # recomputed entries were stored again
    rng = random.Random(11)
    for round_ in range(4):  # random flips and cuts, in both tiers at once
        for key in keys:
            disk.put_bytes(key, _damage(disk.get_bytes(key), rng))
            client.set(f"chunkcache:e:{key}", _damage(client.get(f"chunkcache:e:{key}"), rng))
        damaged = engine.answer(QUESTION, CHUNKS, strategy="cacheblend", max_new_tokens=12)
        assert damaged.text == clean.text and damaged.cache_misses == 2, f"round {round_}"
    stats = engine.store.stats()
    assert stats["disk"]["corrupt"] == 2 + 8 and stats["remote"]["corrupt"] == 2 + 8


def test_answers_still_come_when_redis_is_down(smollm2: LoadedModel, store_path: Path, redis_server: RedisServer) -> None:
    private = RedisServer(redis_server.folder)
    private.start()
    settings = Settings.load(env={}, store_path=store_path, store_tiers="remote", remote_url=private.url,
                             remote_timeout_s=0.5)
    engine = ChunkCacheEngine(settings, model=smollm2)
    first = engine.answer(QUESTION, CHUNKS, strategy="cacheblend", max_new_tokens=8)
    private.stop()
    down = engine.answer(QUESTION, CHUNKS, strategy="cacheblend", max_new_tokens=8)
    assert down.text == first.text and down.cache_hits == 0  # misses, recomputed
    assert engine.store.stats()["remote"]["errors"] >= 1


def test_streamed_layers_fuse_exactly_like_whole_loads(smollm2: LoadedModel, store_path: Path) -> None:
    answers = {}
    for stream in (False, True):
        settings = Settings.load(env={}, store_path=store_path, store_tiers="disk", codec="cachegen-2",
                                 stream_layers=stream)
        engine = ChunkCacheEngine(settings, model=smollm2)
        engine.precompute(CHUNKS)
        answers[stream] = engine.answer(QUESTION, CHUNKS, strategy="cacheblend", max_new_tokens=8, keep_logits=True)
    timings = answers[True].timings
    assert answers[True].cache_hits == 2 and timings["stream_load_s"] > 0
    assert 0 <= timings["stream_wait_s"] <= timings["stream_load_s"] + timings["blend_s"]
    assert answers[True].text == answers[False].text
    assert torch.equal(answers[True].first_token_logits, answers[False].first_token_logits)


def test_a_layer_failing_mid_stream_is_dropped_and_recomputed(
    smollm2: LoadedModel, store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chunkcache.codec.base import LayeredCodec
    from chunkcache.errors import CorruptCacheError

    settings = Settings.load(env={}, store_path=store_path, store_tiers="disk")
    engine = ChunkCacheEngine(settings, model=smollm2)
    clean = engine.answer(QUESTION, CHUNKS, strategy="cacheblend", max_new_tokens=8)
    original = LayeredCodec.layer

    def broken(self, entry, index, device):  # type: ignore[no-untyped-def]
        if index == 5:
            raise CorruptCacheError("simulated decode failure")
        return original(self, entry, index, device)

    monkeypatch.setattr(LayeredCodec, "layer", broken)
    again = engine.answer(QUESTION, CHUNKS, strategy="cacheblend", max_new_tokens=8)
    assert again.text == clean.text
    assert engine.store.stats()["disk"]["corrupt"] == 2


def test_with_a_lossy_codec_a_miss_answers_like_the_hits_after_it(smollm2: LoadedModel, store_path: Path) -> None:
    settings = Settings.load(env={}, store_path=store_path, codec="cachegen-1")
    engine = ChunkCacheEngine(settings, model=smollm2)
    first = engine.answer(QUESTION, CHUNKS, strategy="reuse", max_new_tokens=4, keep_logits=True)
    second = engine.answer(QUESTION, CHUNKS, strategy="reuse", max_new_tokens=4, keep_logits=True)
    assert (first.cache_misses, second.cache_hits) == (2, 2)
    assert torch.equal(first.first_token_logits, second.first_token_logits)


@pytest.mark.parametrize("stream", [False, True])
def test_a_valid_entry_under_another_chunks_key_is_dropped_and_recomputed(
    smollm2: LoadedModel, store_path: Path, stream: bool
) -> None:
    settings = Settings.load(env={}, store_path=store_path, store_tiers="cpu,disk", stream_layers=stream)
    engine = ChunkCacheEngine(settings, model=smollm2)
    clean = engine.answer(QUESTION, CHUNKS, strategy="cacheblend", max_new_tokens=8)
    memory, disk = engine.store.tiers
    paris, berlin = (engine.chunk_key(c) for c in CHUNKS)
    disk.put_bytes(berlin, disk.get_bytes(paris))  # a sound entry, but Paris's, under Berlin's key
    memory.delete(berlin)
    again = engine.answer(QUESTION, CHUNKS, strategy="cacheblend", max_new_tokens=8)
    assert again.text == clean.text and (again.cache_hits, again.cache_misses) == (1, 1)
    assert engine.store.stats()["disk"]["corrupt"] == 1
    third = engine.answer(QUESTION, CHUNKS, strategy="cacheblend", max_new_tokens=8)
    assert third.cache_hits == 2 and third.text == clean.text  # the recomputed entry took its place
