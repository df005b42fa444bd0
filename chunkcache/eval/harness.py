"""`chunkcache eval`: every strategy beside full prefill on the same examples, same prompts, same
model; per-example answers, scores and fidelity to full, then the aggregate report."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm import tqdm

from chunkcache.blend import parse_strategy_spec
from chunkcache.codec import get_codec
from chunkcache.engine import Answer, ChunkCacheEngine, ChunkNeighbours
from chunkcache.errors import InvalidInputError
from chunkcache.eval.datasets import Example
from chunkcache.eval.metrics import answers_agree, first_token_kl, qa_f1_score, rouge_l_score


def score(example: Example, text: str) -> float | None:
    """The example's task metric in [0, 1]; None when it has no gold answers."""
    if example.task == "summary":
        return rouge_l_score(text, example.answers)
    if example.task == "qa" and example.answers:
        return qa_f1_score(text, example.answers)
    return None


CONTEXTS = ("primer", "neighbours")


def strategy_labels(strategies: Sequence[str], codecs: Sequence[str] = ()) -> list[str]:
    """``full`` first (the reference), then the requested specs in order, without repeats.

    With several codecs every cached strategy is run through each, labelled ``spec@codec``. A
    spec may end in ``#neighbours`` (its chunks computed behind their neighbours in the corpus
    index) or ``#primer`` (behind the primer alone), whatever the chunk_primer setting says."""
    labels = ["full"]
    for spec in strategies:
        spec = spec.strip()
        if spec and spec not in labels:
            name, _, context = spec.partition("#")
            if context and context not in CONTEXTS:
                raise InvalidInputError(f"{spec!r}: after '#' comes one of {', '.join(CONTEXTS)}")
            parse_strategy_spec(name)  # fail before any work on a bad name
            labels.append(spec)
    for codec in codecs:
        get_codec(codec)
    if len(codecs) <= 1:
        return labels
    return ["full"] + [f"{label}@{codec.strip()}" for label in labels[1:] for codec in codecs]


def split_label(label: str) -> tuple[str, str | None, str | None]:
    """``spec#context@codec`` -> (spec, codec, context); a plain label has neither."""
    spec, _, codec = label.partition("@")
    spec, _, context = spec.partition("#")
    return spec, codec or None, context or None


def run_eval(
    engine: ChunkCacheEngine,
    examples: Sequence[Example],
    strategies: Sequence[str],
    max_new_tokens: int = 32,
    seed: int = 0,
    progress: bool = True,
    codecs: Sequence[str] = (),
    recurring: bool = False,
    corpus: ChunkNeighbours | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per example with each strategy's answer, score and fidelity to ``full``.
    Every example's chunks are precomputed (in every codec) before its strategies are timed;
    chunk caches pass through the codec, so its loss shows in the scores.

    ``recurring``: the chunks have been seen before. A full prefill of the example's passages in
    their given order keeps cachecraft variants (not timed), then every strategy answers the
    question over the same passages in a seeded shuffled order.

    ``corpus``: an index holding every passage of the dataset; strategies labelled ``#neighbours``
    (and, with ``chunk_primer: neighbours``, unlabelled ones) compute chunks behind their
    neighbours there. ``on_row`` sees each row as soon as its example is done."""
    labels = strategy_labels(strategies, codecs)
    default_codec = engine.codec.spec
    primed = engine.primes_with_neighbours
    runs = []
    for label in labels:
        spec, codec, context = split_label(label)
        name, params = parse_strategy_spec(spec)
        params = {**params, "seed": seed} if params.get("selection") == "random" else params
        nearby = context == "neighbours" or (context is None and primed)
        if nearby and corpus is None:
            raise InvalidInputError(f"{label}: chunks behind their neighbours need a corpus index (--corpus-index)")
        runs.append((label, name, params, codec or (codecs[0] if codecs else default_codec), nearby))
    usable = [e for e in examples if e.chunks]

    def answer_all(example: Example, max_new: int, keep_logits: bool) -> dict[str, Answer]:
        chunks = list(example.chunks)
        for codec, nearby in dict.fromkeys((run[3], run[4]) for run in runs):
            engine.use_codec(codec)
            engine.use_neighbours(corpus if nearby else None)
            engine.precompute(chunks)
            if recurring:
                engine.answer(example.question, chunks, strategy="full", max_new_tokens=1, record_variants=True)
        if recurring:
            random.Random(f"{seed}:{example.id}").shuffle(chunks)
        answers = {}
        for label, name, params, codec, nearby in runs:
            engine.use_codec(codec)
            engine.use_neighbours(corpus if nearby else None)
            answers[label] = engine.answer(
                example.question, chunks, strategy=name, max_new_tokens=max_new, keep_logits=keep_logits,
                record_variants=False, **params
            )
        return answers

    try:
        if usable:  # warm-up: first calls pay one-time costs (allocator, kernels) that are not TTFT
            answer_all(usable[0], 1, False)
        rows = []
        bar = tqdm(usable, desc="eval", unit="example", disable=not progress)
        for example in bar:
            answers = answer_all(example, max_new_tokens, True)
            rows.append(_row(example, answers))
            if on_row is not None:
                on_row(rows[-1])
            bar.set_postfix(tokens=answers["full"].prompt_tokens)
    finally:
        engine.use_codec(default_codec)
        engine.use_neighbours(None)
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
