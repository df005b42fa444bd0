"""`chunkcache bench load`: start `chunkcache serve` as its own process on a loopback port, then
run N concurrent streaming chat clients for a fixed time against it (passages of the bundled
MuSiQue sample, recurring across requests as in RAG). Reports status codes, TTFT and end-to-end
latency percentiles, and the server's resident memory after warm-up vs at the end. Warm-up lasts
at least ``warmup_s`` and until twice as many requests as clients have finished."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import httpx

from chunkcache.eval.services import free_port, stop_process

from chunkcache.store.policy import quantile


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _requests(passage_words: int, per_request: int) -> list[dict[str, Any]]:
    """Request bodies from the bundled examples: each question with ``per_request`` of its
    passages cut to ``passage_words`` words."""
    data = json.loads(resources.files("chunkcache").joinpath("data/demo.json").read_text(encoding="utf-8"))
    bodies = []
    for example in data["examples"]:
        passages = [" ".join(p.split()[:passage_words]) for p in example["chunks"]]
        for start in range(0, len(passages) - per_request + 1, per_request):
            bodies.append({"question": example["question"], "documents": passages[start : start + per_request]})
    return bodies


async def _client(url: str, bodies: list[dict[str, Any]], until: list[float], max_tokens: int, seed: int,
                  out: list[dict[str, Any]], headers: dict[str, str]) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=300, headers=headers) as client:
        while time.monotonic() < until[0]:
            body = rng.choice(bodies)
            payload = {"messages": [{"role": "user", "content": body["question"]}], "max_tokens": max_tokens,
                       "stream": True, "documents": [{"text": t} for t in body["documents"]]}
            start = time.monotonic()
            ttft = None
            try:
                async with client.stream("POST", "/v1/chat/completions", json=payload) as response:
                    async for line in response.aiter_lines():
                        if ttft is None and line.startswith("data: ") and '"content":"' in line \
                                and '"content":""' not in line:
                            ttft = time.monotonic() - start
                    status = response.status_code
            except httpx.HTTPError as exc:
                status = f"error: {type(exc).__name__}"
            out.append({"status": status, "ttft_s": ttft, "total_s": time.monotonic() - start, "at": start})


def run_load(model: str | None = None, clients: int = 16, duration_s: float = 60.0, warmup_s: float = 15.0,
             max_tokens: int = 16, passage_words: int = 80, per_request: int = 3,
             extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Serve in a subprocess (scratch store), load it, stop it; the report as a dict."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    bodies = _requests(passage_words, per_request)
    with tempfile.TemporaryDirectory(prefix="chunkcache-load-") as scratch:
        env = {**os.environ, **(extra_env or {}), "CHUNKCACHE_MAX_QUEUE": str(max(clients * 2, 32))}
        with served(Path(scratch), port, model, env) as server:
            headers = {}
            key = env.get(env.get("CHUNKCACHE_API_KEY_ENV", "CHUNKCACHE_API_KEY"), "")
            if key:
                headers["Authorization"] = f"Bearer {key}"
            rows: list[dict[str, Any]] = []
            started = time.monotonic()
            rss: list[tuple[float, int]] = []

            warm = [math.inf]  # seconds from start when warm-up ended
            until = [math.inf]

            async def drive() -> None:
                tasks = [asyncio.create_task(_client(url, bodies, until, max_tokens, i, rows, headers))
                         for i in range(clients)]
                while not all(t.done() for t in tasks):
                    now = time.monotonic() - started
                    # warm: the time has passed and every client has finished a request or two
                    if warm[0] == math.inf and now >= warmup_s and (len(rows) >= 2 * clients or now >= warmup_s + 300):
                        warm[0], until[0] = now, started + now + duration_s
                    rss.append((now, _rss_bytes(server.pid)))
                    await asyncio.wait(tasks, timeout=1.0)
                await asyncio.gather(*tasks)

            asyncio.run(drive())
            rss.append((time.monotonic() - started, _rss_bytes(server.pid)))
            warmup_s = warm[0]
    return _report(rows, rss, started, warmup_s, clients, duration_s, max_tokens, per_request, passage_words)


@contextmanager
def served(scratch: Path, port: int, model: str | None, env: dict[str, str],
           args: Sequence[str] = ()) -> Iterator[subprocess.Popen[str]]:
    """`chunkcache serve` in a subprocess on ``port`` (store under ``scratch``), healthy, then
    stopped. Its log goes to ``scratch/server.log``: a pipe nobody reads would block the server."""
    cmd = [sys.executable, "-m", "chunkcache.cli", "serve", "--port", str(port), "--log-level", "warning", *args]
    if model:
        cmd += ["--model", model]
    env = {"CHUNKCACHE_STORE_PATH": str(scratch / "store"), **env}
    log_path = scratch / "server.log"
    with log_path.open("w") as log_file:
        server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log_file, text=True)
        try:
            _wait_healthy(f"http://127.0.0.1:{port}", server, log_path)
            yield server
        finally:
            stop_process(server)


def _wait_healthy(url: str, server: subprocess.Popen[str], log_path: Path) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"chunkcache serve exited with {server.returncode}: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("chunkcache serve did not become healthy in 300 s")


def _report(rows: list[dict[str, Any]], rss: list[tuple[float, int]], started: float, warmup_s: float,
            clients: int, duration_s: float, max_tokens: int, per_request: int, passage_words: int) -> dict[str, Any]:
    measured = [r for r in rows if r["at"] - started >= warmup_s]
    statuses = Counter(str(r["status"]) for r in measured)
    ttft = [r["ttft_s"] for r in measured if r["ttft_s"] is not None]
    total = [r["total_s"] for r in measured if r["status"] == 200]
    after_warmup = [b for t, b in rss if t >= warmup_s] or [rss[-1][1]]
    base = after_warmup[0]
    return {
        "clients": clients, "duration_s": duration_s, "warmup_s": warmup_s, "max_tokens": max_tokens,
        "documents_per_request": per_request, "words_per_document": passage_words,
        "requests": len(measured), "requests_per_s": len(measured) / duration_s,
        "status_counts": dict(statuses),
        "server_errors": sum(n for s, n in statuses.items() if s.startswith("5") or s.startswith("error")),
        "ttft_s": {"p50": _pct(ttft, 0.5), "p99": _pct(ttft, 0.99), "mean": statistics.fmean(ttft) if ttft else None},
        "total_s": {"p50": _pct(total, 0.5), "p99": _pct(total, 0.99)},
        "rss_bytes": {"after_warmup": base, "end": rss[-1][1], "max_after_warmup": max(after_warmup)},
        "rss_growth": (max(after_warmup) - base) / base if base else None,
        "per_minute": _per_minute(measured, rss, started, warmup_s),
    }


def _per_minute(rows: list[dict[str, Any]], rss: list[tuple[float, int]], started: float,
                warmup_s: float) -> list[dict[str, Any]]:
    """The measured time in minutes (by when each request started): requests, errors, TTFT and
    latency p50/p99, and the server's largest RSS in that minute; drift shows here."""
    minutes: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        minutes.setdefault(int((r["at"] - started - warmup_s) // 60), []).append(r)
    out = []
    for minute in sorted(minutes):
        got = minutes[minute]
        ttft = [r["ttft_s"] for r in got if r["ttft_s"] is not None]
        total = [r["total_s"] for r in got if r["status"] == 200]
        lo, hi = warmup_s + 60 * minute, warmup_s + 60 * (minute + 1)
        in_minute = [b for t, b in rss if lo <= t < hi]
        out.append({
            "minute": minute + 1, "requests": len(got),
            "errors": sum(1 for r in got if str(r["status"]) != "200"),
            "ttft_p50_s": _pct(ttft, 0.5), "ttft_p99_s": _pct(ttft, 0.99),
            "total_p50_s": _pct(total, 0.5), "total_p99_s": _pct(total, 0.99),
            "rss_max_bytes": max(in_minute) if in_minute else None,
        })
    return out


def _pct(values: list[float], q: float) -> float | None:
    return quantile(values, q) if values else None


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def minute_table(report: dict[str, Any]) -> str:
    """The per-minute rows as a markdown table."""
    lines = ["| minute | requests | errors | TTFT p50 s | TTFT p99 s | latency p50 s | latency p99 s | RSS max MiB |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in report.get("per_minute", []):
        rss = "-" if m["rss_max_bytes"] is None else f"{m['rss_max_bytes'] / 2**20:.0f}"
        lines.append(f"| {m['minute']} | {m['requests']} | {m['errors']} | {_f(m['ttft_p50_s'])} | {_f(m['ttft_p99_s'])} "
                     f"| {_f(m['total_p50_s'])} | {_f(m['total_p99_s'])} | {rss} |")
    return "\n".join(lines)


def format_table(report: dict[str, Any]) -> str:
    t, e, m = report["ttft_s"], report["total_s"], report["rss_bytes"]
    f = _f
    return "\n".join([
        f"load: {report['clients']} streaming clients for {report['duration_s']:.0f} s after "
        f"{report['warmup_s']:.0f} s of warm-up; {report['requests']} requests ({report['requests_per_s']:.2f}/s)",
        f"status codes: {report['status_counts']}; server errors: {report['server_errors']}",
        f"TTFT p50 {f(t['p50'])} s, p99 {f(t['p99'])} s; end to end p50 {f(e['p50'])} s, p99 {f(e['p99'])} s",
        f"server RSS after warm-up {m['after_warmup'] / 2**20:.0f} MiB, max after {m['max_after_warmup'] / 2**20:.0f} "
        f"MiB, end {m['end'] / 2**20:.0f} MiB (growth {report['rss_growth']:.1%})",
    ])


def compare_table(reports: list[dict[str, Any]]) -> str:
    """Runs side by side (one per ``max_batch``, or ``max_batch:fusion_workers``), each against the first."""
    base = reports[0]

    def ratio(a: float | None, b: float | None) -> str:
        return "-" if not a or not b else f"{a / b:.2f}x"

    lines = ["| max_batch | requests/s | vs first | TTFT p50 s | first / this | TTFT p99 s | errors | RSS growth |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in reports:
        t = r["ttft_s"]
        lines.append(
            f"| {_run_name(r)} | {r['requests_per_s']:.2f} | "
            f"{ratio(r['requests_per_s'], base['requests_per_s'])} | {t['p50'] or 0:.2f} | "
            f"{ratio(base['ttft_s']['p50'], t['p50'])} | {t['p99'] or 0:.2f} | {r['server_errors']} | "
            f"{r['rss_growth']:.1%} |"
        )
    return "\n".join(lines)


def _run_name(report: dict[str, Any]) -> str:
    name = str(report.get("max_batch") or "settings")
    workers = report.get("fusion_workers")
    return name if workers is None else f"{name}:{workers}"
