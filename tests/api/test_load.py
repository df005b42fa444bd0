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


def test_the_soak_report_has_a_row_per_minute_with_its_errors_percentiles_and_memory() -> None:
    from chunkcache.eval.load import _report, minute_table

    started, warm = 100.0, 10.0
    rows = [{"status": 200, "ttft_s": 1.0 + minute, "total_s": 2.0 + minute, "at": started + warm + 60 * minute + i}
            for minute in range(3) for i in range(5)]
    rows.append({"status": "error: ReadTimeout", "ttft_s": None, "total_s": 300.0, "at": started + warm + 61})
    rows.append({"status": 200, "ttft_s": 0.1, "total_s": 0.2, "at": started + 1})  # warm-up: not measured
    rss = [(t, 1000 + t) for t in range(0, 200, 5)]
    report = _report(rows, rss, started, warm, 4, 180, 8, 3, 80)
    minutes = report["per_minute"]
    assert [m["minute"] for m in minutes] == [1, 2, 3] and [m["requests"] for m in minutes] == [5, 6, 5]
    assert [m["errors"] for m in minutes] == [0, 1, 0]
    assert [m["ttft_p50_s"] for m in minutes] == [1.0, 2.0, 3.0] and minutes[2]["total_p99_s"] == 4.0
    assert minutes[0]["rss_max_bytes"] == 1065 and minutes[2]["rss_max_bytes"] == 1185  # the largest sample in [10, 70) and [130, 190) s
    table = minute_table(report).splitlines()
    assert len(table) == 5 and table[3].startswith("| 2 | 6 | 1 |")
