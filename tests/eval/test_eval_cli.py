"""The CI slice of `chunkcache eval`: 3 real examples with SmolLM2, every report file, and the
fused path at ratio 1.0 agreeing with full prefill on every example in float32."""

from __future__ import annotations

import json
from pathlib import Path

from tests.test_cli import chunkcache

DEMO = Path(__file__).resolve().parents[2] / "chunkcache" / "data" / "demo.json"
FIELDS = {
    "f1", "f1_delta_vs_full", "f1_delta_ci95", "agreement_with_full", "first_token_agreement",
    "first_token_kl", "ttft_s_median", "ttft_speedup_vs_full", "recomputed_fraction",
}


def test_eval_writes_the_report_and_ratio_one_agrees_with_full(tmp_path: Path) -> None:
    out = tmp_path / "report"
    run = chunkcache(
        "eval", "--model", "smollm2-135m", "--dataset", str(DEMO), "--limit", "2", "--passages", "3",
        "--strategies", "full,reuse,cacheblend:0.15,cacheblend:1.0,cacheblend-random:0.15",
        "--max-new-tokens", "8", "--dtype", "float32", "--out", str(out), "--quiet",
        store=tmp_path / "store",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert {"model", "dataset", "n", "strategies"} <= set(report) and report["n"] == 2
    assert list(report["strategies"]) == ["full", "reuse", "cacheblend:0.15", "cacheblend:1.0", "cacheblend-random:0.15"]
    for stats in report["strategies"].values():
        assert set(stats) == FIELDS
        lo, hi = stats["f1_delta_ci95"]
        assert lo <= stats["f1_delta_vs_full"] <= hi
    control = report["strategies"]["cacheblend:1.0"]
    assert control["agreement_with_full"] == 1.0 and control["first_token_agreement"] == 1.0
    assert control["first_token_kl"] < 1e-6 and control["f1_delta_vs_full"] == 0.0
    assert report["strategies"]["reuse"]["first_token_kl"] > control["first_token_kl"]
    rows = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and not (out / "examples.partial.jsonl").exists()  # the partial log is replaced
    assert all(r["strategies"]["cacheblend:1.0"]["text"] == r["strategies"]["full"]["text"] for r in rows)
    assert "| cacheblend:1.0 |" in (out / "report.md").read_text()
    for png in ("quality_vs_ratio.png", "ttft.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_refuses_an_unknown_strategy_before_loading(tmp_path: Path) -> None:
    run = chunkcache("eval", "--dataset", str(DEMO), "--strategies", "full,turbo", "--out", str(tmp_path), store=tmp_path / "s")
    assert run.returncode == 2 and "unknown strategy 'turbo'" in run.stderr and "Traceback" not in run.stderr


def test_eval_runs_each_cached_strategy_through_each_codec(tmp_path: Path) -> None:
    out = tmp_path / "report"
    run = chunkcache(
        "eval", "--model", "smollm2-135m", "--dataset", str(DEMO), "--limit", "1", "--passages", "2",
        "--strategies", "reuse,cacheblend:1.0", "--codec", "raw,kivi2", "--max-new-tokens", "1",
        "--out", str(out), "--quiet", store=tmp_path / "store",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert list(report["strategies"]) == ["full", "reuse@raw", "reuse@kivi2", "cacheblend:1.0@raw", "cacheblend:1.0@kivi2"]
    assert report["codecs"] == ["raw", "kivi2"]
    s = report["strategies"]
    assert s["cacheblend:1.0@kivi2"]["first_token_kl"] < 1e-6  # everything recomputed: the codec cannot matter
    assert s["reuse@kivi2"]["first_token_kl"] != s["reuse@raw"]["first_token_kl"]  # 2-bit caches were used


def test_bench_codec_writes_sizes_speeds_and_errors(tmp_path: Path) -> None:
    run = chunkcache(
        "bench", "codec", "--model", "smollm2-135m", "--passages", "2", "--codecs", "raw,int8,cachegen-2",
        "--repeats", "1", "--out", str(tmp_path / "b"), store=tmp_path / "store",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "b" / "codec.json").read_text())
    codecs = report["codecs"]
    assert set(codecs) == {"raw", "int8", "cachegen-2"} and report["cacheblend_recompute_s"] > 0
    for stats in codecs.values():
        assert {"ratio_vs_bf16", "encode_MBps", "decode_MBps", "rel_err_k", "rel_err_v"} <= set(stats)
    assert codecs["raw"]["rel_err_k"] == codecs["raw"]["rel_err_v"] == 0.0
    assert codecs["cachegen-2"]["ratio_vs_bf16"] > codecs["int8"]["ratio_vs_bf16"] > 1.0
    assert 0 < codecs["int8"]["rel_err_k"] < codecs["cachegen-2"]["rel_err_k"] < 1.0
    assert "| cachegen-2 |" in run.stdout


def test_the_recurring_workload_feeds_cachecraft_variants(tmp_path: Path) -> None:
    out = tmp_path / "report"
    run = chunkcache(
        "eval", "--model", "smollm2-135m", "--dataset", str(DEMO), "--limit", "2", "--passages", "3",
        "--chunk-tokens", "80", "--strategies", "cacheblend:0.15,cachecraft", "--workload", "recurring",
        "--max-new-tokens", "2", "--out", str(out), "--quiet", store=tmp_path / "store",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["workload"] == "recurring" and list(report["strategies"]) == ["full", "cacheblend:0.15", "cachecraft"]
    rows = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    assert all(0 < r["strategies"]["cachecraft"]["recomputed_fraction"] < 1 for r in rows)
    stats = chunkcache("cache", "stats", "--json", store=tmp_path / "store")
    assert json.loads(stats.stdout)["cachecraft_variants"]["chunks"] == 6  # 2 examples x 3 passages
