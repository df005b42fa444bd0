"""Aggregation: LongBench scale, paired bootstrap, medians of paired speed-ups."""

from __future__ import annotations

from pathlib import Path

from chunkcache.eval.report import aggregate, paired_bootstrap_ci, write_report


def _row(full_score: float, other_score: float, full_ttft: float, other_ttft: float, agree: bool) -> dict:
    def stats(score: float, ttft: float, agrees: bool, kl: float) -> dict:
        return {"text": "", "score": score, "agrees_with_full": agrees, "first_token_agrees": agrees,
                "first_token_kl": kl, "ttft_s": ttft, "recomputed_fraction": 0.5, "timings": {}}

    return {"strategies": {"full": stats(full_score, full_ttft, True, 0.0), "x": stats(other_score, other_ttft, agree, 0.2)}}


def test_report_with_several_variants_at_one_ratio_is_written_and_plotted(tmp_path: Path) -> None:
    labels = ["reuse", "cacheblend:0.15", "cacheblend:0.15:gradual=1", "cacheblend:0.15:selection=kv",
              "cacheblend-random:0.15", "cacheblend:0.3"]
    rows = []
    for i in range(3):
        row = _row(1.0, 0.5, 4.0, 1.0, True)
        row["strategies"] = {"full": row["strategies"]["full"], **{label: {**row["strategies"]["x"], "first_token_kl": k / 10} for k, label in enumerate(labels)}}
        rows.append(row)
    report = write_report(rows, {"model": "m"}, tmp_path)
    assert set(report["strategies"]) == {"full", *labels}
    for name in ("report.json", "report.md", "examples.jsonl", "quality_vs_ratio.png", "ttft.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_aggregate_scales_and_pairs() -> None:
    rows = [_row(1.0, 0.5, 4.0, 1.0, False), _row(0.0, 0.0, 2.0, 1.0, True), _row(0.5, 0.5, 3.0, 1.0, True)]
    report = aggregate(rows, {"model": "m"})
    x = report["strategies"]["x"]
    assert report["n"] == 3 and report["model"] == "m"
    assert abs(report["strategies"]["full"]["f1"] - 50.0) < 1e-9 and abs(x["f1"] - 100 / 3) < 1e-9
    assert abs(x["f1_delta_vs_full"] - (-50 / 3)) < 1e-9
    assert x["ttft_speedup_vs_full"] == 3.0 and x["ttft_s_median"] == 1.0
    assert abs(x["agreement_with_full"] - 2 / 3) < 1e-9 and abs(x["first_token_kl"] - 0.2) < 1e-9


def test_bootstrap_interval() -> None:
    lo, hi = paired_bootstrap_ci([0.0] * 10)
    assert lo == hi == 0.0
    lo, hi = paired_bootstrap_ci([-1.0, 1.0] * 20, seed=3)
    assert lo < 0 < hi and paired_bootstrap_ci([-1.0, 1.0] * 20, seed=3) == [lo, hi]
    lo, hi = paired_bootstrap_ci([1.0, 2.0, 3.0] * 10)
    assert 1.5 < lo < 2 < hi < 2.5
