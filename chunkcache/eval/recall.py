"""Retrieval quality per retrieval mode (dense, lexical, hybrid): every passage of every example of
a dataset pooled into one index (identical passages stored once), each question searched, and
reported per mode:

- answer-in-top-k: the share of questions (yes/no questions left out: their answer is not a span)
  with a gold answer, SQuAD-normalised, inside the normalised text of one of the top k chunks;
- where the data marks supporting passages (HotpotQA supporting facts, MuSiQue ``is_supporting``):
  the share of questions with at least one in the top k, and their mean recall@k;
- the time per query (one `ChunkIndex.search` call each: embedding, both retrievers, fusion).

Run: ``python -m chunkcache.eval.recall [DATASET ...] [--k 5] [--modes dense,lexical,hybrid]
[--fusion rrf|weighted] [--variant NAME:link_hops=0,fusion=weighted ...] [--out FOLDER]`` (one
JSON file per dataset in FOLDER); a variant is one more hybrid run, over the same index, with
those search options changed."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from chunkcache.errors import InvalidInputError
from chunkcache.eval.metrics import normalize_answer
from chunkcache.retriever.chunking import Chunk
from chunkcache.retriever.embedder import Embedder
from chunkcache.retriever.fusion import MODES, SearchOptions
from chunkcache.retriever.index import ChunkIndex

DEFAULT_DATASET = "hotpotqa_distractor_train100.jsonl"  # in the data_dir setting
_YES_NO = {"yes", "no"}


@dataclass(frozen=True)
class RecallReport:
    dataset: str
    mode: str  # dense | lexical | hybrid, or the name of a hybrid variant
    k: int
    questions: int
    passages: int  # distinct passages in the index
    answerable: int  # questions whose answer is not yes/no
    answer_in_top_k: float  # share of those with a gold answer string inside a top-k chunk
    hit_rate: float | None  # share of questions with >= 1 supporting passage in the top k (None: unlabelled data)
    recall: float | None  # mean over questions of (supporting passages in the top k) / (supporting passages)
    index_s: float
    query_p50_ms: float
    query_mean_ms: float


def _titles(record: dict[str, Any]) -> list[str]:
    """The record's passage titles, in the loader's passage order ("" where a passage has none)."""
    if isinstance(record.get("context"), list):
        return [str(title) for title, _ in record["context"]]
    return [str(p.get("title") or "") for p in record.get("ctxs", record.get("paragraphs", []))]


def _supporting(record: dict[str, Any]) -> tuple[set[str], set[int]]:
    """(titles of the supporting passages, positions of the supporting passages) of one record."""
    titles = {str(t) for t, _ in record.get("supporting_facts", [])}
    positions = {i for i, p in enumerate(record.get("paragraphs", [])) if p.get("is_supporting")}
    return titles, positions


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def pooled_recall(path: str | Path | None = None, embedder: Embedder | None = None, k: int = 5,
                  modes: tuple[str, ...] = MODES, factory: str = "Flat", index_dir: str | Path | None = None,
                  options: SearchOptions | None = None,
                  variants: Mapping[str, SearchOptions] | None = None) -> list[RecallReport]:
    """Build a pooled index of the dataset's passages (in ``index_dir``, replaced if it holds one,
    else in a temporary folder) and measure each retrieval mode on its questions, then hybrid
    search with each of ``variants`` (name -> options)."""
    from chunkcache.eval.datasets import load_examples  # passages exactly as the evaluation builds them

    if path is None:
        from chunkcache.config import Settings

        path = Settings.load().data_dir / DEFAULT_DATASET
    path = Path(path)
    examples = load_examples(path)
    records = _records(path)
    chunks: dict[str, Chunk] = {}
    gold: list[set[str] | None] = []
    for ex, record in zip(examples, records):
        titles, positions = _supporting(record)
        ids = set()
        for position, (text, title) in enumerate(zip(ex.chunks, _titles(record))):
            # the passage's title goes with it into both indexes (it already starts the text)
            made = Chunk.from_text(text, title or text[:80], {"title": title} if title else None)
            chunk = chunks.setdefault(made.chunk_id, made)
            if title in titles or position in positions:
                ids.add(chunk.chunk_id)
        if (titles or positions) and not ids:
            raise InvalidInputError(f"{path}: example {ex.id} names supporting passages that none of its passages match")
        gold.append(ids or None)
    answers = [{normalize_answer(a) for a in ex.answers} - _YES_NO - {""} for ex in examples]
    reports = []
    with tempfile.TemporaryDirectory(prefix="chunkcache-recall-") as tmp:
        folder = Path(index_dir) if index_dir is not None else Path(tmp)
        start = time.perf_counter()
        with ChunkIndex.build(folder, embedder, factory, chunks.values(), overwrite=True, options=options) as index:
            index_s = time.perf_counter() - start
            index.search(examples[0].question, k)  # first call loads the embedding model: not a query's cost
            base = index.options
            runs = [(mode, mode, base) for mode in modes]
            runs += [(name, "hybrid", variant) for name, variant in (variants or {}).items()]
            for name, mode, run_options in runs:
                index.options = run_options
                times, results = [], []
                for ex in examples:
                    start = time.perf_counter()
                    results.append(index.search(ex.question, k, mode))
                    times.append(time.perf_counter() - start)
                reports.append(_report(str(path), name, k, len(index), results, gold, answers, index_s, times))
    return reports


def _report(dataset: str, mode: str, k: int, passages: int, results: list[list[Any]],
            gold: list[set[str] | None], answers: list[set[str]], index_s: float, times: list[float]) -> RecallReport:
    asked = [(hits, golds) for hits, golds in zip(results, answers) if golds]
    answered = sum(any(a in normalize_answer(h.text) for h in hits for a in golds) for hits, golds in asked)
    labelled = [(g, {h.chunk_id for h in hits}) for g, hits in zip(gold, results) if g]
    found = [len(g & got) / len(g) for g, got in labelled]
    return RecallReport(
        dataset=dataset, mode=mode, k=k, questions=len(results), passages=passages, answerable=len(asked),
        answer_in_top_k=round(answered / len(asked), 4) if asked else 0.0,
        hit_rate=round(sum(f > 0 for f in found) / len(found), 4) if found else None,
        recall=round(sum(found) / len(found), 4) if found else None,
        index_s=round(index_s, 2), query_p50_ms=round(statistics.median(times) * 1e3, 2),
        query_mean_ms=round(statistics.fmean(times) * 1e3, 2),
    )


def parse_variant(spec: str, base: SearchOptions) -> tuple[str, SearchOptions]:
    """``NAME:key=value,key=value`` (keys: SearchOptions fields other than bm25) -> (NAME, options)."""
    name, _, body = spec.partition(":")
    kinds = {f.name: type(getattr(base, f.name)) for f in fields(SearchOptions) if f.name != "bm25"}
    changes: dict[str, Any] = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        if key not in kinds or not name:
            raise InvalidInputError(f"variant {spec!r}: write NAME:key=value,... with keys from {', '.join(kinds)}")
        changes[key] = kinds[key](value)
    return name, replace(base, **changes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("datasets", nargs="*", help=f"QA files (default: {DEFAULT_DATASET} in the data_dir setting)")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--factory", default="Flat")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: dense,lexical,hybrid")
    parser.add_argument("--fusion", choices=("rrf", "weighted"), default="rrf")
    parser.add_argument("--dense-weight", type=float, default=SearchOptions.dense_weight)
    parser.add_argument("--link-hops", type=int, default=SearchOptions.link_hops, help="0: no link step")
    parser.add_argument("--link-weight", type=float, default=SearchOptions.link_weight)
    parser.add_argument("--variant", action="append", default=[],
                        help="one more hybrid run: NAME:key=value,... (e.g. no-links:link_hops=0)")
    parser.add_argument("--out", type=Path, help="write one JSON file per dataset into this folder")
    args = parser.parse_args(argv)
    options = SearchOptions(fusion=args.fusion, dense_weight=args.dense_weight, link_hops=args.link_hops,
                            link_weight=args.link_weight)
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    variants = dict(parse_variant(spec, options) for spec in args.variant)
    if not args.datasets:
        from chunkcache.config import Settings

        args.datasets = [str(Settings.load().data_dir / DEFAULT_DATASET)]
    for dataset in args.datasets:
        reports = [asdict(r) for r in pooled_recall(dataset, k=args.k, modes=modes, factory=args.factory,
                                                     options=options, variants=variants)]
        payload = {"options": asdict(options), "variants": {n: asdict(v) for n, v in variants.items()},
                   "reports": reports}
        print(json.dumps(payload, indent=2))
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{Path(dataset).stem}.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
