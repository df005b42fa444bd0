"""ingest -> query end to end with the CLI: real files, the real embedder, faiss and SmolLM2."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

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


@pytest.fixture(scope="module")
def tiny_index(tiny_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 documents of about 5 chunks each, ingested for the tiny model."""
    root = tmp_path_factory.mktemp("kill9")
    docs = root / "docs"
    docs.mkdir()
    for i in range(40):
        (docs / f"d{i}.txt").write_text(f"Document {i}. " + " ".join(f"Fact {j} about item {i}." for j in range(30)))
    ingest = chunkcache("ingest", str(docs), "--index", str(root / "index"), "--model", str(tiny_dirs["llama"]),
                        "--chunk-tokens", "64", "--overlap", "0", store=root / "store")
    assert ingest.returncode == 0, ingest.stderr[-2000:]
    return root / "index"


@pytest.mark.parametrize("seed", [0, *(pytest.param(s, marks=pytest.mark.slow) for s in (1, 2, 3))])
def test_precompute_killed_at_a_random_point_resumes_without_recomputing(
        seed: int, tiny_dirs: dict[str, Path], tiny_index: Path, tmp_path: Path) -> None:
    import random
    import shutil
    import signal
    import subprocess
    import time

    from chunkcache.codec import get_codec
    from chunkcache.store import LmdbStore

    model = str(tiny_dirs["llama"])
    index, store = tmp_path / "index", tmp_path / "store"
    shutil.copytree(tiny_index, index)
    kill_at = random.Random(seed).randrange(3, 60)  # entries in the store (head and primer first)
    script = Path(sys.executable).with_name("chunkcache")
    env = {**os.environ, "CHUNKCACHE_STORE_PATH": str(store)}
    proc = subprocess.Popen([str(script), "precompute", "--index", str(index), "--model", model, "--batch", "1",
                             "--quiet"], env=env)
    try:
        while proc.poll() is None and not (store.exists() and len(LmdbStore(store, get_codec("raw"))) >= kill_at):
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "precompute finished before the kill: give it more chunks"
    before = LmdbStore(store, get_codec("raw"))
    written = {i.key: i.last_access for i in before.infos()}  # the write time, until a read
    before.close()
    rerun = chunkcache("precompute", "--index", str(index), "--model", model, "--quiet", "--json",
                       *(["--bare-every", "1"] if seed == 0 else []), store=store)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["skipped"] >= 1 and summary["skipped"] + summary["computed"] == summary["chunks"]
    if seed == 0:
        assert summary["bare_tokens_per_s"] > 0  # asked for
    after = LmdbStore(store, get_codec("raw"))
    try:
        infos = {i.key: i for i in after.infos()}
        # a write sets the time and zeroes the hits; a read (head, primer) sets the time and counts a hit
        rewritten = [k for k, when in written.items() if infos[k].last_access != when and infos[k].hits == 0]
        assert written.keys() <= infos.keys() and rewritten == []  # nothing committed was lost or computed again
        assert all(after.get(key) is not None for key in infos) and after.corrupt_entries == 0
    finally:
        after.close()
    final = json.loads(chunkcache("precompute", "--index", str(index), "--model", model, "--quiet", "--json",
                                  store=store).stdout.strip().splitlines()[-1])
    assert final["computed"] == 0 and final["skipped"] == final["chunks"] == summary["chunks"]  # index and store agree


def test_demo_runs_the_retrieval_path_and_reuses_its_work(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    # the tiny model: this is about the path (SmolLM2's demo, the README's, took 77 s a run here)
    args = ("demo", "--limit", "1", "--max-new-tokens", "8", "--index", str(tmp_path / "demo-index"),
            "--model", str(tiny_dirs["llama"]))
    first = chunkcache(*args, store=tmp_path / "store")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "sources: demo/q1-" in first.stdout and "TTFT speed-up of cacheblend" in first.stdout
    second = chunkcache(*args, store=tmp_path / "store")
    assert "precompute: 0 chunk caches computed" in second.stdout and "0 documents added" in second.stdout
