"""Eval labels: ``spec#context@codec`` parsed one way, bad contexts refused before any work."""

from __future__ import annotations

import pytest

from chunkcache.errors import InvalidInputError
from chunkcache.eval.harness import split_label, strategy_labels


def test_a_label_names_its_spec_codec_and_context() -> None:
    labels = strategy_labels(["cacheblend:0.15", "cacheblend:0.15#neighbours", "reuse#primer"], ["raw", "int8"])
    assert labels[0] == "full" and "cacheblend:0.15#neighbours@int8" in labels
    assert split_label("cacheblend:0.15#neighbours@int8") == ("cacheblend:0.15", "int8", "neighbours")
    assert split_label("reuse") == ("reuse", None, None)


@pytest.mark.parametrize("spec", ["cacheblend:0.15#nearby", "bogus#neighbours"])
def test_a_bad_label_is_refused(spec: str) -> None:
    with pytest.raises(InvalidInputError):
        strategy_labels([spec])
