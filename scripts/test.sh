#!/usr/bin/env bash
# The test command: creates .venv, installs runwatch with its test extras, runs linters and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/ruff format --check runtime monitor tests
.venv/bin/ruff check runtime monitor tests
.venv/bin/mypy
# The AG-UI tests need the npm client from tests/agui's lockfile (skipped without node).
if command -v npm >/dev/null 2>&1 && [ ! -d tests/agui/node_modules ]; then
  (cd tests/agui && npm ci --no-audit --no-fund)
fi
exec .venv/bin/python -m pytest "$@"
