"""Query time of `ChunkIndex.search` per retrieval mode on a large index: ``--chunks`` chunks cut
from the shared datasets' passages (windows of ``--words`` words, every dataset's passages in turn
until there are enough), searched with the HotpotQA questions one at a time, as a server does.
Also times the query embedding alone, the part of dense and hybrid search that the index size
does not change.

Run: ``python -m chunkcache.eval.search_latency [--chunks 10000] [--words 60] [--out FILE]``."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from chunkcache.eval.datasets import load_examples
from chunkcache.retriever.chunking import Chunk
from chunkcache.retriever.fusion import MODES
from chunkcache.retriever.index import ChunkIndex

SOURCES = ("hotpotqa_distractor_train100.jsonl", "musique_s.jsonl", "hotpotqa_s.jsonl", "wikimqa_s_clean.jsonl",
           "musique_ans_train100.jsonl", "multihop_rag_s.jsonl", "longbench_multi_news.jsonl")


def _windows(data: Path, words: int) -> Iterator[str]:
    for name in SOURCES:
        for ex in load_examples(data / name):
            for passage in ex.chunks:
                tokens = passage.split()
                for start in range(0, len(tokens), words):
                    yield " ".join(tokens[start:start + words])


def _timed(call: Callable[[], Any], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def _summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {"p50_ms": round(statistics.median(ordered) * 1e3, 2),
            "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))] * 1e3, 2),
            "mean_ms": round(statistics.fmean(ordered) * 1e3, 2)}


def search_latency(chunks: int = 10_000, words: int = 60, data: Path | None = None, queries: int = 66) -> dict[str, Any]:
    if data is None:
        from chunkcache.config import Settings

        data = Settings.load().data_dir
    texts: dict[str, Chunk] = {}
    for text in _windows(data, words):
        chunk = Chunk.from_text(text, f"window-{len(texts)}")
        texts.setdefault(chunk.chunk_id, chunk)
        if len(texts) >= chunks:
            break
    questions = [ex.question for ex in load_examples(data / SOURCES[0])][:queries]
    with tempfile.TemporaryDirectory(prefix="chunkcache-latency-") as tmp:
        start = time.perf_counter()
        with ChunkIndex.build(Path(tmp), chunks=texts.values()) as index:
            build_s = time.perf_counter() - start
            index.search(questions[0], 5)  # loads the model: not a query's cost
            report: dict[str, Any] = {"chunks": len(index), "words_per_chunk": words, "queries": len(questions),
                                      "build_s": round(build_s, 1)}
            embed = [t for q in questions for t in _timed(lambda q=q: index.embedder.embed([q]), 1)]
            report["embed_query"] = _summary(embed)
            for mode in MODES:
                report[mode] = _summary([t for q in questions
                                         for t in _timed(lambda q=q, m=mode: index.search(q, 5, m), 1)])
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--words", type=int, default=60)
    parser.add_argument("--data", type=Path, default=None, help="folder of the QA files (default: the data_dir setting)")
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    args = parser.parse_args(argv)
    report = search_latency(args.chunks, args.words, args.data)
    print(json.dumps(report, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
