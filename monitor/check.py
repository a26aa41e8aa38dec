"""Former name of :mod:`monitor.report` (``runwatch check``), kept only for callers not moved
yet (tests/test_agui_http.py, tests/test_crash_loop.py); import from ``monitor.report``."""

from __future__ import annotations

from .report import judge_runs, run_check

__all__ = ["judge_runs", "run_check"]
