"""Aggregating evaluation rows into report.json, report.md and PNG plots."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from chunkcache.blend import parse_strategy_spec


def paired_bootstrap_ci(deltas: list[float], resamples: int = 1000, seed: int = 0) -> list[float]:
    """95 % interval of the mean of paired differences, by resampling examples."""
    if not deltas:
        return [0.0, 0.0]
    values = np.asarray(deltas, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def aggregate(rows: list[dict[str, Any]], meta: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Scores are on LongBench's scale (100 x the mean example score)."""
    labels = list(rows[0]["strategies"]) if rows else []
    scored = [r for r in rows if r["strategies"]["full"]["score"] is not None]
    strategies = {}
    for label in labels:
        def values(key: str, source: list[dict[str, Any]] = rows) -> list[Any]:
            return [r["strategies"][label][key] for r in source]

        deltas = [100 * (r["strategies"][label]["score"] - r["strategies"]["full"]["score"]) for r in scored]
        f1 = [100 * s for s in values("score", scored)]
        speedups = [r["strategies"]["full"]["ttft_s"] / r["strategies"][label]["ttft_s"] for r in rows]
        strategies[label] = {
            "f1": _mean(f1),
            "f1_delta_vs_full": _mean(deltas),
            "f1_delta_ci95": paired_bootstrap_ci(deltas, seed=seed),
            "agreement_with_full": _mean([float(v) for v in values("agrees_with_full")]),
            "first_token_agreement": _mean([float(v) for v in values("first_token_agrees")]),
            "first_token_kl": _mean(values("first_token_kl")),
            "ttft_s_median": statistics.median(values("ttft_s")) if rows else None,
            "ttft_speedup_vs_full": statistics.median(speedups) if rows else None,
            "recomputed_fraction": _mean(values("recomputed_fraction")),
        }
    return {**meta, "n": len(rows), "n_scored": len(scored), "strategies": strategies}


def _mean(values: list[float]) -> float | None:
    return float(statistics.fmean(values)) if values else None


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def to_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# chunkcache eval: {report.get('model')} on {Path(str(report.get('dataset'))).name}",
        "",
        f"n = {report['n']} examples ({report['n_scored']} with gold answers), dtype {report.get('dtype')}, "
        f"max_new_tokens {report.get('max_new_tokens')}, metric {report.get('metric')} (x100, LongBench), "
        f"chunk caches through codec {', '.join(report.get('codecs') or ['raw'])}.",
        "",
    ]
    if report.get("command"):
        lines += [f"Command: `{report['command']}`", ""]
    lines += [
        "| strategy | F1 | ΔF1 vs full [95% CI] | agree w/ full | 1st-token agree | 1st-token KL | TTFT med s | speed-up | recomputed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, s in report["strategies"].items():
        lo, hi = s["f1_delta_ci95"]
        lines.append(
            f"| {label} | {_fmt(s['f1'], '.2f')} | {_fmt(s['f1_delta_vs_full'], '+.2f')} [{lo:+.2f}, {hi:+.2f}] | "
            f"{_fmt(s['agreement_with_full'], '.2f')} | {_fmt(s['first_token_agreement'], '.2f')} | "
            f"{_fmt(s['first_token_kl'], '.3f')} | {_fmt(s['ttft_s_median'], '.3f')} | "
            f"{_fmt(s['ttft_speedup_vs_full'], '.2f')}x | {_fmt(s['recomputed_fraction'], '.1%')} |"
        )
    return "\n".join(lines) + "\n"


def _ratio(label: str) -> tuple[str, float] | None:
    """(curve, recompute ratio) for the quality-vs-ratio plot."""
    if label == "full" or "@" in label or "#" in label:
        return None  # codec (spec@codec) and context (spec#neighbours) comparisons are read from the table
    name, params = parse_strategy_spec(label)
    if label == "reuse":
        return "cacheblend", 0.0
    if name != "cacheblend" or "recompute_ratio" not in params:
        return None
    selection = params.get("selection")
    if set(params) - {"recompute_ratio", "selection"} or selection not in (None, "random"):
        return None  # a variant with other options stays off the ratio curves (it is in the table)
    return ("cacheblend-random" if selection else "cacheblend"), params["recompute_ratio"]


def plot(report: dict[str, Any], out: Path) -> list[Path]:
    from chunkcache.eval.extra import pyplot

    plt = pyplot()

    written = []
    strategies = report["strategies"]
    full = strategies["full"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for curve, style in (("cacheblend", "o-"), ("cacheblend-random", "s--")):
        points = sorted(
            ((r[1], s) for label, s in strategies.items() if (r := _ratio(label)) and r[0] == curve),
            key=lambda point: point[0],
        )
        if curve == "cacheblend-random" and points:
            points = [(0.0, strategies["reuse"])] + points if "reuse" in strategies else points
        if not points:
            continue
        xs = [p[0] for p in points]
        axes[0].plot(xs, [p[1]["f1"] or 0 for p in points], style, label=curve)
        axes[1].plot(xs, [p[1]["agreement_with_full"] for p in points], style, label=f"{curve}: answer")
        axes[1].plot(xs, [p[1]["first_token_agreement"] for p in points], style, alpha=0.5, label=f"{curve}: 1st token")
    if full["f1"] is not None:
        axes[0].axhline(full["f1"], color="grey", linestyle=":", label="full prefill")
    axes[0].set(xlabel="recompute ratio", ylabel="F1 (x100)", title="Answer quality vs recompute ratio")
    axes[1].set(xlabel="recompute ratio", ylabel="agreement with full", ylim=(0, 1.05), title="Fidelity to full prefill")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "quality_vs_ratio.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(8, 4))
    labels = list(strategies)
    ax.bar(labels, [strategies[label]["ttft_s_median"] for label in labels], color="tab:blue")
    ax.set(ylabel="median TTFT (s)", title=f"TTFT per strategy ({report.get('model')})")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    path = out / "ttft.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def write_report(rows: list[dict[str, Any]], meta: dict[str, Any], out: Path, seed: int = 0) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    report = aggregate(rows, meta, seed)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(to_markdown(report), encoding="utf-8")
    with (out / "examples.jsonl").open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    if rows:
        plot(report, out)
    return report
