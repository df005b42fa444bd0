"""The fused path on an emulated GPU (`tests/fake_cuda.py`): from the call to the first token no
strategy makes the GPU wait for the host (no pageable copy, no read of a device value, no output
size that depends on device values, no host tensor in a device operation), whether the chunk
caches come from the GPU tier (on the device) or from host memory (the CPU tier's pinned caches,
decoded disk entries); a layer costs a bounded number of device operations; and a batched decode
step reads back once (the tokens) and copies only asynchronously."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from chunkcache.blend import FusionInput, Sampling, make_strategy
from chunkcache.blend.cachecraft import ChunkPlan
from chunkcache.blend.decode import DecodeSequence, step
from chunkcache.blend.layout import FusedBuffer
from chunkcache.codec import rans_triton
from chunkcache.model import sparse_attention
from chunkcache.model.prompt import PromptPieces
from tests.blend.emulated import Prompt, emulated_prompts, tier_sources
from tests.fake_cuda import Record

LAYERS = 6
PLAIN = {"selection": "k", "gradual": False, "weight": "none", "spread_k": 0.0, "spread_v": 0.0}
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "full": ("full", {}),
    "reuse": ("reuse", {}),
    "epic": ("epic", {"epic_k": 4}),
    "ape": ("ape", {}),
    "cacheblend": ("cacheblend", {}),  # today's defaults: kv, qattn, gradual, spread
    "cacheblend-plain": ("cacheblend", PLAIN),
    "cacheblend-options": ("cacheblend", {"weight": "attn", "sinks": 2, "per_chunk": True}),
    "cacheblend-qattn_add": ("cacheblend", {"weight": "qattn_add", "selection": "v"}),
    "cacheblend-random": ("cacheblend", {"selection": "random"}),
    "cacheblend-question-probe": ("cacheblend", {"selection": "qattn"}),
    "cachecraft": ("cachecraft", {}),
    "cachecraft-plans": ("cachecraft", {}),
    "cachecraft-plans-inter": ("cachecraft", {"select": "inter"}),
}
# Device operations per layer of a prefill: about 40 for a plain layer (norms, projections,
# rotary, cache writes, attention, MLP); placing the stored caches, CacheBlend's deviation
# check, gradual filtering and the spread add to it. The bound is about twice what a layer
# costs today: a change that makes per-layer work grow with the prompt or the chunk count
# (a Python loop over chunks, per-block attention) fails it.
MAX_OPS_PER_LAYER = 150


@pytest.fixture(scope="module")
def prompts() -> dict[int, Prompt]:
    """A tiny random Llama (bfloat16, as on a GPU) and prompts of 6 and 12 chunks."""
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}
    shapes = {count: ([36 + (17 * i) % 25 for i in range(count)], 9) for count in (6, 12)}
    return emulated_prompts(torch.bfloat16, LAYERS, shapes, rope_parameters=rope)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def prompt(prompts: dict[int, Prompt]) -> Prompt:
    return prompts[6]


def _plans(pieces: PromptPieces) -> tuple[ChunkPlan, ...]:
    out = []
    for i, chunk in enumerate(pieces.chunks):
        inter = tuple(float((5 * t + i) % 11) for t in range(len(chunk)))
        out.append(ChunkPlan("independent", tuple(range(0, len(chunk), 6)), 0.6, 0.0, 0.2, inter) if i % 2
                   else ChunkPlan("independent", None))
    return tuple(out)


def fused_first_token(p: Prompt, case: str, where: str) -> tuple[Record, int]:
    """Run one strategy to its first token under the emulation; the record and the token."""
    name, params = CASES[case]
    fusion = make_strategy(name, **params)
    plans = _plans(p.pieces) if case.startswith("cachecraft-plans") else ()
    original = FusedBuffer.wait

    def counted(self: FusedBuffer, layer: int) -> None:  # the main pass reaching a layer
        p.fake.layer = layer
        original(self, layer)

    FusedBuffer.wait = counted  # type: ignore[method-assign]
    try:
        with p.fake.active():
            head, chunks = tier_sources(p, where)
            inp = FusionInput(p.pieces, head, chunks if fusion.uses_cache else (), max_new_tokens=4, plans=plans)
            with p.fake.watch() as record:
                token = torch.argmax(fusion.fuse(p.executor, inp).logits)
            return record, int(token)  # the one read: the first token itself
    finally:
        FusedBuffer.wait = original  # type: ignore[method-assign]


@pytest.fixture()
def backend(request: pytest.FixtureRequest, prompt: Prompt, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Both ways a selection attends on a GPU. The Triton kernel cannot run in the emulation: its
    reference (same contract, device operations only) stands in for the one launch."""
    if request.param == "triton":
        monkeypatch.setattr(sparse_attention, "triton_available", lambda: True)
        monkeypatch.setattr(sparse_attention, "sparse_query_attention", sparse_attention.reference_sparse_attention)
    prompt.executor.use_attention_backend(request.param)
    yield request.param
    prompt.executor.use_attention_backend("sdpa")


