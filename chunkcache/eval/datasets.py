"""Loading RAG QA examples (question, chunk texts, gold answers) from the shared data formats."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from chunkcache.errors import InvalidInputError


@dataclass(frozen=True)
class Example:
    question: str
    chunks: tuple[str, ...]
    answers: tuple[str, ...]


def _answers(raw: object) -> tuple[str, ...]:
    out: list[str] = []
    for item in raw if isinstance(raw, list) else [raw]:
        out.extend(_answers(item) if isinstance(item, list) else [str(item)])
    return tuple(out)


def _from_record(record: dict, path: Path, line: int) -> Example:
    if "examples" in record:  # the bundled demo file: {"examples": [{question, chunks, answers}]}
        raise InvalidInputError(f"{path}: nested examples are read by load_examples, not per record")
    if "ctxs" in record:
        chunks = [f"{c.get('title', '')}\n{c['text']}".strip() for c in record["ctxs"]]
        return Example(record["question"], tuple(chunks), _answers(record.get("answers", [])))
    if "chunks" in record:
        return Example(record["question"], tuple(record["chunks"]), _answers(record.get("answers", [])))
    raise InvalidInputError(
        f"{path} line {line}: unrecognised example format (expected ctxs/question/answers or chunks/question)"
    )


def load_examples(path: Path, limit: int | None = None, passages: int | None = None) -> list[Example]:
    """Examples of a JSON Lines file (or a JSON file with an ``examples`` list), each keeping its
    first ``passages`` chunks in the given order."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInputError(f"cannot read dataset {path}: {exc}") from None
    try:
        if text.lstrip().startswith("{") and '"examples"' in text[:2000]:
            records = json.loads(text)["examples"]
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InvalidInputError(f"dataset {path} is not valid JSON Lines: {exc}") from None
    examples = []
    for i, record in enumerate(records[: limit if limit else None]):
        try:
            example = _from_record(record, Path(path), i + 1)
        except KeyError as exc:
            raise InvalidInputError(f"{path} line {i + 1}: missing field {exc}") from None
        if passages:
            example = Example(example.question, example.chunks[:passages], example.answers)
        examples.append(example)
    return examples
