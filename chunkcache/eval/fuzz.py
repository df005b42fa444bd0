"""`chunkcache bench fuzz`: schemathesis over the OpenAPI schema a real `chunkcache serve` serves,
with every check it has (no 5xx, status codes, content types and response bodies as the schema
says, schema-invalid requests refused, schema-valid ones accepted, stateful links). The server
runs with small limits (2 new tokens, 4 documents of 2,000 characters) so that thousands of
generated requests finish in minutes; its index holds two documents so retrieval has something
to find. The report: cases generated, failures per check, the schemathesis version."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

from chunkcache.errors import ChunkCacheError
from chunkcache.eval.load import served
from chunkcache.eval.services import free_port

# --cases sets schemathesis' --max-examples per operation (of the served schema's 9); its phases
# (coverage, fuzzing, stateful) stop early where the schema offers few distinct inputs, so the
# count generated is reported, not promised (1,514 for 2000 / 27 per operation and phase).
OPERATIONS = 9
LIMITS = {"CHUNKCACHE_MAX_NEW_TOKENS": "2", "CHUNKCACHE_MAX_TOKENS_LIMIT": "4", "CHUNKCACHE_MAX_DOCUMENTS": "4",
          "CHUNKCACHE_MAX_DOCUMENT_CHARS": "2000", "CHUNKCACHE_CHUNK_PRIMER": "none", "CHUNKCACHE_WARM_UP": "false"}
# Refusals the service states in its schema (every operation lists them): 413 for a body, a
# document list or a document over the server's limits, beside the usual 4xx.
CONFIG = """[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "429"]
"""
SEED_DOCUMENTS = [{"id": "mill", "text": "The old mill of Tarnow was built in 1820 on the river Vela."},
                  {"id": "bridge", "text": "The stone bridge of Tarnow was finished in 1846 by Ilse Marr."}]


def run_fuzz(model: str | None = None, cases: int = 2000, seed: int = 7, checks: str = "all",
             workers: int = 1, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Serve, seed the index, run schemathesis, stop; the report as a dict."""
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    if st is None:
        raise ChunkCacheError("bench fuzz needs schemathesis: pip install -e '.[test]'")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    per_phase = max(1, -(-cases // OPERATIONS))
    with tempfile.TemporaryDirectory(prefix="chunkcache-fuzz-") as tmp:
        scratch = Path(tmp)
        env = {**os.environ, **LIMITS, **(extra_env or {})}
        config = scratch / "schemathesis.toml"
        config.write_text(CONFIG)
        report_path = scratch / "report.json"
        with served(scratch, port, model, env, ["--index", str(scratch / "index"), "--allow-unchecked-model"]):
            _seed_index(url)
            started = time.monotonic()
            run = subprocess.run(
                [st, "--config-file", str(config), "run", f"{url}/openapi.json", "--checks", checks,
                 "--max-examples", str(per_phase), "--seed", str(seed), "--workers", str(workers),
                 "--request-timeout", "120", "--no-shrink", "--warnings", "off",
                 "--report", "json", "--report-json-path", str(report_path)],
                capture_output=True, text=True, cwd=scratch,
            )
            seconds = time.monotonic() - started
        if not report_path.exists():
            raise ChunkCacheError(f"schemathesis did not run (exit {run.returncode}): {run.stderr[-2000:]}")
        summary = json.loads(report_path.read_text())
    return {
        "schemathesis": metadata.version("schemathesis"), "checks": checks, "seed": seed,
        "max_examples_per_phase": per_phase, "seconds": round(seconds, 1), "exit_code": run.returncode,
        "operations": summary.get("operations", {}), "test_cases": summary.get("test_cases", {}),
        "failures": summary.get("failures", {}), "output": run.stdout,
    }


def _seed_index(url: str) -> None:
    job = httpx.post(f"{url}/v1/documents", json={"documents": SEED_DOCUMENTS}, timeout=120).json()
    deadline = time.monotonic() + 300
    while job.get("status") not in ("done", "failed") and time.monotonic() < deadline:
        time.sleep(0.2)
        job = httpx.get(f"{url}/v1/jobs/{job['id']}", timeout=30).json()
    if job.get("status") != "done":
        raise ChunkCacheError(f"seeding the fuzzed server's index failed: {job}")


def format_table(report: dict[str, Any]) -> str:
    cases = report["test_cases"]
    lines = [
        f"schemathesis {report['schemathesis']}, checks: {report['checks']}, seed {report['seed']}, "
        f"{report['seconds']} s",
        "| operations tested | cases generated | cases with failures |",
        "|---:|---:|---:|",
        f"| {report['operations'].get('tested', '?')}/{report['operations'].get('total', '?')} "
        f"| {cases.get('generated', '?')} | {cases.get('with_failures', '?')} |",
    ]
    failures = report.get("failures") or {}
    if failures:
        lines += ["", "| failure | count |", "|---|---:|"]
        lines += [f"| {name} | {count} |" for name, count in sorted(failures.items())] if isinstance(failures, dict) \
            else [f"| {failures} | |"]
    return "\n".join(lines)
