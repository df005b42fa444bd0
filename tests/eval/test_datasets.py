"""Every format in the shared data folder loads into question + chunks + answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chunkcache.errors import InvalidInputError
from chunkcache.eval.datasets import SUMMARY_QUESTION, load_examples, parse_record

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")


def test_each_record_format() -> None:
    hotpot = parse_record({"_id": "h", "question": "q", "answer": "a", "context": [["T", ["One.", " Two."]]]}, 0)
    assert (hotpot.chunks, hotpot.answers, hotpot.id) == (("T\nOne. Two.",), ("a",), "h")
    musique = parse_record({"question": "q", "answer": "a", "answer_aliases": ["b"],
                            "paragraphs": [{"title": "T", "paragraph_text": "p"}]}, 0)
    assert (musique.chunks, musique.answers) == (("T\np",), ("a", "b"))
    news = parse_record({"input": "", "context": "Passage 1:\nfirst\nPassage 2:\nsecond", "answers": ["s"]}, 0)
    assert (news.chunks, news.task, news.question) == (("first", "second"), "summary", SUMMARY_QUESTION)
    demo = parse_record({"0": "\n\nc0", "1": "\n\nc1", "chunk_num": 2,
                         "query": "\n\nAnswer briefly. Question: who is it?\nAnswer:"}, 0)
    assert (demo.chunks, demo.question, demo.task, demo.answers) == (("c0", "c1"), "who is it?", "none", ())
    wiki = parse_record({"question": "q", "ctxs": [{"title": "", "text": "t"}], "answers": [["x", "y"], ["z"]]}, 0)
    assert wiki.answers == ("x", "y", "z")
    with pytest.raises(InvalidInputError, match="unrecognised example format"):
        parse_record({"foo": 1}, 3)
    with pytest.raises(InvalidInputError, match="malformed record"):
        parse_record({"question": "q", "ctxs": [{"title": "no text"}]}, 0)


def test_options_limit_passages_shuffle_and_truncate(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [{"question": f"q{i}", "ctxs": [{"text": f"c{j}"} for j in range(6)], "answers": ["a"]} for i in range(4)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert [e.question for e in load_examples(path, limit=2)] == ["q0", "q1"]
    assert load_examples(path, passages=3)[0].chunks == ("c0", "c1", "c2")
    shuffled = load_examples(path, shuffle_seed=1)
    assert shuffled == load_examples(path, shuffle_seed=1)
    assert shuffled[0].chunks != rows[0] and sorted(shuffled[0].chunks) == [f"c{j}" for j in range(6)]
    assert any(e.chunks != tuple(f"c{j}" for j in range(6)) for e in shuffled)
    assert load_examples(path, truncate=lambda t: t[:1])[0].chunks == ("c",) * 6


@needs_shared
@pytest.mark.parametrize(
    ("name", "chunks", "task"),
    [
        ("musique_s.jsonl", 10, "qa"), ("wikimqa_s_clean.jsonl", 10, "qa"), ("hotpotqa_s.jsonl", None, "qa"),
        ("multihop_rag_s.jsonl", None, "qa"), ("longbench_multi_news.jsonl", None, "summary"),
        ("hotpotqa_distractor_train100.jsonl", 10, "qa"), ("musique_ans_train100.jsonl", 20, "qa"),
        ("cacheblend_demo.jsonl", None, "none"),
    ],
)
def test_every_shared_file_loads(name: str, chunks: int | None, task: str) -> None:
    examples = load_examples(SHARED / name, limit=5)
    assert len(examples) == 5
    for example in examples:
        assert example.question.strip() and example.task == task
        assert all(c.strip() for c in example.chunks)
        assert chunks is None or len(example.chunks) == chunks
        assert task == "none" or example.answers
