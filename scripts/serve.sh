#!/usr/bin/env bash
# The run command: creates .venv, installs runwatch when needed, serves the chat page and monitor.
# Options go to `runwatch serve` (e.g. --port 9000); RUNWATCH_* variables configure it.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# Install only when pyproject.toml changed since the last install (or runwatch is missing).
stamp=.venv/.runwatch-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -x .venv/bin/runwatch ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "runwatch: installing into .venv (once; again only when pyproject.toml changes)…"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e .
  echo "$want" > "$stamp"
fi

host=127.0.0.1
port=8000
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --host) host="${args[i + 1]:-$host}" ;;
    --host=*) host="${args[i]#--host=}" ;;
    --port) port="${args[i + 1]:-$port}" ;;
    --port=*) port="${args[i]#--port=}" ;;
  esac
done
url="http://${host}:${port}"
[[ "$host" == *:* ]] && url="http://[${host}]:${port}"
cat <<BANNER

  runwatch $(.venv/bin/runwatch --version | cut -d' ' -f2)
    chat      ${url}/
    monitor   ${url}/monitor
    API docs  ${url}/api/docs
    metrics   ${url}/metrics
  Stop with Ctrl+C (running answers get RUNWATCH_DRAIN_S to finish).

BANNER
exec .venv/bin/runwatch serve "$@"
