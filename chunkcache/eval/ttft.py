"""Time to first token of every strategy beside full prefill, measured side by side with warm
caches (chunks precomputed before timing), with the per-stage breakdown, over real examples
as they are or over a sweep of context lengths and chunk counts built from their passages."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from chunkcache.blend import parse_strategy_spec
from chunkcache.engine import ChunkCacheEngine
from chunkcache.eval.datasets import Example
from chunkcache.eval.harness import strategy_labels
from chunkcache.eval.machine import describe

STAGES = (
    "store_read_s", "codec_decode_s", "stream_load_s", "stream_wait_s", "miss_prefill_s", "rerotate_s", "select_s",
    "recompute_s", "first_token_s",
)


def round_question(question: str, round_: int) -> str:
    """The question of a timed round, one word longer each round. On a GPU, attention kernels are
    planned for every new shape (cuDNN's) and real requests seldom repeat one another: timing the
    same question every round would time only plans already made (bench/results/gpu-h200-*)."""
    return question + " Thanks." * (round_ + 1)


def time_strategies(
    engine: ChunkCacheEngine, examples: Sequence[Example], strategies: Sequence[str], repeats: int = 3
) -> dict[str, Any]:
    """Run each strategy spec ``repeats`` times per example, interleaved so that noise hits all
    alike; every round asks a slightly longer question (`round_question`). The speed-up is the
    median over rounds of full's TTFT / the strategy's in that round. With fixed-shape fusions a
    round whose question reaches a new bucket captures it: that round is a first request, listed
    under ``capture_ttft_s`` and left out of the medians (the steady state)."""
    labels = strategy_labels(strategies)
    specs = [parse_strategy_spec(label) for label in labels]
    runs: dict[str, list[dict[str, float]]] = {label: [] for label in labels}
    first: dict[str, float] = {}
    prompt_tokens = []
    graphs_before = engine.fusion_graph_stats()
    for example in examples:
        chunks = list(example.chunks)
        engine.precompute(chunks)
        for label, (name, params) in zip(labels, specs):  # warm-up round: reported apart, not in the medians
            warm = engine.answer(example.question, chunks, strategy=name, max_new_tokens=1, **params)
            first.setdefault(label, warm.ttft_s)
        for round_ in range(repeats):
            baseline = None
            question = round_question(example.question, round_)
            for label, (name, params) in zip(labels, specs):
                captures = _captures(engine)
                a = engine.answer(question, chunks, strategy=name, max_new_tokens=1, **params)
                baseline = a.ttft_s if baseline is None else baseline
                runs[label].append({
                    "ttft_s": a.ttft_s, "speedup": baseline / a.ttft_s,
                    # the first request of a fixed-shape bucket: it captured the bucket's graphs
                    "captured": _captures(engine) > captures,
                    "recomputed_fraction": a.recomputed_tokens / a.prompt_tokens,
                    **{k: a.timings.get(k, 0.0) for k in ("load_s", "blend_s", *STAGES)},
                })
        prompt_tokens.append(a.prompt_tokens)
    median = statistics.median
    # a round that captured a bucket's graphs is a first request, reported apart (as the warm-up
    # round is) unless every round did
    steady = {label: [r for r in rows if not r["captured"]] or rows for label, rows in runs.items()}
    graphs = engine.fusion_graph_stats()
    if graphs is not None and graphs_before is not None:  # this config's fusions, warm-up rounds included
        graphs = {k: v - graphs_before[k] if k in ("eager", "captures", "capture_s", "replays") else v
                  for k, v in graphs.items()}
    return {
        "examples": len(examples),
        # fixed-shape fusions (fusion_mode): captures are paid by a bucket's first request
        "fusion_graphs": graphs,
        "prompt_tokens_median": median(prompt_tokens) if prompt_tokens else 0,
        "strategies": {
            label: {
                # the config's first request: kernels compiled and planned for its shapes (a GPU's
                # first-request cost), caches and allocators cold
                "first_ttft_s": first[label],
                "capture_ttft_s": [r["ttft_s"] for r in runs[label] if r["captured"]],
                "ttft_s_median": median(r["ttft_s"] for r in rows),
                "ttft_speedup_vs_full": median(r["speedup"] for r in rows),
                "recomputed_fraction": median(r["recomputed_fraction"] for r in rows),
                "stages_s_median": {k: median(r[k] for r in rows) for k in ("load_s", "blend_s", *STAGES)},
            }
            for label, rows in steady.items() if rows
        },
    }


def _captures(engine: ChunkCacheEngine) -> int:
    stats = engine.fusion_graph_stats()
    return stats["captures"] if stats is not None else 0


def sweep_examples(
    examples: Sequence[Example], tokens: int, chunks: int, count: Callable[[str], int], cut: Callable[[str, int], str],
    per_config: int = 1,
) -> list[Example]:
    """``per_config`` prompts of ``chunks`` real passages cut to ``tokens / chunks`` tokens each,
    taken in order from the examples' passages (long enough ones only)."""
    budget = tokens // chunks
    needed = chunks * per_config
    pool = [p for e in examples for p in e.chunks if count(p) >= budget]
    if len(pool) < needed:
        pool = _joined(list(dict.fromkeys(p for e in examples for p in e.chunks)), budget, needed, count)
    if len(pool) < needed:
        raise ValueError(f"only {len(pool)} passages have {budget} tokens; {needed} are needed")
    out = []
    for i in range(per_config):
        passages = tuple(cut(p, budget) for p in pool[i * chunks : (i + 1) * chunks])
        out.append(Example(examples[0].question, passages, (), task="none", id=f"{tokens}x{chunks}#{i}"))
    return out


def _joined(passages: list[str], budget: int, needed: int, count: Callable[[str], int]) -> list[str]:
    """``needed`` distinct passages of at least ``budget`` tokens made by joining consecutive short
    ones (each starting one passage later, cycling), for contexts longer than the dataset's
    passages allow; empty when there are fewer passages than ``needed``."""
    if len(passages) < needed or not passages:
        return []
    out = []
    for start in range(needed):
        parts, size, i = [], 0, start
        while size < budget and len(parts) < len(passages):
            parts.append(passages[i % len(passages)])
            size += count(parts[-1])
            i += 1
        if size >= budget:
            out.append("\n\n".join(parts))
    return out


def bench_ttft(
    engine: ChunkCacheEngine,
    examples: Sequence[Example],
    strategies: Sequence[str],
    repeats: int = 3,
    lengths: Sequence[int] = (),
    chunk_counts: Sequence[int] = (4,),
) -> dict[str, Any]:
    """The dataset's examples as they are (no ``lengths``), or one config per (length, chunks)."""
    strategy_labels(strategies)  # a bad name fails before any work
    configs = []
    if not lengths:
        configs.append({"label": "dataset", **time_strategies(engine, examples, strategies, repeats)})
    else:
        tokenizer = engine.model.tokenizer

        def count(text: str) -> int:
            return len(tokenizer.encode(text, add_special_tokens=False))

        def cut(text: str, n: int) -> str:
            return tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)[:n])

        for tokens in lengths:
            for chunks in chunk_counts:
                prompts = sweep_examples(examples, tokens, chunks, count, cut)
                timed = time_strategies(engine, prompts, strategies, repeats)
                configs.append({"label": f"{tokens} tokens / {chunks} chunks", "tokens": tokens, "chunks": chunks, **timed})
    return {
        "model": engine.settings.model,
        "dtype": engine.settings.dtype,
        "device": describe(engine.model.executor.device),
        "repeats": repeats,
        "configs": configs,
    }


