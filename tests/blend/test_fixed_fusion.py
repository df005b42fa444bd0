"""Fused prefills in fixed shapes (`chunkcache.blend.fixed_fusion`) on an emulated GPU
(`tests/fake_cuda.py`): the request's own answer, no host waits, and two requests of one bucket
making the very same device calls (what a CUDA graph captured for one replays for the other)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from chunkcache.blend import FusionInput, FusionResult, make_strategy
from chunkcache.blend.buckets import Segments, bucket_of, use_fusion_mode
from chunkcache.blend import fixed_fusion
from chunkcache.blend.fixed_fusion import run_fusion
from chunkcache.blend.layout import FusedBuffer
from chunkcache.errors import InvalidInputError
from chunkcache.model.executor import LayerExecutor
from tests.blend.emulated import Prompt, emulated_prompts, tier_sources
from tests.fake_cuda import FakeCuda

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "cacheblend": ("cacheblend", {}),  # today's defaults: kv, qattn, gradual, spread
    "cacheblend-plain": ("cacheblend", {"selection": "k", "gradual": False, "weight": "none", "spread_k": 0.0,
                                        "spread_v": 0.0}),
    "cacheblend-options": ("cacheblend", {"selection": "v", "weight": "qattn_add", "sinks": 2, "check_layer": 2,
                                          "recompute_ratio": 0.3, "spread_v": 0.0}),
    # twice the budget is more than the context: the first choice is capped, gradual steps skip
    "cacheblend-high": ("cacheblend", {"recompute_ratio": 0.6}),
    "reuse": ("reuse", {}),
}
# context tokens (head + chunks), chunks and question tokens: the first two share every bucket
SHAPES = {"a": (212, 5, 9), "b": (215, 7, 13), "other": (470, 12, 9)}
HEAD = 12  # the emulated prompts' head tokens


@dataclass
class Setup:
    executor: LayerExecutor
    fake: FakeCuda
    prompts: dict[str, Prompt]


@pytest.fixture(scope="module")
def setup() -> Setup:
    """A tiny random Llama in float32 on the emulated GPU, and prompts of the shapes above."""
    shapes = {}
    for name, (context, count, question) in SHAPES.items():
        tokens = context - HEAD
        shapes[name] = ([tokens // count + (i < tokens % count) for i in range(count)], question)
    prompts = emulated_prompts(torch.float32, 6, shapes)
    first = prompts["a"]
    return Setup(first.executor, first.fake, prompts)  # type: ignore[arg-type]


@pytest.fixture()
def mode(setup: Setup) -> Iterator[None]:
    yield
    use_fusion_mode(setup.executor, "off")


def fuse(setup: Setup, case: str, name: str, fusion_mode: str, where: str = "gpu") -> FusionResult:
    strategy, params = CASES[case]
    use_fusion_mode(setup.executor, fusion_mode)
    head, chunks = tier_sources(setup.prompts[name], where)
    inp = FusionInput(setup.prompts[name].pieces, head, chunks, max_new_tokens=4)
    return run_fusion(make_strategy(strategy, **params), setup.executor, inp)


@pytest.mark.parametrize("name", ["a", "other"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fixed_shapes_give_the_requests_own_answer(setup: Setup, mode: None, case: str, name: str) -> None:
    """Padding to the bucket changes no real token's arithmetic: the same tokens recomputed, the
    same fused cache and logits as the request's own shapes, up to float rounding."""
    with setup.fake.active():
        own = fuse(setup, case, name, "off")
        fixed = fuse(setup, case, name, "buckets")
    length = own.cache.length
    assert (fixed.cache.length, fixed.cache.next_position) == (length, own.cache.next_position)
    assert (fixed.recomputed_tokens, fixed.reused_tokens) == (own.recomputed_tokens, own.reused_tokens)
    torch.testing.assert_close(fixed.logits, own.logits, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(fixed.cache.kv[:, :, :, :length], own.cache.kv[:, :, :, :length], atol=2e-4, rtol=1e-4)
    assert int(torch.argmax(fixed.logits)) == int(torch.argmax(own.logits))


def _segment_calls(setup: Setup, case: str, name: str) -> list[tuple[str, Any, Any]]:
    """Every device call the segments made (not the loading between them): what graphs bake in."""
    calls: list[tuple[str, Any, Any]] = []
    original = Segments.segment

    def recorded(self: Segments, fn: Any) -> None:
        with setup.fake.watch() as record:
            original(self, fn)
        calls.extend(record.calls)

    Segments.segment = recorded  # type: ignore[method-assign]
    try:
        with setup.fake.active():
            fuse(setup, case, name, "buckets", where="host")
    finally:
        Segments.segment = original  # type: ignore[method-assign]
    return calls


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_requests_in_one_bucket_make_the_same_device_calls(setup: Setup, mode: None, case: str) -> None:
    """Other context, question and chunk counts in one bucket: identical calls, shapes and numbers
    (so one capture replays for both); a request of another bucket differs (the check can fail)."""
    a, b, other = (_segment_calls(setup, case, name) for name in ("a", "b", "other"))
    assert len(a) > 100
    assert a == b
    assert a != other


@pytest.mark.parametrize("where", ["gpu", "host"])
@pytest.mark.parametrize("case", ["cacheblend", "reuse"])
def test_no_wait_for_the_host_in_fixed_shapes(setup: Setup, mode: None, case: str, where: str) -> None:
    """The fixed-shape path waits for nothing either: the request's values go up in one
    asynchronous copy, the stored caches as they arrive."""
    original = fixed_fusion._selective_layer

    def counted(*args: Any) -> None:  # device operations counted per layer of the selective loop
        setup.fake.layer = args[6]
        original(*args)
        setup.fake.layer = -1

    fixed_fusion._selective_layer = counted  # type: ignore[assignment]
    try:
        with setup.fake.active():
            with setup.fake.watch() as record:
                result = fuse(setup, case, "a", "buckets", where)
            int(torch.argmax(result.logits))
    finally:
        fixed_fusion._selective_layer = original  # type: ignore[assignment]
    assert not record.waits, record.summary()
    # the bounds of the own-shape path (tests/blend/test_device_path.py): a selective layer, and
    # everything (probe and question pass included)
    layers = setup.executor.num_layers
    assert sorted(layer for layer in record.ops_by_layer if layer >= 0) == list(range(layers))
    assert max(n for layer, n in record.ops_by_layer.items() if layer >= 0) <= 150, dict(record.ops_by_layer)
    assert record.ops <= 150 * layers * 2, record.ops


def test_requests_outside_fixed_shapes_run_in_their_own(setup: Setup, mode: None) -> None:
    """Options without a fixed-shape form (per-chunk budgets, random tokens, attention weights)
    still answer, in their own shapes: the same result as with fixed shapes off."""
    with setup.fake.active():
        for params in ({"per_chunk": True}, {"selection": "random"}, {"weight": "attn"}):
            results = []
            for fusion_mode in ("off", "buckets"):
                use_fusion_mode(setup.executor, fusion_mode)
                head, chunks = tier_sources(setup.prompts["a"], "gpu")
                inp = FusionInput(setup.prompts["a"].pieces, head, chunks, max_new_tokens=4)
                results.append(run_fusion(make_strategy("cacheblend", **params), setup.executor, inp))
            assert torch.equal(results[0].logits, results[1].logits), params


def test_bucket_sizes() -> None:
    """At most 1/8 padding, eight buckets an octave, never below the minimum."""
    assert [bucket_of(n, 64) for n in (1, 64, 65, 1000, 1024, 1025, 8277)] == [64, 64, 72, 1024, 1024, 1152, 9216]
    for n in range(64, 5000, 37):
        assert n <= bucket_of(n, 64) <= n * 9 / 8 + 1


def test_fusion_mode_is_checked(setup: Setup) -> None:
    with pytest.raises(InvalidInputError, match="fusion_mode must be one of"):
        use_fusion_mode(setup.executor, "fast")
    cpu = LayerExecutor.__new__(LayerExecutor)
    cpu.device = torch.device("cpu")
    with pytest.raises(InvalidInputError, match="needs the model on a CUDA device"):
        use_fusion_mode(cpu, "graphs")
    assert use_fusion_mode(cpu, "auto") is None  # the CPU keeps the request's own shapes


def test_placement_waits_between_segments(setup: Setup, mode: None) -> None:
    """Each layer of stored caches is placed before the segment that reads it (host steps in
    the run), not all at once before the fusion."""
    order: list[str] = []
    wait, segment = FusedBuffer.wait, Segments.segment

    def waited(self: FusedBuffer, layer: int) -> None:
        order.append(f"place{layer}")
        wait(self, layer)

    def ran(self: Segments, fn: Any) -> None:
        order.append("segment")
        segment(self, fn)

    FusedBuffer.wait, Segments.segment = waited, ran  # type: ignore[method-assign]
    try:
        with setup.fake.active():
            fuse(setup, "reuse", "a", "buckets", where="host")
    finally:
        FusedBuffer.wait, Segments.segment = wait, segment  # type: ignore[method-assign]
    layers = setup.executor.num_layers
    assert order == ["segment"] + [x for layer in range(layers) for x in (f"place{layer}", "segment")] + ["segment"]


@pytest.mark.parametrize("case", ["cacheblend", "reuse"])
def test_fixed_shapes_on_the_cpu_with_a_real_model(smollm2: Any, fusion_input: FusionInput, case: str) -> None:
    """SmolLM2 on the CPU (its attention reads the host index and takes the selection's segments
    unsorted): fixed shapes give the request's own first token, logits and cache."""
    strategy, params = CASES[case]
    results = []
    try:
        for fusion_mode in ("off", "buckets"):
            use_fusion_mode(smollm2.executor, fusion_mode)
            results.append(run_fusion(make_strategy(strategy, **params), smollm2.executor, fusion_input))
    finally:
        use_fusion_mode(smollm2.executor, "auto")
    own, fixed = results
    n = own.cache.length
    assert fixed.recomputed_tokens == own.recomputed_tokens
    torch.testing.assert_close(fixed.logits, own.logits, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(fixed.cache.kv[:, :, :, :n], own.cache.kv[:, :, :, :n], atol=1e-3, rtol=1e-4)
    assert int(torch.argmax(fixed.logits)) == int(torch.argmax(own.logits))


@pytest.mark.parametrize("case", ["cacheblend", "cacheblend-options"])
def test_replayed_captures_give_each_requests_own_answer(setup: Setup, mode: None, case: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA graphs emulated (`tests/fake_cuda.FakeGraph`: replays rerun the captured calls on the
    captured tensor objects only): request a captures its bucket, request b (other context,
    question and chunk counts) replays it and gets its own answer, as does a again; a request of
    another bucket captures its own."""
    import contextlib

    from chunkcache.blend import buckets
    from tests.fake_cuda import FakeGraph, fake_capture

    runner = use_fusion_mode(setup.executor, "buckets")
    runner.graphs = True  # the emulated device captures
    monkeypatch.setattr(buckets.torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(buckets.torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(buckets.torch.cuda, "graph", lambda graph, **kw: fake_capture(graph, [runner.kv]))
    with setup.fake.active():
        own = {name: fuse(setup, case, name, "off") for name in ("a", "b", "other")}
        use_fusion_mode(setup.executor, "buckets")  # (fuse set the mode: put the capturing runner back)
        buckets._fixed.set(setup.executor, runner)
        replayed = {}
        for name in ("a", "b", "a", "other"):
            head, chunks = tier_sources(setup.prompts[name], "host")
            inp = FusionInput(setup.prompts[name].pieces, head, chunks, max_new_tokens=4)
            strategy, params = CASES[case]
            replayed[name] = run_fusion(make_strategy(strategy, **params), setup.executor, inp)
            torch.testing.assert_close(replayed[name].logits, own[name].logits, atol=2e-4, rtol=1e-4)
            n = own[name].cache.length
            torch.testing.assert_close(replayed[name].cache.kv[:, :, :, :n], own[name].cache.kv[:, :, :, :n],
                                       atol=2e-4, rtol=1e-4)
    assert (runner.stats.captures, runner.stats.replays) == (2, 2), runner.stats
