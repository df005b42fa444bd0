"""Fusion strategies on the real SmolLM2: the controls reproduce their references exactly."""

from __future__ import annotations

import pytest
import torch

from chunkcache.blend import FusionInput, FusionResult, make_strategy
from chunkcache.blend.decode import DecodeSequence, step
from chunkcache.errors import InvalidInputError, UnknownStrategyError
from chunkcache.model import LoadedModel


def _run(smollm2: LoadedModel, inp: FusionInput, name: str, **params) -> tuple[FusionResult, list[int]]:
    result = make_strategy(name, **params).fuse(smollm2.executor, inp)
    logits = result.logits.clone()
    seq, tokens = DecodeSequence(result.cache, result.logits, 12, smollm2.eos_token_ids), []
    while not seq.done:
        tokens += step(smollm2.executor, [seq])
    return FusionResult(result.cache, logits, result.recomputed_tokens, result.reused_tokens), tokens


def test_cacheblend_ratio_one_reproduces_full_prefill(smollm2: LoadedModel, fusion_input: FusionInput) -> None:
    full, full_tokens = _run(smollm2, fusion_input, "full")
    blend, blend_tokens = _run(smollm2, fusion_input, "cacheblend", recompute_ratio=1.0)
    assert torch.allclose(blend.logits, full.logits, atol=1e-5)
    assert blend_tokens == full_tokens
    assert blend.recomputed_tokens == full.recomputed_tokens == fusion_input.pieces.total


def test_cacheblend_ratio_zero_is_reuse(smollm2: LoadedModel, fusion_input: FusionInput) -> None:
    reuse, reuse_tokens = _run(smollm2, fusion_input, "reuse")
    blend, blend_tokens = _run(smollm2, fusion_input, "cacheblend", recompute_ratio=0.0)
    assert torch.allclose(blend.logits, reuse.logits, atol=1e-5)
    assert blend_tokens == reuse_tokens
    assert reuse.recomputed_tokens == len(fusion_input.pieces.question)


def test_reuse_differs_from_full_and_cacheblend_closes_the_gap(smollm2: LoadedModel, fusion_input: FusionInput) -> None:
    full, _ = _run(smollm2, fusion_input, "full")
    reuse, _ = _run(smollm2, fusion_input, "reuse")
    blend, _ = _run(smollm2, fusion_input, "cacheblend", recompute_ratio=0.3)

    def kl(result: FusionResult) -> float:
        p = torch.log_softmax(full.logits, -1)
        return float((p.exp() * (p - torch.log_softmax(result.logits, -1))).sum())

    assert kl(reuse) > 1e-3  # cross-chunk attention is really missing
    assert kl(blend) < kl(reuse)


def test_cacheblend_budget_and_gradual_filtering(smollm2: LoadedModel, fusion_input: FusionInput) -> None:
    context = fusion_input.pieces.total - len(fusion_input.pieces.question)
    plain, _ = _run(smollm2, fusion_input, "cacheblend", recompute_ratio=0.2, gradual=False)
    assert plain.reused_tokens == context - round(0.2 * context)
    gradual, tokens = _run(smollm2, fusion_input, "cacheblend", recompute_ratio=0.2, gradual=True)
    assert gradual.reused_tokens == plain.reused_tokens  # ends at the same budget
    assert gradual.recomputed_tokens > plain.recomputed_tokens  # but computed more on the way
    assert tokens


def test_random_selection_spends_the_same_budget(smollm2: LoadedModel, fusion_input: FusionInput) -> None:
    chosen, _ = _run(smollm2, fusion_input, "cacheblend", recompute_ratio=0.2)
    random, _ = _run(smollm2, fusion_input, "cacheblend", recompute_ratio=0.2, selection="random")
    assert random.reused_tokens == chosen.reused_tokens
    assert not torch.allclose(random.logits, chosen.logits)


def test_epic_recomputes_the_first_tokens_of_each_chunk(smollm2: LoadedModel, fusion_input: FusionInput) -> None:
    reuse, _ = _run(smollm2, fusion_input, "reuse")
    none, _ = _run(smollm2, fusion_input, "epic", epic_k=0)
    assert torch.allclose(none.logits, reuse.logits, atol=1e-5)
    epic, _ = _run(smollm2, fusion_input, "epic", epic_k=16)
    assert epic.reused_tokens == reuse.reused_tokens - 16 * len(fusion_input.pieces.chunks)


