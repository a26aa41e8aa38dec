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
exec .venv/bin/python -m pytest "$@"
