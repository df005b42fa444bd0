"""`chunkcache bench decode`: a row per (context, batch), rows over the memory cap skipped, and the
batched step it times gives each sequence what a step of that sequence alone gives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chunkcache.blend.decode import step
from chunkcache.errors import InvalidInputError
from chunkcache.eval.decode_bench import _sequences, format_table, run_decode_bench
from chunkcache.model import load_model


def test_rows_are_timed_or_skipped_and_bad_lengths_refused(tiny_dirs: dict[str, Path], models_dir: Path) -> None:
    ex = load_model(str(tiny_dirs["llama"]), models_dir, "float32", "cpu", "sys").executor
    cap = 3 * ex.kv_bytes(40 + 3) - 1
    report = run_decode_bench(ex, [1, 3], [16, 40], steps=2, warmup=1, max_kv_bytes=cap, modes=["loop"])
    assert {r["mode"] for r in report["rows"]} == {"loop"} and report["decoders"] == {"loop": None}
    rows = {(r["context"], r["batch"]): r for r in report["rows"]}
    assert set(rows) == {(16, 1), (16, 3), (40, 1), (40, 3)}
    assert rows[(40, 3)]["ms_per_step"] is None and rows[(40, 3)]["kv_bytes"] > cap
    for key in ((16, 1), (16, 3), (40, 1)):
        assert rows[key]["ms_per_step"] > 0 and rows[key]["tokens_per_s"] > 0 and rows[key]["first_step_ms"] > 0
    table = format_table(report)
    assert "skipped" in table and "| loop | 16 | 3 |" in table
    with pytest.raises(InvalidInputError, match="positions"):
        run_decode_bench(ex, [1], [ex.max_positions])
    if not torch.cuda.is_available():  # the CPU has no graphs to capture: refused before any row runs
        with pytest.raises(InvalidInputError, match="decode_mode 'graphs' needs"):
            run_decode_bench(ex, [1], [16], steps=1, modes=["loop", "graphs"])


def test_a_batched_step_equals_each_sequence_stepped_alone(tiny_dirs: dict[str, Path], models_dir: Path) -> None:
    ex = load_model(str(tiny_dirs["qwen2"]), models_dir, "float32", "cpu", "sys").executor
    batch = _sequences(ex, 1, 20, 8, seed=1) + _sequences(ex, 1, 33, 8, seed=2) + _sequences(ex, 1, 7, 8, seed=3)
    alone = [_sequences(ex, 1, n, 8, seed=s)[0] for n, s in ((20, 1), (33, 2), (7, 3))]
    for _ in range(5):
        together = step(ex, batch)
        assert together == [step(ex, [seq])[0] for seq in alone]
    for b, a in zip(batch, alone):
        assert b.cache.length == a.cache.length
        torch.testing.assert_close(b.cache.kv, a.cache.kv, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-4)
