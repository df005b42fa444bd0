"""Time to first token of every strategy beside full prefill, measured side by side with warm
caches (chunks precomputed before timing), with the per-stage breakdown."""

from __future__ import annotations

import platform
import statistics
from collections.abc import Sequence
from typing import Any

import torch

from chunkcache.blend import parse_strategy_spec
from chunkcache.engine import ChunkCacheEngine
from chunkcache.eval.datasets import Example


def bench_ttft(
    engine: ChunkCacheEngine,
    examples: Sequence[Example],
    strategies: Sequence[str],
    repeats: int = 3,
) -> dict[str, Any]:
    """Run each strategy spec (``name[:value]``) ``repeats`` times per example, interleaved so
    that noise hits all alike. The speed-up is the median over runs of full's TTFT / the
    strategy's TTFT in the same round."""
    labels = ["full"] + [s for s in strategies if s != "full"]
    specs = [parse_strategy_spec(label) for label in labels]
    runs: dict[str, list[dict[str, float]]] = {label: [] for label in labels}
    prompt_tokens = []
    for example in examples:
        engine.precompute(list(example.chunks))
        for label, (name, params) in zip(labels, specs):  # warm-up: loads code paths and caches
            engine.answer(example.question, list(example.chunks), strategy=name, max_new_tokens=1, **params)
        for _ in range(repeats):
            baseline = None
            for label, (name, params) in zip(labels, specs):
                a = engine.answer(example.question, list(example.chunks), strategy=name, max_new_tokens=1, **params)
                baseline = a.ttft_s if baseline is None else baseline
                runs[label].append({
                    "ttft_s": a.ttft_s, "load_s": a.timings["load_s"], "blend_s": a.timings["blend_s"],
                    "speedup": baseline / a.ttft_s, "recomputed_fraction": a.recomputed_tokens / a.prompt_tokens,
                })
        prompt_tokens.append(a.prompt_tokens)
    median = statistics.median
    return {
        "model": engine.settings.model,
        "dtype": engine.settings.dtype,
        "device": f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads), torch {torch.__version__}",
        "examples": len(examples),
        "repeats": repeats,
        "prompt_tokens_median": median(prompt_tokens) if prompt_tokens else 0,
        "strategies": {
            label: {
                "ttft_s_median": median(r["ttft_s"] for r in rows),
                "load_s_median": median(r["load_s"] for r in rows),
                "blend_s_median": median(r["blend_s"] for r in rows),
                "ttft_speedup_vs_full": median(r["speedup"] for r in rows),
                "recomputed_fraction": median(r["recomputed_fraction"] for r in rows),
            }
            for label, rows in runs.items()
        },
    }


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"model {report['model']} ({report['dtype']}), {report['examples']} examples x {report['repeats']} "
        f"repeats, median prompt {report['prompt_tokens_median']} tokens, {report['device']}",
        f"{'strategy':<22}{'TTFT ms':>10}{'load ms':>10}{'blend ms':>10}{'speed-up':>10}{'recomputed':>12}",
    ]
    for label, row in report["strategies"].items():
        lines.append(
            f"{label:<22}{row['ttft_s_median'] * 1e3:>10.0f}{row['load_s_median'] * 1e3:>10.0f}"
            f"{row['blend_s_median'] * 1e3:>10.0f}{row['ttft_speedup_vs_full']:>9.2f}x"
            f"{row['recomputed_fraction']:>12.1%}"
        )
    return "\n".join(lines)
