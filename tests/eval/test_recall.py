"""Recall on HotpotQA-format data: passages pooled (duplicates stored once), per retrieval mode: gold
passages found, answers inside the top chunks (yes/no questions left out), time per query."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chunkcache.errors import InvalidInputError
from chunkcache.eval.recall import parse_variant, pooled_recall
from chunkcache.retriever import MiniLMEmbedder, SearchOptions

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "hotpotqa_distractor_train100.jsonl"

PASSAGES = {
    "Etna": ["Mount Etna is an active stratovolcano on the east coast of Sicily.", " It is the tallest active volcano in Europe outside the Caucasus."],
    "Louvre": ["The Louvre is the world's most-visited museum, in Paris.", " It houses the Mona Lisa."],
    "Camellia": ["Camellia sinensis is the plant whose leaves are used to make tea."],
    "Rossum": ["Guido van Rossum is a Dutch programmer who created Python."],
    "Jupiter": ["Jupiter is the largest planet in the Solar System."],
}


def _example(i: int, question: str, gold: str, others: list[str], answer: str) -> dict:
    titles = [gold, *others]
    return {"_id": f"q{i}", "question": question, "answer": answer,
            "context": [[t, PASSAGES[t]] for t in titles], "supporting_facts": [[gold, 0]]}


def test_recall_on_a_small_hotpot_file(tmp_path: Path, embedder: MiniLMEmbedder) -> None:
    rows = [
        _example(0, "On which island is Mount Etna?", "Etna", ["Louvre", "Jupiter"], "Sicily"),
        _example(1, "Which museum houses the Mona Lisa?", "Louvre", ["Etna", "Camellia"], "The Louvre"),
        _example(2, "Who created the Python programming language?", "Rossum", ["Jupiter", "Louvre"], "Guido"),
        _example(3, "Is Jupiter the largest planet?", "Jupiter", ["Etna"], "yes"),
    ]
    path = tmp_path / "hotpot.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    name, no_links = parse_variant("no-links:link_hops=0", SearchOptions())
    reports = pooled_recall(path, embedder, k=1, index_dir=tmp_path / "ix", variants={name: no_links})
    assert [r.mode for r in reports] == ["dense", "lexical", "hybrid", "no-links"]
    for report in reports:
        assert (report.questions, report.passages, report.k, report.answerable) == (4, 5, 1, 3)  # 11 passages, 5 distinct
        assert report.hit_rate == report.recall == report.answer_in_top_k == 1.0, report.mode
        assert report.query_p50_ms > 0
    assert (tmp_path / "ix" / "manifest.json").is_file()
    with pytest.raises(InvalidInputError, match="keys from retrieval, fusion"):
        parse_variant("x:bogus=1", SearchOptions())


@pytest.mark.skipif(not SHARED.is_file(), reason="the shared evaluation data is not here")
def test_recall_on_the_first_hotpotqa_examples(tmp_path: Path, embedder: MiniLMEmbedder) -> None:
    path = tmp_path / "first8.jsonl"
    path.write_text("".join(SHARED.read_text(encoding="utf-8").splitlines(keepends=True)[:8]), encoding="utf-8")
    report, = pooled_recall(path, embedder, k=5, modes=("hybrid",))
    assert report.questions == 8 and report.passages == 80
    assert report.hit_rate >= 0.75 and 0 < report.recall <= report.hit_rate and report.answer_in_top_k >= 0.5
