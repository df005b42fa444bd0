"""`chunkcache bench store` end to end with SmolLM2, a real redis-server and Mooncake Store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_cli import chunkcache


@pytest.mark.slow  # ~45 s; the tiers it times have their own tests in CI (test_remote_store, test_tiered)
def test_bench_store_measures_every_tier_and_ttft_beside_full(tmp_path: Path, redis_url: str,
                                                              mooncake_server) -> None:  # type: ignore[no-untyped-def]
    run = chunkcache(
        "bench", "store", "--model", "smollm2-135m", "--passages", "2", "--entry-tokens", "64", "--entries", "3",
        "--repeats", "1", "--remote-url", redis_url, "--remote-url", mooncake_server.url,
        "--out", str(tmp_path / "b"), store=tmp_path / "store",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "b" / "store.json").read_text())
    remotes = {"remote:redis", "remote:mooncake"}
    assert set(report["tiers"]) >= {"cpu", "disk"} | remotes
    for tier in report["tiers"].values():
        assert tier["put_GBps"] > 0 and tier["get_GBps"] > 0 and 0 < tier["get_p50_ms"] <= tier["get_p99_ms"]
    assert set(report["ttft_s"]) >= {"full", "cpu", "disk"} | remotes and report["ttft_vs_cpu"]["cpu"] == 1.0
    assert "| remote:mooncake |" in run.stdout and "| remote:redis |" in run.stdout
