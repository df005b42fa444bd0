"""Loading RAG QA examples from every format in the shared data folder. Each example becomes a
question, a list of chunk texts and gold answers (plus the metric its task is scored with)."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from chunkcache.errors import InvalidInputError

SUMMARY_QUESTION = "Write a one-page summary of all the news passages above."
_PASSAGE_MARK = re.compile(r"(?:^|\n)Passage \d+:\n?")
_DEMO_QUESTION = re.compile(r"Question:\s*(.*?)\s*(?:\nAnswer:)?\s*$", re.S)


@dataclass(frozen=True)
class Example:
    question: str
    chunks: tuple[str, ...]
    answers: tuple[str, ...]
    task: str = "qa"  # "qa": qa_f1_score; "summary": ROUGE-L; "none": no gold answers
    id: str = ""


def _answers(raw: Any) -> tuple[str, ...]:
    out: list[str] = []
    for item in raw if isinstance(raw, list) else [raw]:
        out.extend(_answers(item) if isinstance(item, list) else [str(item)])
    return tuple(out)


def _titled(title: str, text: str) -> str:
    return f"{title}\n{text}".strip() if title else text.strip()


def _ctxs(r: dict, i: int) -> Example:  # MuSiQue-s, 2WikiMQA, HotpotQA-s, MultiHop-RAG
    chunks = tuple(_titled(c.get("title", ""), c["text"]) for c in r["ctxs"])
    return Example(r["question"], chunks, _answers(r.get("answers", [])), id=str(r.get("id", i)))


def _hotpot(r: dict, i: int) -> Example:  # original HotpotQA: context = [[title, [sentences]]]
    chunks = tuple(_titled(title, "".join(sentences)) for title, sentences in r["context"])
    return Example(r["question"], chunks, _answers(r["answer"]), id=str(r.get("_id", i)))


def _musique(r: dict, i: int) -> Example:  # MuSiQue paragraphs format
    chunks = tuple(_titled(p.get("title", ""), p["paragraph_text"]) for p in r["paragraphs"])
    answers = _answers([r["answer"], *r.get("answer_aliases", [])])
    return Example(r["question"], chunks, answers, id=str(r.get("id", i)))


def _longbench(r: dict, i: int) -> Example:  # LongBench: context split on "Passage N:"
    chunks = tuple(p.strip() for p in _PASSAGE_MARK.split(r["context"]) if p.strip())
    question = r.get("input") or SUMMARY_QUESTION
    task = "summary" if not r.get("input") else "qa"
    return Example(question, chunks, _answers(r.get("answers", [])), task=task, id=str(r.get("_id", i)))


def _cacheblend_demo(r: dict, i: int) -> Example:  # numbered chunks + instruction query, no answers
    chunks = tuple(r[str(k)].strip() for k in range(int(r["chunk_num"])))
    match = _DEMO_QUESTION.search(r["query"])
    question = match.group(1) if match else r["query"].strip()
    return Example(question, chunks, (), task="none", id=str(i))


def _bundled(r: dict, i: int) -> Example:  # chunkcache's own {"question", "chunks", "answers"}
    return Example(r["question"], tuple(r["chunks"]), _answers(r.get("answers", [])), id=str(r.get("source", i)))


_FORMATS: list[tuple[Callable[[dict], bool], Callable[[dict, int], Example]]] = [
    (lambda r: "ctxs" in r, _ctxs),
    (lambda r: "context" in r and isinstance(r["context"], list), _hotpot),
    (lambda r: "paragraphs" in r, _musique),
    (lambda r: "context" in r and isinstance(r["context"], str), _longbench),
    (lambda r: "chunk_num" in r and "query" in r, _cacheblend_demo),
    (lambda r: "chunks" in r and "question" in r, _bundled),
]


def parse_record(record: dict, index: int, where: str = "") -> Example:
    for matches, build in _FORMATS:
        if matches(record):
            try:
                return build(record, index)
            except (KeyError, TypeError, ValueError) as exc:
                raise InvalidInputError(f"{where}example {index + 1}: malformed record ({exc!r})") from None
    raise InvalidInputError(
        f"{where}example {index + 1}: unrecognised example format (known: ctxs/question/answers, "
        "HotpotQA context, MuSiQue paragraphs, LongBench context, CacheBlend demo, chunks/question)"
    )


def _records(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInputError(f"cannot read dataset {path}: {exc}") from None
    try:
        stripped = text.lstrip()
        if stripped.startswith("["):
            return list(json.loads(text))
        if stripped.startswith("{") and '"examples"' in stripped[:200]:
            return list(json.loads(text)["examples"])
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InvalidInputError(f"dataset {path} is neither JSON Lines nor a JSON list: {exc}") from None


def load_examples(
    path: Path,
    limit: int | None = None,
    passages: int | None = None,
    shuffle_seed: int | None = None,
    truncate: Callable[[str], str] | None = None,
) -> list[Example]:
    """The first ``limit`` examples of a dataset, each keeping its first ``passages`` chunks in
    the given order (or shuffled with ``shuffle_seed``), each chunk passed through ``truncate``
    (e.g. a per-chunk token budget)."""
    path = Path(path)
    examples = []
    for i, record in enumerate(_records(path)[: limit or None]):
        if not isinstance(record, dict):
            raise InvalidInputError(f"{path}: example {i + 1} is not a JSON object")
        example = parse_record(record, i, f"{path}: ")
        chunks = list(example.chunks)
        if shuffle_seed is not None:
            random.Random(f"{shuffle_seed}:{i}").shuffle(chunks)
        chunks = chunks[: passages or None]
        if truncate is not None:
            chunks = [truncate(c) for c in chunks]
        examples.append(replace(example, chunks=tuple(chunks)))
    return examples
