"""The disk tier's volume full, in a real `chunkcache answer` process: its writes past the limit
fail (the process may write no file beyond a size, RLIMIT_FSIZE: what a full volume does to
lmdb, without needing root to mount a small one), one warning says so, the answer is the one a
roomy disk gives, and every entry that was written still decodes."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

from chunkcache.codec import get_codec
from chunkcache.store import LmdbStore

CHUNKS = [f"Chapter {i}. " + " ".join(f"The harbour of town {i} shipped {j * 7} tons of salt in {1700 + j}."
                                      for j in range(12)) for i in range(8)]


def _answer(model: Path, store: Path, question: Path, file_limit: int | None) -> subprocess.CompletedProcess[str]:
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))  # type: ignore[arg-type]

    cmd = [sys.executable, "-m", "chunkcache.cli", "answer", "--model", str(model), "--store", str(store),
           "--input", str(question), "--max-new-tokens", "8", "--json"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "CHUNKCACHE_CODEC": "raw"},
                          preexec_fn=limit if file_limit is not None else None)


def test_a_full_disk_fails_writes_with_one_warning_and_answers_go_on(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    question = tmp_path / "q.json"
    question.write_text(json.dumps({"question": "How much salt did town 3 ship?", "chunks": CHUNKS}))
    roomy = _answer(tiny_dirs["llama"], tmp_path / "roomy", question, None)
    assert roomy.returncode == 0, roomy.stderr[-2000:]
    full_size = (tmp_path / "roomy" / "data.mdb").stat().st_size
    full = _answer(tiny_dirs["llama"], tmp_path / "full", question, full_size // 3)
    assert full.returncode == 0, full.stderr[-2000:]
    assert json.loads(full.stdout)["text"] == json.loads(roomy.stdout)["text"]
    warnings = [line for line in full.stderr.splitlines() if "disk cache write failed" in line]
    assert len(warnings) == 1 and "free space" in warnings[0], full.stderr[-2000:]
    store = LmdbStore(tmp_path / "full", get_codec("raw"))
    try:
        kept = list(store.keys())
        assert 0 < len(kept) < len(CHUNKS) + 2  # some writes made it, not all (head and primer are two more)
        assert all(store.get(key) is not None for key in kept) and store.corrupt_entries == 0
    finally:
        store.close()
