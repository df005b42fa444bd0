"""Retrieval quality on HotpotQA (distractor format, with supporting facts): every passage of every
example pooled into one index (identical passages stored once), each question searched, and
reported: the share of questions with at least one gold supporting passage in the top k, and the
mean recall@k of the supporting passages.

Run: ``python -m chunkcache.eval.recall [DATASET] [--k 5] [--factory Flat]``."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from chunkcache.errors import InvalidInputError
from chunkcache.retriever.chunking import Chunk
from chunkcache.retriever.embedder import Embedder
from chunkcache.retriever.index import ChunkIndex

DEFAULT_DATASET = Path("../shared/data/hotpotqa_distractor_train100.jsonl")


@dataclass(frozen=True)
class RecallReport:
    dataset: str
    k: int
    questions: int
    passages: int  # distinct passages in the index
    hit_rate: float  # share of questions with >= 1 supporting passage in the top k
    recall: float  # mean over questions of (supporting passages in the top k) / (supporting passages)
    index_s: float
    search_s: float


def _supporting_titles(path: Path) -> dict[str, set[str]]:
    """Example id -> titles of its supporting paragraphs (the loader keeps passages, not facts)."""
    titles: dict[str, set[str]] = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if line.strip():
            record = json.loads(line)
            titles[str(record.get("_id", i))] = {str(t) for t, _ in record.get("supporting_facts", [])}
    return titles


def hotpot_recall(path: str | Path = DEFAULT_DATASET, embedder: Embedder | None = None, k: int = 5,
                  factory: str = "Flat", index_dir: str | Path | None = None) -> RecallReport:
    """Build a pooled index of the dataset's passages (in ``index_dir``, replaced if it holds one,
    else in a temporary folder) and measure retrieval of the gold supporting passages."""
    from chunkcache.eval.datasets import load_examples  # passages exactly as the evaluation builds them

    path = Path(path)
    examples = load_examples(path)
    support = _supporting_titles(path)
    chunks: dict[str, Chunk] = {}
    gold: list[set[str]] = []
    for ex in examples:
        ids = set()
        for text in ex.chunks:
            title = text.split("\n", 1)[0]
            chunk = chunks.setdefault(Chunk.from_text(text, title).chunk_id, Chunk.from_text(text, title))
            if title in support.get(ex.id, set()):
                ids.add(chunk.chunk_id)
        if not ids:
            raise InvalidInputError(f"{path}: example {ex.id} has no passage titled as a supporting fact")
        gold.append(ids)
    with tempfile.TemporaryDirectory(prefix="chunkcache-recall-") as tmp:
        folder = Path(index_dir) if index_dir is not None else Path(tmp)
        start = time.perf_counter()
        with ChunkIndex.build(folder, embedder, factory, chunks.values(), overwrite=True) as index:
            index_s = time.perf_counter() - start
            start = time.perf_counter()
            results = index.search_many([ex.question for ex in examples], k)
            search_s = time.perf_counter() - start
            passages = len(index)
    found = [len(g & {h.chunk_id for h in hits}) for g, hits in zip(gold, results)]
    return RecallReport(
        dataset=str(path), k=k, questions=len(examples), passages=passages,
        hit_rate=sum(f > 0 for f in found) / len(examples),
        recall=sum(f / len(g) for f, g in zip(found, gold)) / len(examples),
        index_s=round(index_s, 2), search_s=round(search_s, 2),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", nargs="?", default=str(DEFAULT_DATASET))
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--factory", default="Flat")
    args = parser.parse_args(argv)
    print(json.dumps(asdict(hotpot_recall(args.dataset, k=args.k, factory=args.factory)), indent=2))


if __name__ == "__main__":
    main()