def format_table(report: dict[str, Any]) -> str:
    lines = [f"model {report['model']} ({report['dtype']}), {report['repeats']} repeats, {report['device']}"]
    head = f"{'strategy':<24}{'first ms':>9}{'TTFT ms':>9}{'speed-up':>9}{'recomp':>8}" + "".join(
        f"{s.removesuffix('_s')[:11]:>12}" for s in ("load_s", *STAGES)
    )
    for config in report["configs"]:
        lines += ["", f"{config['label']}: {config['examples']} prompt(s), median {config['prompt_tokens_median']} tokens (stage times in ms)", head]
        graphs = config.get("fusion_graphs")
        if graphs:
            lines.insert(-1, f"fixed-shape fusions: {graphs['captures']} captured ({graphs['capture_s']:.1f} s), "
                             f"{graphs['replays']} replayed, {graphs['eager']} eager"
                             + (f"; failures: {graphs['failures']}" if graphs["failures"] else ""))
        for label, row in config["strategies"].items():
            stages = row["stages_s_median"]
            lines.append(
                f"{label:<24}{row['first_ttft_s'] * 1e3:>9.0f}{row['ttft_s_median'] * 1e3:>9.0f}"
                f"{row['ttft_speedup_vs_full']:>8.2f}x"
                f"{row['recomputed_fraction']:>8.1%}" + "".join(f"{stages[s] * 1e3:>12.0f}" for s in ("load_s", *STAGES))
            )
    return "\n".join(lines)


def plot_ttft(report: dict[str, Any], path: Path) -> None:
    from chunkcache.eval.extra import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    configs = report["configs"]
    labels = list(configs[0]["strategies"]) if configs else []
    xs = [c.get("tokens") or c["prompt_tokens_median"] for c in configs]
    for label in labels:
        ax.plot(xs, [c["strategies"][label]["ttft_s_median"] for c in configs], "o-", label=label)
    ax.set(xlabel="context tokens", ylabel="median TTFT (s)", title=f"TTFT vs context ({report['model']}, {report['dtype']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
