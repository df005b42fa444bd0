#!/usr/bin/env bash
# Set up (if needed) and run the test suite; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the tests also cover the optional Ray backend of precompute
.venv/bin/python -c "import ray" 2>/dev/null || .venv/bin/python -m pip --disable-pip-version-check -q install -e ".[test,ray]"
exec .venv/bin/python -m pytest -q "$@"
