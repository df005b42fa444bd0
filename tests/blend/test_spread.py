"""Spreading each chunk's mean correction (blend/spread.py) over its reused tokens."""

from __future__ import annotations

import pytest
import torch

from chunkcache.blend import FusionInput, make_strategy
from chunkcache.blend.layout import Layout
from chunkcache.blend.spread import ChunkShift
from chunkcache.errors import InvalidInputError
from chunkcache.model import LoadedModel


def _layout() -> Layout:
    # head 0-3, chunk A 4-13, chunk B 14-19, question 20-22; positions offset to exercise RoPE
    ids, positions = torch.zeros(23, dtype=torch.long), torch.arange(23) + 100
    return Layout(ids, positions, range(0, 4), (range(4, 14), range(14, 20)), range(20, 23), ids, positions)


def test_rotary_turn_inverts_and_matches_rerotation(smollm2: LoadedModel) -> None:
    executor = smollm2.executor
    x = torch.randn(2, 5, executor.head_dim)
    positions = torch.tensor([0, 3, 17, 250, 4000])
    assert torch.allclose(executor.turn(executor.turn(x, positions), positions, inverse=True), x, atol=1e-5)
    for i, p in enumerate(positions.tolist()):
        assert torch.allclose(executor.turn(x[:, i : i + 1], positions[i : i + 1]),
                              executor.rerotate(x[:, i : i + 1], p), atol=1e-5)


def test_each_chunk_moves_by_a_share_of_its_recomputed_tokens_mean_change(smollm2: LoadedModel) -> None:
    executor, layout = smollm2.executor, _layout()
    heads, dim = 2, executor.head_dim
    keys, values = torch.randn(heads, 23, dim), torch.randn(heads, 23, dim)
    before_k, before_v = keys.clone(), values.clone()
    index = torch.tensor([5, 7, 20, 21, 22])  # two tokens of chunk A and the question
    sources, at = index[:2], layout.positions[index[:2]]
    shift_k, shift_v = torch.randn(heads, 1, dim), torch.randn(heads, 1, dim)
    noise = torch.randn(heads, 2, dim)  # the two changes differ: only their mean is spread
    fresh_k = torch.cat((executor.turn(executor.turn(keys[:, sources], at, inverse=True) + shift_k + noise, at),
                         torch.randn(heads, 3, dim)), dim=1)
    fresh_v = torch.cat((values[:, sources] + shift_v - noise, torch.randn(heads, 3, dim)), dim=1)
    ChunkShift.of_layout(executor, layout, k_share=0.5, v_share=0.25)(layout.rows(executor, index), fresh_k, fresh_v, keys,
                                                            values)
    keys[:, index], values[:, index] = fresh_k, fresh_v  # as run_layer writes them right after the hook

    moved = torch.tensor([i for i in range(4, 14) if i not in (5, 7)])
    mean_k = (shift_k + noise.mean(dim=1, keepdim=True)) * 0.5
    expected_k = executor.turn(executor.turn(before_k[:, moved], layout.positions[moved], inverse=True) + mean_k,
                               layout.positions[moved])
    assert torch.allclose(keys[:, moved], expected_k, atol=1e-4)
    assert torch.allclose(values[:, moved], before_v[:, moved] + 0.25 * (shift_v - noise.mean(dim=1, keepdim=True)),
                          atol=1e-5)
    untouched = torch.tensor([0, 1, 2, 3, *range(14, 20)])  # head, chunk B (no token of it computed)
    assert torch.equal(keys[:, untouched], before_k[:, untouched])
    assert torch.equal(values[:, untouched], before_v[:, untouched])


def test_spread_keeps_the_budget_and_the_exact_ends(smollm2: LoadedModel, fusion_input: FusionInput) -> None:
    executor = smollm2.executor

    def run(**params: object):  # noqa: ANN202
        return make_strategy("cacheblend", **params).fuse(executor, fusion_input)

    off = {"spread_k": 0.0, "spread_v": 0.0}
    plain, spread = run(recompute_ratio=0.2, **off), run(recompute_ratio=0.2)  # on by default
    assert spread.reused_tokens == plain.reused_tokens and spread.recomputed_tokens == plain.recomputed_tokens
    assert not torch.allclose(spread.logits, plain.logits)
    assert not torch.allclose(run(recompute_ratio=0.2, spread_v=0.5).logits, spread.logits)
    # nothing reused is left to move when every token is recomputed, and nothing moves without a
    # recomputed token to learn from
    for ratio in (1.0, 0.0):
        assert torch.allclose(run(recompute_ratio=ratio, spread_v=0.5).logits, run(recompute_ratio=ratio, **off).logits,
                              atol=1e-5)
    with pytest.raises(InvalidInputError, match="spread"):
        make_strategy("cacheblend", spread_v=1.5)


def test_cachecraft_spreads_over_the_same_selection(smollm2: LoadedModel, fusion_input: FusionInput) -> None:
    executor = smollm2.executor

    def run(**params: object):  # noqa: ANN202
        # no stored variants: every chunk falls back to CacheBlend's selection at 20 %
        return make_strategy("cachecraft", recompute_ratio=0.2, **params).fuse(executor, fusion_input)

    plain, spread = run(spread_k=0.0, spread_v=0.0), run()  # on by default
    assert spread.recomputed_tokens == plain.recomputed_tokens and spread.reused_tokens == plain.reused_tokens
    assert not torch.allclose(spread.logits, plain.logits)
    with pytest.raises(InvalidInputError, match="spread"):
        make_strategy("cachecraft", spread_k=-0.1)
