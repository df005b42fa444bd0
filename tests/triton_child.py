"""Kernel tests on the CPU: Triton's interpreter is a per-process choice made before triton is
imported (`chunkcache.triton_jit`), so a test file's kernel tests run again in a child pytest
started with TRITON_INTERPRET=1 when neither the interpreter nor CUDA is active here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chunkcache.triton_jit import interpreter_active

ROOT = Path(__file__).resolve().parents[1]


def run_kernel_tests_in_child(test_file: str, select: str = "kernel and not under_interpreter") -> None:
    """Run ``test_file``'s tests matching ``select`` under the interpreter; every one must pass
    (a skip there is a failure: it would hide the kernels)."""
    pytest.importorskip("triton")
    if interpreter_active() or torch.cuda.is_available():
        pytest.skip("the kernel tests ran in this process")
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", select],
                           cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                           timeout=300)
    summary = child.stdout.strip().splitlines()[-1] if child.stdout.strip() else ""
    assert child.returncode == 0 and "passed" in summary and "skipped" not in summary, child.stdout[-4000:]


def kernel_device() -> str:
    """Where a kernel test runs: CUDA, or the CPU under the interpreter; else it skips (and
    `run_kernel_tests_in_child` runs it)."""
    if torch.cuda.is_available():
        return "cuda"
    if interpreter_active():
        return "cpu"
    pytest.skip("needs CUDA or Triton's interpreter (test_kernel_tests_under_interpreter runs it)")
