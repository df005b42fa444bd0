"""`chunkcache bench cluster`: two `chunkcache serve` processes over one corpus.

Both servers open one index directory and share one remote tier (redis or Mooncake Store,
started here on loopback); each keeps its own cpu and disk tiers. Documents go to server A
(`POST /v1/documents`, precomputed there); questions go to server B, which should find every
chunk in the shared tier and prefill none, and answer as A does. Then the shared service stops
in the middle of the run: B keeps answering (computing what it misses) and, once the service
is back, reads and writes it again. Reported per phase: chunk hit rate and the tiers that
served, B's TTFT beside a full prefill on B, bytes B read from the shared tier."""

from __future__ import annotations

import os
import re
from collections import Counter
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from chunkcache.eval.datasets import load_examples
from chunkcache.eval.load import _wait_healthy
from chunkcache.eval.services import free_port, start_service, stop_process
from chunkcache.store.remote import RETRY_S


def _server(name: str, scratch: Path, index: Path, remote_url: str, model: str | None) -> tuple[str, Any, Any]:
    port = free_port()
    env = {**os.environ, "CHUNKCACHE_STORE_PATH": str(scratch / f"store-{name}"),
           "CHUNKCACHE_REMOTE_URL": remote_url, "CHUNKCACHE_STORE_TIERS": "cpu,disk,remote",
           "CHUNKCACHE_REMOTE_TIMEOUT_S": "1.0"}
    cmd = [sys.executable, "-m", "chunkcache.cli", "serve", "--port", str(port), "--index", str(index),
           "--log-level", "warning"] + (["--model", model] if model else [])
    log = (scratch / f"server-{name}.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    url = f"http://127.0.0.1:{port}"
    _wait_healthy(url, proc, scratch / f"server-{name}.log")
    return url, proc, log


def _ask(client: httpx.Client, url: str, question: str, strategy: str | None, max_tokens: int, top_k: int) -> dict:
    body: dict[str, Any] = {"query": question, "max_tokens": max_tokens, "top_k": top_k}
    if strategy:
        body["strategy"] = strategy
    answer = client.post(f"{url}/v1/rag/answer", json=body, timeout=600)
    answer.raise_for_status()
    return answer.json()


def _remote_bytes(client: httpx.Client, url: str, direction: str) -> float:
    """Entry bytes the server at ``url`` has read or written from / to the shared tier."""
    text = client.get(f"{url}/metrics", timeout=60).text
    found = re.search(rf'^chunkcache_store_{direction}_bytes_total\{{tier="remote"\}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def _ingest(client: httpx.Client, url: str, documents: list[dict[str, str]]) -> dict[str, Any]:
    started = time.monotonic()
    job = client.post(f"{url}/v1/documents", json={"documents": documents, "precompute": True}, timeout=60).json()
    while job["status"] in ("queued", "running"):
        time.sleep(0.5)
        job = client.get(f"{url}/v1/jobs/{job['id']}", timeout=60).json()
    if job["status"] != "done":
        raise RuntimeError(f"ingest on {url} failed: {job.get('error')}")
    return {**(job["result"] or {}), "seconds": time.monotonic() - started}


def _phase(client: httpx.Client, url: str, questions: list[str], max_tokens: int, top_k: int,
           full: bool) -> dict[str, Any]:
    rows = []
    for q in questions:
        got = _ask(client, url, q, None, max_tokens, top_k)
        row = {"question": q, "answer": got["answer"], "ttft_s": got["timings"]["ttft_s"],
               "hits": got["cache"]["hit_chunks"], "misses": got["cache"]["miss_chunks"],
               "tier_hits": got["cache"]["tier_hits"]}
        if full:
            row["full_ttft_s"] = _ask(client, url, q, "full", max_tokens, top_k)["timings"]["ttft_s"]
        rows.append(row)
    hits, misses = sum(r["hits"] for r in rows), sum(r["misses"] for r in rows)
    tiers: Counter[str] = Counter()
    for r in rows:
        tiers.update(r["tier_hits"])
    out: dict[str, Any] = {"questions": len(rows), "chunk_hits": hits, "chunk_misses": misses,
                           "hit_rate": hits / max(hits + misses, 1), "tier_hits": dict(tiers),
                           "ttft_p50_s": statistics.median(r["ttft_s"] for r in rows), "rows": rows}
    if full:
        out["full_ttft_p50_s"] = statistics.median(r["full_ttft_s"] for r in rows)
        out["speedup_vs_full"] = statistics.median(r["full_ttft_s"] / r["ttft_s"] for r in rows)
    return out


def run_cluster(backend: str, dataset: Path, model: str | None = None, examples: int = 6, passages: int = 4,
                max_tokens: int = 8, top_k: int = 3) -> dict[str, Any]:
    """The whole run (module docstring), as a dict."""
    chosen = load_examples(dataset, examples, passages)
    if len(chosen) < 3:
        raise ValueError(f"bench cluster needs at least 3 examples, {dataset} has {len(chosen)}")
    documents = [[{"id": f"ex{i}-p{j}", "text": text} for j, text in enumerate(ex.chunks)] for i, ex in enumerate(chosen)]
    # three groups of examples: asked with the shared tier up / down / back (the last ingested
    # on A only after the service is back, so B can only have them from it)
    n = len(chosen)
    groups = [range(0, n // 3), range(n // 3, 2 * n // 3), range(2 * n // 3, n)]

    def docs_of(group: range) -> list[dict[str, str]]:
        return [d for i in group for d in documents[i]]

    def asks_of(group: range) -> list[str]:
        return [chosen[i].question for i in group]

    report: dict[str, Any] = {"backend": backend, "dataset": str(dataset), "examples": len(chosen),
                              "documents": sum(len(d) for d in documents), "model": model or "default",
                              "top_k": top_k, "max_tokens": max_tokens}
    with tempfile.TemporaryDirectory(prefix="chunkcache-cluster-") as tmp:
        scratch = Path(tmp)
        (scratch / "service").mkdir()
        service = start_service(backend, scratch / "service")
        procs = []
        try:
            a_url, *a = _server("a", scratch, scratch / "index", service.url, model)
            procs.append(a)
            b_url, *b = _server("b", scratch, scratch / "index", service.url, model)
            procs.append(b)
            with httpx.Client() as client:
                report["ingest_on_a"] = _ingest(client, a_url, docs_of(groups[0]) + docs_of(groups[1]))
                report["a_written_bytes"] = _remote_bytes(client, a_url, "written")
                # B's chunk caches can only come from the shared tier
                report["b_shared"] = _phase(client, b_url, asks_of(groups[0]), max_tokens, top_k, full=True)
                report["b_shared"]["remote_read_bytes"] = _remote_bytes(client, b_url, "read")
                on_a = [_ask(client, a_url, q, None, max_tokens, top_k)["answer"] for q in asks_of(groups[0])]
                report["answers_identical_a_b"] = on_a == [r["answer"] for r in report["b_shared"]["rows"]]
                service.stop()
                report["b_service_down"] = _phase(client, b_url, asks_of(groups[1]), max_tokens, top_k, full=False)
                service.start()
                time.sleep(RETRY_S + 1)  # the tiers skip a service that failed for retry_s, then try again
                report["ingest_on_a_after_restart"] = _ingest(client, a_url, docs_of(groups[2]))
                read_before = _remote_bytes(client, b_url, "read")
                report["b_service_back"] = _phase(client, b_url, asks_of(groups[2]), max_tokens, top_k, full=False)
                report["b_service_back"]["remote_read_bytes"] = _remote_bytes(client, b_url, "read") - read_before
                report["remote_tier_metrics"] = {
                    name: [line for line in client.get(f"{url}/metrics", timeout=60).text.splitlines()
                           if 'tier="remote"' in line and not line.startswith("#")]
                    for name, url in (("a", a_url), ("b", b_url))}
        finally:
            for proc, log in procs:
                stop_process(proc)
                log.close()
            service.close()
    return report


def format_table(report: dict[str, Any]) -> str:
    lines = [f"backend {report['backend']}: {report['documents']} passages of {report['examples']} examples ingested "
             f"on A ({report['ingest_on_a'].get('chunks_precomputed', 0)} + "
             f"{report['ingest_on_a_after_restart'].get('chunks_precomputed', 0)} chunks precomputed there, "
             f"{report['a_written_bytes'] / 1e6:.1f} MB written to the shared tier); questions to B",
             f"{'phase':<22}{'questions':>10}{'hit rate':>10}{'misses':>8}  tiers that served        TTFT p50    vs full"]
    for key, label in (("b_shared", "shared tier up"), ("b_service_down", "shared tier down"),
                       ("b_service_back", "shared tier back")):
        p = report[key]
        tiers = ", ".join(f"{t} {n}" for t, n in sorted(p["tier_hits"].items())) or "-"
        full = f"{p['speedup_vs_full']:.2f}x" if "speedup_vs_full" in p else "-"
        lines.append(f"{label:<22}{p['questions']:>10}{p['hit_rate']:>10.2f}{p['chunk_misses']:>8}  {tiers:<24}"
                     f"{p['ttft_p50_s'] * 1000:>8.0f} ms{full:>9}")
    lines.append(f"answers on B identical to A's: {report['answers_identical_a_b']}; "
                 f"bytes B read from the shared tier: {report['b_shared']['remote_read_bytes'] / 1e6:.1f} MB "
                 f"(tier up), {report['b_service_back']['remote_read_bytes'] / 1e6:.1f} MB (back)")
    return "\n".join(lines)
