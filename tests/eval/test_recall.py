"""Recall on HotpotQA-format data: passages pooled (duplicates stored once), gold passages found."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chunkcache.eval.recall import hotpot_recall
from chunkcache.retriever import MiniLMEmbedder

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "hotpotqa_distractor_train100.jsonl"

PASSAGES = {
    "Etna": ["Mount Etna is an active stratovolcano on the east coast of Sicily.", " It is the tallest active volcano in Europe outside the Caucasus."],
    "Louvre": ["The Louvre is the world's most-visited museum, in Paris.", " It houses the Mona Lisa."],
    "Camellia": ["Camellia sinensis is the plant whose leaves are used to make tea."],
    "Rossum": ["Guido van Rossum is a Dutch programmer who created Python."],
    "Jupiter": ["Jupiter is the largest planet in the Solar System."],
}


def _example(i: int, question: str, gold: str, others: list[str]) -> dict:
    titles = [gold, *others]
    return {"_id": f"q{i}", "question": question, "answer": "x",
            "context": [[t, PASSAGES[t]] for t in titles], "supporting_facts": [[gold, 0]]}


def test_recall_on_a_small_hotpot_file(tmp_path: Path, embedder: MiniLMEmbedder) -> None:
    rows = [
        _example(0, "On which island is Mount Etna?", "Etna", ["Louvre", "Jupiter"]),
        _example(1, "Which museum houses the Mona Lisa?", "Louvre", ["Etna", "Camellia"]),
        _example(2, "Who created the Python programming language?", "Rossum", ["Jupiter", "Louvre"]),
    ]
    path = tmp_path / "hotpot.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    report = hotpot_recall(path, embedder, k=1, index_dir=tmp_path / "ix")
    assert (report.questions, report.passages, report.k) == (3, 5, 1)  # 9 passages, 5 distinct
    assert report.hit_rate == report.recall == 1.0
    assert (tmp_path / "ix" / "manifest.json").is_file()


@pytest.mark.skipif(not SHARED.is_file(), reason="the shared evaluation data is not here")
def test_recall_on_the_first_hotpotqa_examples(tmp_path: Path, embedder: MiniLMEmbedder) -> None:
    path = tmp_path / "first8.jsonl"
    path.write_text("".join(SHARED.read_text(encoding="utf-8").splitlines(keepends=True)[:8]), encoding="utf-8")
    report = hotpot_recall(path, embedder, k=5)
    assert report.questions == 8 and report.passages == 80
    assert report.hit_rate >= 0.75 and 0 < report.recall <= report.hit_rate
