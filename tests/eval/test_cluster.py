"""Two `chunkcache serve` processes over one corpus and one shared tier (`chunkcache bench
cluster`): documents sent to A are answered by B from the shared tier, B prefilling none of
them, with A's answers; B keeps answering while the shared service is down, and reads it
again once it is back."""

from __future__ import annotations

from pathlib import Path

import pytest

from chunkcache.eval.cluster import format_table, run_cluster

DEMO = Path(__file__).parents[2] / "chunkcache" / "data" / "demo.json"


@pytest.mark.parametrize("backend", ["mooncake", pytest.param("redis", marks=pytest.mark.slow)])
def test_server_b_answers_from_what_server_a_ingested(backend: str, request: pytest.FixtureRequest) -> None:
    # the fixtures only check that the service can run here (they skip or fail with the reason)
    request.getfixturevalue("mooncake_server" if backend == "mooncake" else "redis_server")
    report = run_cluster(backend, DEMO, "smollm2-135m", examples=3, passages=1, max_tokens=4, top_k=2)
    up, down, back = report["b_shared"], report["b_service_down"], report["b_service_back"]
    assert up["chunk_misses"] == 0 and up["chunk_hits"] > 0 and up["tier_hits"]["remote"] == up["chunk_hits"]
    assert up["remote_read_bytes"] > 0 and report["answers_identical_a_b"]
    assert down["chunk_misses"] > 0 and all(r["answer"] for r in down["rows"])  # computed, not failed
    assert back["chunk_misses"] == 0 and back["tier_hits"]["remote"] > 0 and back["remote_read_bytes"] > 0
    assert "shared tier back" in format_table(report)