def test_ape_with_one_chunk_and_no_temperature_is_reuse(smollm2: LoadedModel, fusion_input: FusionInput) -> None:
    one = FusionInput(
        type(fusion_input.pieces)(fusion_input.pieces.head, fusion_input.pieces.chunks[:1], fusion_input.pieces.question),
        fusion_input.head_kv, fusion_input.chunk_kvs[:1], 12,
    )
    reuse, reuse_tokens = _run(smollm2, one, "reuse")
    plain, plain_tokens = _run(smollm2, one, "ape", ape_temperature=1.0, ape_scale=1.0)
    assert torch.allclose(plain.logits, reuse.logits, atol=1e-3)
    assert plain_tokens == reuse_tokens
    ape, tokens = _run(smollm2, fusion_input, "ape")
    assert tokens and not torch.allclose(ape.logits, reuse.logits)


def test_strategy_parameters_are_validated() -> None:
    with pytest.raises(UnknownStrategyError, match="unknown strategy 'magic'"):
        make_strategy("magic")
    with pytest.raises(InvalidInputError, match="recompute_ratio must be in"):
        make_strategy("cacheblend", recompute_ratio=1.5)
    with pytest.raises(InvalidInputError, match="has no parameter recompute_ratio"):
        make_strategy("full", recompute_ratio=0.2)
    assert make_strategy("cacheblend", {"recompute_ratio": 0.4, "epic_k": 3}).recompute_ratio == 0.4


def test_selection_options_keep_the_budget(smollm2: LoadedModel, fusion_input: FusionInput) -> None:
    base, _ = _run(smollm2, fusion_input, "cacheblend", recompute_ratio=0.2)
    for params in ({"selection": "v"}, {"selection": "kv"}, {"selection": "qattn"}, {"sinks": 8},
                   {"per_chunk": True}):
        variant, tokens = _run(smollm2, fusion_input, "cacheblend", recompute_ratio=0.2, **params)
        assert abs(variant.reused_tokens - base.reused_tokens) <= len(fusion_input.pieces.chunks), params
        assert tokens
    # ranked by the question pass alone: no deviation probe and no gradual filtering to pay for
    alone, _ = _run(smollm2, fusion_input, "cacheblend", recompute_ratio=0.2, selection="qattn")
    assert alone.recomputed_tokens < base.recomputed_tokens


def test_sinks_recompute_every_chunk_start(smollm2: LoadedModel, fusion_input: FusionInput) -> None:
    """With a budget that only covers the sinks, the result equals EPIC with k = sinks."""
    pieces = fusion_input.pieces
    context = pieces.total - len(pieces.question)
    ratio = 8 * len(pieces.chunks) / context
    sinks, _ = _run(smollm2, fusion_input, "cacheblend", recompute_ratio=ratio, sinks=8, gradual=False,
                    spread_k=0.0, spread_v=0.0)  # EPIC moves no reused token
    epic, _ = _run(smollm2, fusion_input, "epic", epic_k=8)
    assert torch.allclose(sinks.logits, epic.logits, atol=1e-5)


def test_strategy_specs_parse_extra_parameters() -> None:
    from chunkcache.blend import parse_strategy_spec

    assert parse_strategy_spec("cacheblend:0.15:selection=kv:sinks=8") == (
        "cacheblend", {"recompute_ratio": 0.15, "selection": "kv", "sinks": "8"}
    )
    assert parse_strategy_spec("cacheblend-random:0.2") == ("cacheblend", {"selection": "random", "recompute_ratio": 0.2})
    assert parse_strategy_spec("epic:8") == ("epic", {"epic_k": 8})
    with pytest.raises(InvalidInputError, match="no parameter foo"):
        parse_strategy_spec("cacheblend:0.1:foo=2")
    with pytest.raises(UnknownStrategyError):
        parse_strategy_spec("warp:2")


def test_attention_weighting_keeps_the_budget_and_changes_the_choice(smollm2: LoadedModel, fusion_input: FusionInput) -> None:
    plain, _ = _run(smollm2, fusion_input, "cacheblend", recompute_ratio=0.2, gradual=False, weight="none")
    weighted, _ = _run(smollm2, fusion_input, "cacheblend", recompute_ratio=0.2, gradual=False, weight="attn")
    assert weighted.reused_tokens == plain.reused_tokens
    assert not torch.equal(weighted.logits, plain.logits)
    with pytest.raises(InvalidInputError, match="weight"):
        _run(smollm2, fusion_input, "cacheblend", weight="bogus")


@pytest.mark.parametrize("weight", ["qattn", "qattn_add"])
def test_question_attention_weighting_keeps_the_budget(smollm2: LoadedModel, fusion_input: FusionInput, weight: str) -> None:
    plain, _ = _run(smollm2, fusion_input, "cacheblend", recompute_ratio=0.2, weight="none")
    weighted, _ = _run(smollm2, fusion_input, "cacheblend", recompute_ratio=0.2, weight=weight)
    assert weighted.reused_tokens == plain.reused_tokens  # same budget after gradual filtering
    assert not torch.equal(weighted.logits, plain.logits)  # a different choice


