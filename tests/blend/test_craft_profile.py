"""Cache-Craft's attention profile on the real SmolLM2: recorded during a full prefill without
changing it, consistent with the attention the model computes."""

from __future__ import annotations

import pytest
import torch

from chunkcache.blend.base import selective_prefill
from chunkcache.blend.craft_profile import AttentionProfiler, sampled_layers
from chunkcache.blend.layout import sequential_layout
from chunkcache.model import LoadedModel

CHUNKS = [
    "The old mill was built in Tarnow in 1820 on the river Vela.",
    "The mill on the Vela was rebuilt after the flood, the mill's owner said.",
    "Copper conducts heat well.",
]


def test_a_full_prefill_records_each_chunks_dependence_on_the_ones_before(smollm2: LoadedModel) -> None:
    pieces = smollm2.template.pieces("Where is the mill?", CHUNKS)
    layout = sequential_layout(pieces)
    ex = smollm2.executor
    plain_buf = ex.empty_kv(layout.length)
    plain, _, _ = selective_prefill(ex, layout, plain_buf, layout.span_rows(ex, range(0, layout.length)))
    profiler = AttentionProfiler(ex, layout)
    buf = ex.empty_kv(layout.length)
    logits, _, _ = selective_prefill(ex, layout, buf, layout.span_rows(ex, range(0, layout.length)), observe=profiler)
    assert torch.equal(logits, plain) and torch.equal(buf, plain_buf)  # observing changes nothing

    layers = sampled_layers(ex.num_layers)
    first, second, third = profiler.chunks
    assert all(len(p.inter) == len(layers) for p in profiler.chunks)
    assert first.inter == [0.0] * len(layers) and first.cci == 0.5  # nothing before it
    assert second.cci > 0.5 and len(second.preceding_weights()) == 1
    for p, span in zip(profiler.chunks, layout.chunks):
        assert p.token_inter is not None and p.token_inter.shape == (len(span),)
        for inter, intra, pre in zip(p.inter, p.intra, p.preceding):
            assert 0.0 <= inter + intra <= 1.0 + 1e-5  # the rest goes to the head
            assert sum(pre) == pytest.approx(inter, abs=1e-5)
    assert len(third.preceding_weights()) == 2 and third.cci > 0.5
    assert sampled_layers(30) == sorted(set(sampled_layers(30))) and 0 not in sampled_layers(30)
