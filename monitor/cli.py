"""The monitor's part of the ``runwatch`` command, registered through the ``runwatch.cli``
entry point group (pyproject.toml): the verbs ``monitor`` (the monitor alone) and ``check``
(:mod:`monitor.report`), and the monitor inside ``runwatch serve``.

Kept light: the web app, the checker and the store are imported only when a verb runs, so
``runwatch token`` does not pay for them.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from runtime.cli import (
    Command,
    Extension,
    existing_store,
    parse_duration,
    serve_app,
    server_args,
    store_name,
)
from runtime.config import Settings

__all__ = ["EXTENSION"]


def _monitor(args: argparse.Namespace) -> int:
    from .service import create_monitor_app

    return serve_app(args, create_monitor_app)


def _check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--since", type=parse_duration, default="1h", help="runs created this long ago or later"
    )
    p.add_argument("--run", default=None, help="judge one run id only")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _check(args: argparse.Namespace) -> int:
    from .report import run_check

    settings = Settings.from_env()
    missing = existing_store(settings)
    if missing:
        print(missing, file=sys.stderr)
        return 2
    print(f"runwatch: checking {store_name(settings.database_url)}", file=sys.stderr)
    return run_check(settings, since_s=args.since, run_id=args.run, as_json=args.json)


def _attach(app: Any, runtime: Any) -> None:
    from .service import attach_monitor

    attach_monitor(app, runtime)


EXTENSION = Extension(
    commands=(
        Command(
            "monitor",
            "the monitor alone (production)",
            "The monitor UI at /monitor, its API under /api and /metrics, checking every run in "
            "the audit store. Needs RUNWATCH_ADMIN_TOKEN outside dev mode.",
            _monitor,
            lambda p: server_args(p, 8001),
            after="runtime",
        ),
        Command(
            "check",
            "judge stored runs; exit 1 on any violation",
            "Run every monitor rule over the stored runs and print the verdicts; exit status 1 "
            "when any run breaks a rule.",
            _check,
            _check_args,
        ),
    ),
    attach=_attach,
)