def test_question_attention_depth_changes_the_choice_not_the_budget(smollm2: LoadedModel, fusion_input: FusionInput) -> None:
    every_layer, _ = _run(smollm2, fusion_input, "cacheblend", recompute_ratio=0.2, qattn_from=0.0)
    deep_half, tokens = _run(smollm2, fusion_input, "cacheblend", recompute_ratio=0.2, qattn_from=0.5)
    assert deep_half.reused_tokens == every_layer.reused_tokens
    assert not torch.equal(deep_half.logits, every_layer.logits)
    assert tokens
    for name in ("cacheblend", "cachecraft"):
        for bad in (1.0, -0.1):
            with pytest.raises(InvalidInputError, match="qattn_from"):
                make_strategy(name, qattn_from=bad)


def test_a_question_pass_that_stops_early_keeps_the_budget_and_costs_less(
    smollm2: LoadedModel, fusion_input: FusionInput
) -> None:
    whole, _ = _run(smollm2, fusion_input, "cacheblend", recompute_ratio=0.2, qattn_from=0.25)
    early, _ = _run(smollm2, fusion_input, "cacheblend", recompute_ratio=0.2, qattn_from=0.25, qattn_to=0.5)
    assert early.reused_tokens == whole.reused_tokens
    assert early.recomputed_tokens < whole.recomputed_tokens  # the pass ran half the layers
    assert not torch.equal(early.logits, whole.logits)
    for bad in (0.25, 1.5):
        with pytest.raises(InvalidInputError, match="qattn_to"):
            make_strategy("cacheblend", qattn_from=0.25, qattn_to=bad)


def test_question_attention_is_a_distribution_over_the_prompt(smollm2: LoadedModel, fusion_input: FusionInput) -> None:
    from chunkcache.blend.cacheblend import reuse_attention
    from chunkcache.blend.layout import sequential_layout
    from chunkcache.blend.strategies import reused_buffer

    layout = sequential_layout(fusion_input.pieces)
    buf = reused_buffer(smollm2.executor, layout, fusion_input)
    every_layer = reuse_attention(smollm2.executor, layout, buf, 0.0)
    deep_half = reuse_attention(smollm2.executor, layout, buf, 0.5)
    for attention in (every_layer, deep_half):
        assert attention.shape == (layout.length,)
        assert torch.isclose(attention.sum(), torch.tensor(1.0), atol=1e-4)  # mean of softmax rows
    assert not torch.allclose(every_layer, deep_half)


def test_a_long_question_never_costs_more_than_full_prefill(smollm2: LoadedModel, fusion_input: FusionInput) -> None:
    import dataclasses

    from chunkcache.model import PromptPieces

    pieces = fusion_input.pieces
    context = pieces.total - len(pieces.question)
    long_question = (pieces.question * (context // len(pieces.question) + 1))[-context:]  # as long as the context
    inp = dataclasses.replace(fusion_input, pieces=PromptPieces(pieces.head, pieces.chunks, long_question))
    full, _ = _run(smollm2, inp, "full")
    blend, _ = _run(smollm2, inp, "cacheblend", recompute_ratio=0.15)
    plain, _ = _run(smollm2, inp, "cacheblend", recompute_ratio=0.15, weight="none")
    assert blend.recomputed_tokens <= full.recomputed_tokens  # the question pass would have doubled the question
    assert torch.equal(blend.logits, plain.logits) and blend.recomputed_tokens == plain.recomputed_tokens
    short, _ = _run(smollm2, fusion_input, "cacheblend", recompute_ratio=0.15)
    short_plain, _ = _run(smollm2, fusion_input, "cacheblend", recompute_ratio=0.15, weight="none")
    assert short.recomputed_tokens > short_plain.recomputed_tokens  # a short question keeps its question pass
    deep, _ = _run(smollm2, inp, "cacheblend", recompute_ratio=0.15, check_layer=20)  # the probe alone: over full
    assert deep.recomputed_tokens == full.recomputed_tokens and torch.allclose(deep.logits, full.logits, atol=1e-5)


def test_a_top_p_below_float32s_range_still_keeps_the_likeliest_token() -> None:
    from chunkcache.blend.decode import Sampling, sample

    logits = torch.tensor([0.1, 3.0, -1.0, 0.5])
    for top_p in (2.2250738585e-313, 1e-40, 1e-9):  # found by bench fuzz: rounded to 0, it cut every token (500)
        token = sample(logits, Sampling(temperature=2.0, top_p=top_p), torch.Generator().manual_seed(0))
        assert int(token) == 1
