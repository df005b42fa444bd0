"""`kill -9` of a real `chunkcache serve` while a document job and answers run: after a restart
the store and index open, nothing committed is lost or damaged, the interrupted job reads failed
(never done), and posting the documents again finishes the work."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import httpx

from chunkcache.codec import get_codec
from chunkcache.eval.load import served
from chunkcache.retriever import ChunkIndex
from chunkcache.retriever.fusion import MODES
from chunkcache.store import LmdbStore
from tests.conftest import free_port

DOCS = [{"id": f"place-{i}", "text": f"Place {i} lies on the river Vela. " + " ".join(
    f"Its street {j} was paved in {1800 + i + j}." for j in range(20))} for i in range(48)]


def _answers(url: str, stop: threading.Event, statuses: list[int]) -> None:
    body = {"query": "When was street 3 paved?", "documents": DOCS[:2], "max_tokens": 8}
    while not stop.is_set():
        try:
            statuses.append(httpx.post(f"{url}/v1/rag/answer", json=body, timeout=60).status_code)
        except httpx.HTTPError:
            return  # the server is gone


def test_kill_9_mid_job_loses_nothing_committed_and_the_job_reads_failed(
        tiny_dirs: dict[str, Path], tmp_path: Path, embedder) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["--index", str(tmp_path / "index"), "--allow-unchecked-model"]
    env = dict(os.environ)
    statuses: list[int] = []
    stop = threading.Event()
    with served(tmp_path, port, str(tiny_dirs["llama"]), env, args) as server:
        answering = threading.Thread(target=_answers, args=(url, stop, statuses), daemon=True)
        answering.start()
        posted = httpx.post(f"{url}/v1/documents", json={"documents": DOCS}, timeout=30)
        assert posted.status_code == 202, posted.text
        job_id = posted.json()["id"]
        deadline = time.monotonic() + 120
        while (job := httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json())["status"] != "done":
            if job["status"] == "running" and (job["result"] or {}).get("added", 0) >= 8 and len(statuses) >= 2:
                break
            assert time.monotonic() < deadline and job["status"] in ("queued", "running"), job
            time.sleep(0.02)
        server.kill()
        server.wait()
        stop.set()
        answering.join(60)
    assert job["status"] == "running", "the job finished before the kill: give it more documents"
    assert statuses and set(statuses) == {200}  # answers came while the job ran
    store = LmdbStore(tmp_path / "store", get_codec("raw"))
    committed = set(store.keys())
    store.close()
    assert committed
    with ChunkIndex.load(tmp_path / "index", embedder) as index:  # dense and lexical in step after the kill
        counts = index.manifest["counts"]
        assert counts["chunks"] == counts["vectors"] == counts["lexical"] == len(index) > 0
        indexed = set(index.documents())
        assert indexed and all(h.doc_id in indexed for mode in MODES for h in index.search("street 5", 10, mode))

    with served(tmp_path, port, str(tiny_dirs["llama"]), env, args):
        after = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
        assert after["status"] == "failed" and "server stopped" in after["error"], after
        assert after["result"]["added"] >= job["result"]["added"]  # its last recorded progress
        again = httpx.post(f"{url}/v1/documents", json={"documents": DOCS}, timeout=30).json()
        deadline = time.monotonic() + 120
        while (redo := httpx.get(f"{url}/v1/jobs/{again['id']}", timeout=10).json())["status"] != "done":
            assert time.monotonic() < deadline and redo["status"] in ("queued", "running"), redo
            time.sleep(0.1)
        result = redo["result"]
        assert result["unchanged"] >= job["result"]["added"] and result["added"] + result["unchanged"] == len(DOCS)
        found = httpx.post(f"{url}/v1/retrieve", json={"query": "street 5 of place 63", "top_k": 3}, timeout=30)
        assert found.status_code == 200 and found.json()["results"], found.text
    store = LmdbStore(tmp_path / "store", get_codec("raw"))
    try:
        assert committed <= set(store.keys())  # nothing committed before the kill was lost
        assert all(store.get(key) is not None for key in committed) and store.corrupt_entries == 0
    finally:
        store.close()
