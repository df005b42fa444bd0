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

    assert out["sources"][0]["doc_id"].startswith("berlin.md@") and str(tmp_path) not in run.stdout  # no server paths
    gone = chunkcache("ingest", "--index", str(index), "--delete", str(docs / "berlin.md"), store=store)  # by its path
    assert gone.returncode == 0 and "1 deleted" in gone.stdout, gone.stderr[-2000:]
    after = json.loads(chunkcache("query", "Which city has the Brandenburg gate?", "--index", str(index),
                                  "--top-k", "2", "--max-new-tokens", "4", "--json", store=store).stdout)
    assert all("Brandenburg" not in s["text"] for s in after["sources"])


def test_precompute_is_resumable_after_kill_9(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    from chunkcache.codec import get_codec
    from chunkcache.store import LmdbStore

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(8):
        (docs / f"d{i}.txt").write_text(f"Document {i}. " + " ".join(f"Fact {j} about item {i}." for j in range(30)))
    index, store = tmp_path / "index", tmp_path / "store"
    assert chunkcache("ingest", str(docs), "--index", str(index), "--chunk-tokens", "64", "--overlap", "0",
                      store=store).returncode == 0
    script = Path(sys.executable).with_name("chunkcache")
    env = {**__import__("os").environ, "CHUNKCACHE_STORE_PATH": str(store)}
    proc = subprocess.Popen([str(script), "precompute", "--index", str(index), "--batch", "1", "--quiet"], env=env)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            if store.exists() and len(LmdbStore(store, get_codec("raw"))) >= 4:  # head, primer, 2 chunks
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    rerun = chunkcache("precompute", "--index", str(index), "--quiet", "--json", "--bare-every", "1", store=store)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["skipped"] >= 1 and summary["skipped"] + summary["computed"] == summary["chunks"]
    assert summary["bare_tokens_per_s"] > 0  # asked for
    final = json.loads(chunkcache("precompute", "--index", str(index), "--quiet", "--json",
                                  store=store).stdout.strip().splitlines()[-1])
    assert final["computed"] == 0 and final["skipped"] == final["chunks"]  # idempotent


def test_demo_runs_the_retrieval_path_and_reuses_its_work(tmp_path: Path) -> None:
    args = ("demo", "--limit", "1", "--max-new-tokens", "8", "--index", str(tmp_path / "demo-index"))
    first = chunkcache(*args, store=tmp_path / "store")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "sources: demo/q1-" in first.stdout and "TTFT speed-up of cacheblend" in first.stdout
    second = chunkcache(*args, store=tmp_path / "store")
    assert "precompute: 0 chunk caches computed" in second.stdout and "0 documents added" in second.stdout
