"""A bounded load run against a real `chunkcache serve` process: concurrent streaming clients get
no 5xx and the server's memory stays flat after warm-up (the 16-client, 60 s run is
`chunkcache bench load`, committed under bench/results/load-smollm2)."""

from __future__ import annotations

from chunkcache.eval.load import format_table, run_load


def test_concurrent_streaming_clients_get_answers_and_memory_stays_flat() -> None:
    report = run_load(clients=6, duration_s=15, warmup_s=8, max_tokens=8)
    assert report["requests"] >= 6, format_table(report)
    assert report["server_errors"] == 0 and set(report["status_counts"]) == {"200"}, format_table(report)
    assert report["ttft_s"]["p50"] is not None and report["ttft_s"]["p99"] >= report["ttft_s"]["p50"]
    assert report["rss_growth"] < 0.10, format_table(report)
