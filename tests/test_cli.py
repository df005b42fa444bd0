"""The ``chunkcache`` command as a user runs it: answers, JSON output, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

QUESTION = "Who wrote the play Emilia Galotti, and in which year was it first performed?"
CHUNKS = [
    "Emilia Galotti is a play in five acts by Gotthold Ephraim Lessing, first performed on 13 March 1772 in Braunschweig.",
    "Miss Sara Sampson is a domestic tragedy by Lessing, first performed in 1755 in Frankfurt an der Oder.",
    "Lessing was a German writer, philosopher, dramatist, publicist and art critic of the Enlightenment.",
]


def chunkcache(*args: str, store: Path) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("chunkcache")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "chunkcache.cli"]
    env = {**os.environ, "CHUNKCACHE_STORE_PATH": str(store)}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture()
def input_file(tmp_path: Path) -> Path:
    path = tmp_path / "in.json"
    path.write_text(json.dumps({"question": QUESTION, "chunks": CHUNKS}))
    return path


def answer_json(model: str, input_file: Path, store: Path, *extra: str) -> dict:
    """`chunkcache answer --json` in its own process (24 tokens at most, float32)."""
    out = chunkcache(
        "answer", "--model", model, "--input", str(input_file), "--dtype", "float32",
        "--max-new-tokens", "24", "--json", *extra, store=store,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.mark.parametrize("model", ["smollm2-135m", pytest.param("qwen2.5-0.5b", marks=pytest.mark.qwen)])
def test_cacheblend_at_ratio_one_prints_the_full_prefill_answer(model: str, input_file: Path, store_path: Path) -> None:
    full = answer_json(model, input_file, store_path, "--strategy", "full")
    blend = answer_json(model, input_file, store_path, "--strategy", "cacheblend", "--recompute-ratio", "1.0")
    assert full["text"] and blend["text"] == full["text"]
    assert blend["token_ids"] == full["token_ids"]
    for answer in (full, blend):
        assert {"text", "ttft_s", "timings", "prompt_tokens", "reused_tokens", "recomputed_tokens", "strategy"} <= set(answer)
    assert blend["strategy"] == "cacheblend" and blend["params"]["recompute_ratio"] == 1.0
    # reuse from the store through the CLI: tests/api/test_openai.py, with a spec from a flag and YAML


@pytest.mark.parametrize(
    ("payload", "args", "message"),
    [
        ({"question": "", "chunks": CHUNKS}, [], "question is empty"),
        ({"question": QUESTION, "chunks": []}, [], "no chunks"),
        ({"question": QUESTION, "chunks": ["a", ""]}, [], "chunk 1 is empty"),
        ({"question": QUESTION, "chunks": ["word " * 9000]}, [], "past the model's context"),
        ({"question": QUESTION}, [], "must be a JSON object"),
        ({"question": QUESTION, "chunks": CHUNKS}, ["--model", "gpt-17"], "unknown model 'gpt-17'"),
        ({"question": QUESTION, "chunks": CHUNKS}, ["--strategy", "full", "--recompute-ratio", "0.2"],
         "strategy 'full' has no parameter recompute_ratio"),
        ({"question": QUESTION, "chunks": CHUNKS}, ["--strategy", "cacheblend:0.2:spred=1"], "has no parameter spred"),
    ],
)
def test_bad_input_is_one_line_on_stderr(payload: dict, args: list[str], message: str, tmp_path: Path) -> None:
    path = tmp_path / "in.json"
    path.write_text(json.dumps(payload))
    out = chunkcache("answer", "--input", str(path), *args, store=tmp_path / "store")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("chunkcache: error:")]
    assert len(lines) == 1 and message in lines[0], out.stderr[-2000:]


def test_missing_input_file_and_unknown_strategy(tmp_path: Path) -> None:
    out = chunkcache("answer", "--input", str(tmp_path / "nope.json"), store=tmp_path / "s")
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr
    out = chunkcache("answer", "--input", "x", "--strategy", "magic", store=tmp_path / "s")
    assert out.returncode == 2 and "unknown strategy 'magic'" in out.stderr and "Traceback" not in out.stderr


def test_strategies_lists_every_strategy_with_its_parameters(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("strategy: cacheblend:0.3\nrecompute_ratio: 0.2\n")
    out = chunkcache("strategies", "--config", str(config), store=tmp_path)
    assert out.returncode == 0, out.stderr
    for line in ("cacheblend  (cacheblend:VALUE sets recompute_ratio)", "    spread_v = 0.25", "    recompute_ratio = 0.2",
                 "epic  (epic:VALUE sets epic_k)", "cachecraft", "default strategy (Settings.strategy): cacheblend:0.3"):
        assert line in out.stdout, out.stdout


def test_help_lists_the_commands(tmp_path: Path) -> None:
    out = chunkcache("--help", store=tmp_path)
    assert out.returncode == 0 and "answer" in out.stdout and "demo" in out.stdout
