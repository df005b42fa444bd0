"""`ChunkCacheEngine` end to end on SmolLM2: precompute, reuse across processes, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from chunkcache.blend import Sampling
from chunkcache.config import Settings
from chunkcache.engine import ChunkCacheEngine
from chunkcache.errors import ContextTooLongError, InvalidInputError, UnknownStrategyError
from chunkcache.model import LoadedModel

QUESTION = "What is the capital of Germany?"
CHUNKS = [
    "Paris is the capital of France. It has the Eiffel tower.",
    "Madrid is the capital of Spain. It has the Prado museum.",
    "Berlin is the capital of Germany. It has the Brandenburg gate.",
]


@pytest.fixture()
def engine(smollm2: LoadedModel, store_path: Path) -> ChunkCacheEngine:
    return ChunkCacheEngine(Settings.load(env={}, store_path=store_path), model=smollm2)


def test_answer_reports_its_work(engine: ChunkCacheEngine) -> None:
    full = engine.answer(QUESTION, CHUNKS, strategy="full", max_new_tokens=16)
    assert full.text and full.token_ids[-1] in engine.model.eos_token_ids  # a whole answer
    assert full.reused_tokens == 0 and full.recomputed_tokens == full.prompt_tokens
    assert full.ttft_s > 0 and {"load_s", "blend_s", "decode_s", "total_s", "recompute_s", "first_token_s"} <= set(full.timings)
    assert full.cache_hits == full.cache_misses == 0  # full prefill reads no cache

    first = engine.answer(QUESTION, CHUNKS, strategy="cacheblend", recompute_ratio=0.5, max_new_tokens=16)
    assert (first.cache_hits, first.cache_misses) == (0, 3)
    second = engine.answer(QUESTION, CHUNKS, strategy="cacheblend", recompute_ratio=0.5, max_new_tokens=16)
    assert (second.cache_hits, second.cache_misses) == (3, 0)
    assert second.text == first.text
    assert 0 < second.reused_tokens < second.prompt_tokens
    assert second.params["recompute_ratio"] == 0.5 and second.strategy == "cacheblend"


def test_warm_up_answers_and_leaves_no_made_up_chunk_behind(engine: ChunkCacheEngine) -> None:
    before = engine.answer(QUESTION, CHUNKS, strategy="cacheblend", max_new_tokens=4)
    kept = set(engine.store.keys())
    assert engine.warm_up(["cacheblend", "reuse"]) > 0
    assert set(engine.store.keys()) == kept  # the head's and prefix's caches were there already
    after = engine.answer(QUESTION, CHUNKS, strategy="cacheblend", max_new_tokens=4)
    assert after.token_ids == before.token_ids and after.cache_hits == 3


def test_precompute_returns_stable_keys_and_fills_the_store(engine: ChunkCacheEngine) -> None:
    keys = engine.precompute(CHUNKS)
    assert keys == [engine.chunk_key(c) for c in CHUNKS] and len(set(keys)) == 3
    assert all(engine.store.contains(k) for k in keys)
    answer = engine.answer(QUESTION, CHUNKS, strategy="reuse", max_new_tokens=4)
    assert answer.cache_misses == 0


def test_a_second_process_reuses_stored_caches_without_prefilling(engine: ChunkCacheEngine, store_path: Path) -> None:
    engine.precompute(CHUNKS)
    code = f"""
import json, chunkcache.engine as eng
from chunkcache.config import Settings
def refuse(*a, **k):
    raise SystemExit("a chunk was prefilled although its cache was stored")
