"""Cache-Craft's beta, gamma, CCI and CFO on hand-built cases."""

from __future__ import annotations

import math

import pytest

from chunkcache.blend.craft_math import (
    cci, cfo, effective_overlap, order_penalty, prefix_overlap, tokens_to_recompute,
)
from chunkcache.errors import InvalidInputError


def test_an_identical_prefix_means_nothing_to_recompute() -> None:
    prefix = ["a", "b", "c"]
    assert prefix_overlap(prefix, prefix, {"a": 0.2, "b": 0.5, "c": 0.3}) == 1.0
    assert order_penalty(prefix, prefix) == 0.0
    beta_prime = effective_overlap(prefix, prefix)
    assert beta_prime == 1.0
    assert tokens_to_recompute(cfo(0.9, beta_prime), 200) == 0
    assert effective_overlap([], []) == 1.0  # a first chunk stored as a first chunk


def test_a_reversed_order_is_penalised() -> None:
    assert order_penalty(["c", "b", "a"], ["a", "b", "c"]) == 1.0
    assert order_penalty(["a", "c", "b"], ["a", "b", "c"]) == pytest.approx(1 / 3)
    assert effective_overlap(["c", "b", "a"], ["a", "b", "c"]) == 0.0
    swapped = effective_overlap(["b", "a", "c"], ["a", "b", "c"])
    assert 0.0 < swapped < 1.0
    assert cfo(0.8, swapped) > cfo(0.8, 1.0) == 0.0


def test_no_overlap_recomputes_the_whole_impact() -> None:
    value = cci([0.2, 0.4], [0.8, 0.4])
    assert value == pytest.approx((1 / (1 + math.exp(-0.25)) + 1 / (1 + math.exp(-1.0))) / 2)
    beta_prime = effective_overlap(["x", "y"], ["a", "b"])
    assert beta_prime == 0.0
    assert cfo(value, beta_prime) == pytest.approx(value)
    assert tokens_to_recompute(cfo(value, beta_prime), 100) == math.ceil(value * 100)
    assert cfo(value, beta_prime, alpha=0.5) == pytest.approx(value / 2)


def test_attention_weights_and_coverage_shape_beta() -> None:
    stored = ["a", "b"]
    # the variant attended mostly to "a": keeping "a" keeps most of what mattered
    assert prefix_overlap(["a", "z"], stored, {"a": 0.9, "b": 0.1}) == pytest.approx(0.9 * 0.5)
    assert prefix_overlap(["b", "z"], stored, {"a": 0.9, "b": 0.1}) == pytest.approx(0.1 * 0.5)
    # a current prefix with more chunks than the variant saw is only partly covered
    assert prefix_overlap(["a", "b", "c", "d"], stored) == pytest.approx(0.5)
    assert prefix_overlap([], stored) == prefix_overlap(["a"], []) == 0.0


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(InvalidInputError):
        cci([0.1], [0.1, 0.2])
    with pytest.raises(InvalidInputError):
        cci([-0.1], [0.1])
    with pytest.raises(InvalidInputError):
        cfo(0.5, 0.5, alpha=-1)
    assert cci([0.0], [0.0]) == 0.5 and cci([1.0], [0.0]) == 1.0