# where the caches come from does not touch the attention call: one backend covers both sources
@pytest.mark.parametrize(("where", "backend"), [("gpu", "sdpa"), ("host", "sdpa"), ("gpu", "triton")],
                         indirect=["backend"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_no_wait_for_the_host_before_the_first_token(prompt: Prompt, case: str, where: str, backend: str) -> None:
    record, _ = fused_first_token(prompt, case, where)
    assert not record.waits, f"{case}: {record.summary()}"
    # host data moves only asynchronously: the prompt's ids and positions, the host's choices
    # (EPIC's tokens, masks), the rotary shifts, and in host mode each layer of stored caches
    per_layer = LAYERS + 1 if where == "host" else 0
    assert record.async_copies <= 8 + per_layer * (1 + len(prompt.chunks)), record.async_copies
    busiest = max(n for layer, n in record.ops_by_layer.items() if layer >= 0)
    assert busiest <= MAX_OPS_PER_LAYER, dict(record.ops_by_layer)
    assert record.ops <= MAX_OPS_PER_LAYER * LAYERS * 2, record.ops  # probe and question pass included


@pytest.mark.parametrize("codec", ["int8", "kivi2", "cachegen-2", "cachegen-1:delta=1:group=4"])
@pytest.mark.parametrize("case", ["reuse", "cacheblend"])
def test_no_wait_when_the_device_decodes_the_disk_tiers_bytes(prompt: Prompt, monkeypatch: pytest.MonkeyPatch,
                                                              case: str, codec: str) -> None:
    """Encoded layers: only their bytes cross, asynchronously; dequantising (and cachegen's rANS
    kernel, which cannot run in the emulation: a device operation stands in for its one launch)
    runs on the device, one layer ahead, with no wait."""
    monkeypatch.setattr(rans_triton, "decode_groups", lambda states, cum, words, meta, out: out.zero_())
    record, _ = fused_first_token(prompt, case, f"disk:{codec}")
    assert not record.waits, f"{case} from {codec}: {record.summary()}"
    assert record.async_copies >= LAYERS * len(prompt.chunks)  # every layer of every chunk went up


@pytest.mark.parametrize("case", ["reuse", "cacheblend", "cachecraft-plans", "ape"])
def test_a_layer_costs_the_same_device_operations_whatever_the_prompt(prompts: dict[int, Prompt], case: str) -> None:
    """Twice the chunks, other lengths: the same operations per layer (no Python loop over chunks
    or attention blocks inside the layer loop), only bigger."""
    small, large = (fused_first_token(prompts[n], case, "host")[0] for n in (6, 12))
    per_layer = [{layer: n for layer, n in r.ops_by_layer.items() if layer >= 0} for r in (small, large)]
    assert per_layer[0] == per_layer[1]


def test_the_emulation_catches_a_wait(prompt: Prompt) -> None:
    """The check above can fail: a device value read on the host, a pageable copy and a host
    index are each caught, with the line they came from."""
    with prompt.fake.active():
        x = prompt.fake.put(torch.arange(6.0))
        with prompt.fake.watch() as record:
            int(x[2])
            (x + 1).to("cuda")
            y = torch.ones(3).to("cuda")
            x[torch.tensor([1, 2])]
            torch.ones(3).pin_memory().to("cuda", non_blocking=True)
        assert [kind for kind, _ in record.waits] == ["read", "copy", "copy"]
        assert record.async_copies == 1 and y.device.type == "cuda"


@pytest.mark.parametrize("case", ["reuse", "ape"])
def test_a_decode_step_reads_back_once_and_copies_only_asynchronously(prompts: dict[int, Prompt], case: str) -> None:
    """Two sequences of different lengths (one greedy, one sampled) decoded together: per step one
    read (the picked tokens) and one asynchronous copy (tokens, indices, positions), nothing else."""
    name, params = CASES[case]
    seqs = []
    fake = prompts[6].fake
    with fake.active():
        for n, sampling in ((6, Sampling()), (12, Sampling(temperature=0.7, seed=3))):
            p = prompts[n]
            head, chunks = tier_sources(p, "gpu")
            result = make_strategy(name, **params).fuse(p.executor, FusionInput(p.pieces, head, chunks, 8))
            generator = torch.Generator().manual_seed(3)  # the emulated device's tensors are host tensors
            seqs.append(DecodeSequence(result.cache, result.logits, 8, (), sampling, generator=generator))
        with fake.watch() as record:
            for _ in range(3):
                step(p.executor, seqs)
    assert [kind for kind, _ in record.waits] == ["read"] * 3, record.summary()
    assert record.async_copies == 3
