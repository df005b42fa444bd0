"""Schemathesis against the generated OpenAPI schema of a real server (a tiny random-weight
model so that hundreds of generated requests run quickly): no generated request gets a 5xx."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chunkcache.api import RagService
from chunkcache.config import Settings
from chunkcache.retriever import ChunkIndex
from tests.api.conftest import running

pytest.importorskip("schemathesis")


def test_generated_requests_never_get_a_server_error(tiny_dirs: dict[str, Path], tmp_path: Path, embedder) -> None:  # type: ignore[no-untyped-def]
    settings = Settings.load(env={}, model=str(tiny_dirs["llama"]), store_path=tmp_path / "store", max_new_tokens=2,
                             max_tokens_limit=4, max_documents=4, max_document_chars=2000, chunk_primer="none")
    index = ChunkIndex.build(tmp_path / "index", embedder)
    service = RagService(settings, index=index)
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or "st"
    report = tmp_path / "report.json"
    with running(service) as url:
        run = subprocess.run(
            [st, "run", f"{url}/openapi.json", "--checks", "not_a_server_error", "--max-examples", "60",
             "--seed", "7", "--workers", "1", "--request-timeout", "60", "--no-shrink", "--warnings", "off",
             "--report", "json", "--report-json-path", str(report)],
            capture_output=True, text=True, timeout=900, cwd=tmp_path,
        )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    summary = json.loads(report.read_text())
    assert summary["test_cases"]["generated"] >= 500 and summary["test_cases"]["with_failures"] == 0
    assert summary["operations"]["tested"] == summary["operations"]["total"] >= 9
