"""`chunkcache eval`: every strategy beside full prefill on the same examples, same prompts, same
model; per-example answers, scores and fidelity to full, then the aggregate report."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from chunkcache.blend import parse_strategy_spec
from chunkcache.engine import Answer, ChunkCacheEngine
from chunkcache.eval.datasets import Example
from chunkcache.eval.metrics import answers_agree, first_token_kl, qa_f1_score, rouge_l_score


def score(example: Example, text: str) -> float | None:
    """The example's task metric in [0, 1]; None when it has no gold answers."""
    if example.task == "summary":
        return rouge_l_score(text, example.answers)
    if example.task == "qa" and example.answers:
        return qa_f1_score(text, example.answers)
    return None


def strategy_labels(strategies: Sequence[str]) -> list[str]:
    """``full`` first (the reference), then the requested specs in order, without repeats."""
    labels = ["full"]
    for spec in strategies:
        spec = spec.strip()
        if spec and spec not in labels:
            parse_strategy_spec(spec)  # fail before any work on a bad name
            labels.append(spec)
    return labels


def run_eval(
    engine: ChunkCacheEngine,
    examples: Sequence[Example],
    strategies: Sequence[str],
    max_new_tokens: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One row per example with each strategy's answer, score and fidelity to ``full``.
    Every example's chunks are precomputed before its strategies are timed."""
    labels = strategy_labels(strategies)
    specs = [parse_strategy_spec(label) for label in labels]
    specs = [(n, {**p, "seed": seed}) if p.get("selection") == "random" else (n, p) for n, p in specs]
    usable = [e for e in examples if e.chunks]
    if usable:  # warm-up: first calls pay one-time costs (allocator, kernels) that are not TTFT
        engine.precompute(list(usable[0].chunks))
        for name, params in specs:
            engine.answer(usable[0].question, list(usable[0].chunks), strategy=name, max_new_tokens=1, **params)
    rows = []
    bar = tqdm(usable, desc="eval", unit="example", disable=not progress)
    for example in bar:
        chunks = list(example.chunks)
        engine.precompute(chunks)
        answers: dict[str, Answer] = {}
        for label, (name, params) in zip(labels, specs):
            answers[label] = engine.answer(
                example.question, chunks, strategy=name, max_new_tokens=max_new_tokens, keep_logits=True, **params
            )
        rows.append(_row(example, answers))
        bar.set_postfix(tokens=answers["full"].prompt_tokens)
    return rows


def _row(example: Example, answers: dict[str, Answer]) -> dict[str, Any]:
    full = answers["full"]
    full_top = int(torch.argmax(full.first_token_logits))
    results = {}
    for label, a in answers.items():
        results[label] = {
            "text": a.text,
            "score": score(example, a.text),
            "agrees_with_full": answers_agree(a.text, full.text),
            "first_token_agrees": int(torch.argmax(a.first_token_logits)) == full_top,
            "first_token_kl": first_token_kl(full.first_token_logits, a.first_token_logits),
            "ttft_s": a.ttft_s,
            "recomputed_fraction": a.recomputed_tokens / a.prompt_tokens,
            "timings": a.timings,
        }
    return {
        "id": example.id,
        "question": example.question,
        "answers": list(example.answers),
        "task": example.task,
        "chunks": len(example.chunks),
        "prompt_tokens": full.prompt_tokens,
        "strategies": results,
    }
