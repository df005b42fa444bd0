#!/usr/bin/env bash
# Set up (if needed) and run the test suite; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the tests also cover the optional extras (Ray backend, Mooncake tier, framework adapters): installed again
# whenever pyproject.toml changes
STAMP=.venv/.chunkcache-extras
WANT=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  .venv/bin/python -m pip --disable-pip-version-check -q install -e ".[test,eval,ray,mooncake,haystack,llama-index,langchain]"
  echo "$WANT" > "$STAMP"
fi
exec .venv/bin/python -m pytest -q "$@"
