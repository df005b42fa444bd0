"""ingest -> query end to end with the CLI: real files, the real embedder, faiss and SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

from tests.test_cli import chunkcache


def test_ingest_is_incremental_and_query_answers_with_sources(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "berlin.md").write_text("# Berlin\n\nBerlin is the capital of Germany. It has the Brandenburg gate.\n")
    (docs / "paris.txt").write_text("Paris is the capital of France. It has the Eiffel tower.\n")
    (docs / "pages.jsonl").write_text(json.dumps({"id": "rome", "body": "Rome is the capital of Italy."}) + "\n")
    index, store = tmp_path / "index", tmp_path / "store"
    first = chunkcache("ingest", str(docs), "--index", str(index), "--text-field", "body", store=store)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "3 added" in first.stdout
    again = chunkcache("ingest", str(docs), "--index", str(index), "--text-field", "body", store=store)
    assert "0 added, 0 updated, 3 unchanged" in again.stdout
    (docs / "paris.txt").write_text("Paris is the capital of France. It has the Louvre museum.\n")
    changed = chunkcache("ingest", str(docs), "--index", str(index), "--text-field", "body", store=store)
    assert "1 updated" in changed.stdout

    run = chunkcache("query", "Which city has the Brandenburg gate?", "--index", str(index), "--top-k", "2",
                     "--max-new-tokens", "8", "--json", store=store)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout)
    assert out["answer"] and len(out["sources"]) == 2
    assert "Brandenburg" in out["sources"][0]["text"]
    assert {"retrieve_s", "load_s", "blend_s", "ttft_s", "total_s"} <= set(out["timings"])

    gone = chunkcache("ingest", "--index", str(index), "--delete", out["sources"][0]["doc_id"], store=store)
    assert gone.returncode == 0 and "1 deleted" in gone.stdout
    after = json.loads(chunkcache("query", "Which city has the Brandenburg gate?", "--index", str(index),
                                  "--top-k", "2", "--max-new-tokens", "4", "--json", store=store).stdout)
    assert all("Brandenburg" not in s["text"] for s in after["sources"])
