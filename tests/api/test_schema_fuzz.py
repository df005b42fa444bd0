"""`chunkcache bench fuzz` as CI runs it: schemathesis with every check against a real
`chunkcache serve` of a tiny random-weight model (so hundreds of generated requests run
quickly): no 5xx, responses as the schema says, schema-invalid requests refused and schema-valid
ones accepted."""

from __future__ import annotations

from pathlib import Path

import pytest

from chunkcache.eval.fuzz import format_table, run_fuzz

pytest.importorskip("schemathesis")


def test_every_check_holds_for_generated_requests(tiny_dirs: dict[str, Path]) -> None:
    report = run_fuzz(str(tiny_dirs["llama"]), cases=100, seed=7)
    table = format_table(report)
    assert report["test_cases"]["generated"] >= 200 and report["test_cases"]["with_failures"] == 0, \
        table + report["output"][-4000:]
    assert report["operations"]["tested"] == report["operations"]["total"] >= 9 and report["exit_code"] == 0, table
