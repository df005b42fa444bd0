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


def test_each_row_is_handed_over_as_soon_as_its_example_is_done(smollm2, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from chunkcache.config import Settings
    from chunkcache.engine import ChunkCacheEngine
    from chunkcache.eval.datasets import Example
    from chunkcache.eval.harness import run_eval

    examples = [
        Example(id=str(i), question=f"What is item {i}?", answers=("x",), chunks=(f"Item {i} is x.", "Other text."), task="qa")
        for i in range(3)
    ]
    seen: list[str] = []

    def stop_after_two(row: dict) -> None:  # type: ignore[type-arg]
        seen.append(row["id"])
        if len(seen) == 2:
            raise KeyboardInterrupt  # the user stops the run: the rows seen so far were already kept

    with ChunkCacheEngine(Settings.load(env={}, store_path=tmp_path / "s"), model=smollm2) as engine:
        with pytest.raises(KeyboardInterrupt):
            run_eval(engine, examples, ["reuse"], max_new_tokens=1, progress=False, on_row=stop_after_two)
    assert seen == ["0", "1"]
