#!/usr/bin/env bash
# The run command: creates .venv, installs runwatch, serves the chat page and the monitor.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
exec .venv/bin/runwatch serve "$@"