eng.prefill_chunks = eng.prefill_head = refuse
engine = eng.ChunkCacheEngine(Settings.load(env={{}}, store_path={str(store_path)!r}))
a = engine.answer({QUESTION!r}, {CHUNKS!r}, strategy="cacheblend", max_new_tokens=4)
print(json.dumps([a.cache_hits, a.cache_misses, engine.precompute({CHUNKS!r})]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    hits, misses, keys = json.loads(out.stdout.strip().splitlines()[-1])
    assert (hits, misses) == (3, 0)
    assert keys == engine.precompute(CHUNKS)


def test_a_lossy_codec_reencodes_stored_chunks_and_keeps_prefixes_raw(
    engine: ChunkCacheEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chunkcache.codec import read_header
    import chunkcache.engine as eng

    engine.use_codec("raw")
    raw_keys = engine.precompute(CHUNKS)
    engine.use_codec("cachegen-2")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a chunk stored raw was prefilled again")

    monkeypatch.setattr(eng, "prefill_chunks", refuse)
    keys = engine.precompute(CHUNKS)
    assert set(keys).isdisjoint(raw_keys)  # the codec is part of the key
    assert {read_header(engine.store.tier("disk").get_bytes(k))["codec"] for k in keys} == {"cachegen"}
    assert read_header(engine.store.tier("disk").get_bytes(engine.head_key()))["codec"] == "raw"
    lossy = engine.answer(QUESTION, CHUNKS, strategy="reuse", max_new_tokens=8)
    assert lossy.cache_hits == 3 and lossy.text


def test_stream_yields_the_answer_text(engine: ChunkCacheEngine) -> None:
    pieces = list(engine.stream(QUESTION, CHUNKS, strategy="cacheblend", max_new_tokens=12))
    answer = engine.answer(QUESTION, CHUNKS, strategy="cacheblend", max_new_tokens=12)
    assert len(pieces) > 1 and "".join(pieces).strip() == answer.text


def test_sampling_is_seeded(engine: ChunkCacheEngine) -> None:
    sampling = Sampling(temperature=1.0, top_p=0.9, seed=7)
    a = engine.answer(QUESTION, CHUNKS, strategy="reuse", max_new_tokens=10, sampling=sampling)
    b = engine.answer(QUESTION, CHUNKS, strategy="reuse", max_new_tokens=10, sampling=sampling)
    assert a.token_ids == b.token_ids


def test_generation_stops_at_max_tokens(engine: ChunkCacheEngine) -> None:
    assert len(engine.answer(QUESTION, CHUNKS, strategy="full", max_new_tokens=3).token_ids) == 3


@pytest.mark.parametrize(
    ("question", "chunks", "kwargs", "error", "message"),
    [
        ("  ", CHUNKS, {}, InvalidInputError, "question is empty"),
        (QUESTION, [], {}, InvalidInputError, "no chunks"),
        (QUESTION, ["ok", " "], {}, InvalidInputError, "chunk 1 is empty"),
        (QUESTION, CHUNKS, {"strategy": "nope"}, UnknownStrategyError, "unknown strategy"),
        (QUESTION, CHUNKS, {"max_new_tokens": 0}, InvalidInputError, "max_new_tokens"),
        (QUESTION, ["word " * 9000], {}, ContextTooLongError, "past the model's context of 8192"),
    ],
)
def test_bad_input_raises_value_errors(engine: ChunkCacheEngine, question, chunks, kwargs, error, message) -> None:
    with pytest.raises(error, match=message) as info:
        engine.answer(question, chunks, **kwargs)
    assert isinstance(info.value, ValueError)


def test_a_strategy_spec_means_the_same_in_a_request_and_in_the_settings(
    engine: ChunkCacheEngine, smollm2: LoadedModel, store_path: Path
) -> None:
    spec = "cacheblend:0.3:spread_v=0.5:sinks=2"
    by_spec = engine.answer(QUESTION, CHUNKS, strategy=spec, max_new_tokens=8, keep_logits=True)
    by_params = engine.answer(QUESTION, CHUNKS, strategy="cacheblend", recompute_ratio=0.3, spread_v=0.5, sinks=2,
                              max_new_tokens=8, keep_logits=True)
    configured = ChunkCacheEngine(Settings.load(env={}, store_path=store_path, strategy=spec), model=smollm2)
    by_settings = configured.answer(QUESTION, CHUNKS, max_new_tokens=8, keep_logits=True)
    assert by_spec.params["spread_v"] == 0.5 and by_spec.params["recompute_ratio"] == 0.3 and by_spec.params["sinks"] == 2
    for other in (by_params, by_settings):
        assert other.token_ids == by_spec.token_ids and torch.equal(other.first_token_logits, by_spec.first_token_logits)
    overridden = engine.answer(QUESTION, CHUNKS, strategy=spec, recompute_ratio=0.6, max_new_tokens=1)
    assert overridden.params["recompute_ratio"] == 0.6  # a parameter given apart wins over the spec's


@pytest.mark.parametrize(("spec", "message"), [
    ("cacheblend:0.2:spred_v=1", "has no parameter spred_v .it takes: .*spread_v"),
    ("epic:many", "is not a number"),
    ("warp", "unknown strategy"),
])
def test_a_bad_spec_is_one_clear_error_before_any_work(engine: ChunkCacheEngine, smollm2: LoadedModel, store_path: Path,
                                                         spec: str, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        engine.answer(QUESTION, CHUNKS, strategy=spec)
    with pytest.raises(InvalidInputError, match=message):
        ChunkCacheEngine(Settings.load(env={}, store_path=store_path, strategy=spec), model=smollm2)


def test_chunks_are_computed_behind_the_primer(smollm2: LoadedModel, store_path: Path, tmp_path: Path) -> None:
    bare = ChunkCacheEngine(Settings.load(env={}, store_path=store_path, chunk_primer="none"), model=smollm2)
    primed = ChunkCacheEngine(Settings.load(env={}, store_path=store_path), model=smollm2)
    own = tmp_path / "primer.txt"
    own.write_text("A first neutral passage.\n\nA second one.\n", encoding="utf-8")
    custom = ChunkCacheEngine(Settings.load(env={}, store_path=store_path, chunk_primer=str(own)), model=smollm2)
    keys = {e.chunk_key(CHUNKS[0]) for e in (bare, primed, custom)}
    assert len(keys) == 3  # a cache computed behind another primer is another entry
    for e in (bare, primed, custom):
        e.precompute(CHUNKS)
    head = len(smollm2.template.head_ids())
    offsets = {e.store.get(e.chunk_key(CHUNKS[0])).position_offset for e in (bare, primed, custom)}
    assert head in offsets and len(offsets) == 3  # primed chunks sit after head + primer
    reuse = [e.answer(QUESTION, CHUNKS, strategy="reuse", max_new_tokens=1, keep_logits=True) for e in (bare, primed)]
    assert not torch.allclose(reuse[0].first_token_logits, reuse[1].first_token_logits)
    full = primed.answer(QUESTION, CHUNKS, strategy="full", max_new_tokens=8)
    exact = primed.answer(QUESTION, CHUNKS, strategy="cacheblend", recompute_ratio=1.0, max_new_tokens=8)
    assert exact.token_ids == full.token_ids and exact.cache_misses == 0


@pytest.mark.parametrize("setting", ["/no/such/primer.txt", "EMPTY"])
def test_a_bad_primer_is_refused(smollm2: LoadedModel, store_path: Path, tmp_path: Path, setting: str) -> None:
    if setting == "EMPTY":
        (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
        setting = str(tmp_path / "empty.txt")
    with pytest.raises(InvalidInputError, match="chunk_primer"):
        ChunkCacheEngine(Settings.load(env={}, store_path=store_path, chunk_primer=setting), model=smollm2)


def test_warm_up_runs_the_configured_fusion_buckets(smollm2: LoadedModel, store_path: Path) -> None:
    """``fusion_warm`` names prompt sizes; warm-up fuses a made-up prompt landing in each one's
    bucket (on a GPU that captures it before anyone waits); a malformed value fails at start."""
    from chunkcache.blend.buckets import bucket_of, fixed_shapes, use_fusion_mode

    env = {"CHUNKCACHE_FUSION_MODE": "buckets", "CHUNKCACHE_FUSION_WARM": "512:32, 1100:48", "CHUNKCACHE_MAX_BATCH": "1",
           "CHUNKCACHE_STRATEGY": "reuse"}
    try:
        with ChunkCacheEngine(Settings.load(env=env, store_path=store_path), model=smollm2) as engine:
            engine.warm_up()
            stats = engine.fusion_graph_stats()
            buckets = {(total, questions) for total, questions, _ in fixed_shapes(smollm2.executor).inputs}
        assert {(bucket_of(512, 64) + 32 + 1, 32), (bucket_of(1100, 64) + 48 + 1, 48)} <= buckets
        assert stats is not None and stats["eager"] >= 3 and stats["captures"] == 0  # no graphs on the CPU
        for bad, message in (("8192", "fusion_warm takes CONTEXT:QUESTION"), ("8180:32", "past the model's context")):
            with pytest.raises(InvalidInputError, match=message):
                ChunkCacheEngine(Settings.load(env={**env, "CHUNKCACHE_FUSION_WARM": bad}, store_path=store_path),
                                 model=smollm2)
    finally:
        use_fusion_mode(smollm2.executor, "auto")


def test_requests_fused_side_by_side_each_report_their_own_tier_hits(engine: ChunkCacheEngine) -> None:
    """The tiers' counters are shared by every request; a request's `tier_hits` are its own finds
    (streamed in loader threads too), however many requests are fused at once."""
    sets = [CHUNKS, CHUNKS[:1], CHUNKS[1:]]
    for chunks in sets:
        engine.precompute(chunks)
    alone = [engine.answer(QUESTION, chunks, max_new_tokens=1).tier_hits for chunks in sets]
    assert [sum(hits.values()) for hits in alone] == [4, 2, 3]  # the fixed head and each chunk
    got: dict[int, list[dict[str, int]]] = {i: [] for i in range(len(sets))}

    def ask(i: int) -> None:
        for _ in range(4):
            got[i].append(engine.answer(QUESTION, sets[i], max_new_tokens=1).tier_hits)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(sets))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, hits in got.items():
        assert hits == [alone[i]] * 4, f"request set {i} counted another request's hits"
