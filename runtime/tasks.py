"""Stopping a background task without hiding anything.

``task.cancel()`` followed by ``with suppress(CancelledError): await task`` has two faults: it
swallows a cancellation of the *caller* that arrives while it waits, and it lets an exception
the task died of go unseen. :func:`stop_task` does neither.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

__all__ = ["stop_task"]


async def stop_task(task: asyncio.Task[Any] | None, log: logging.Logger) -> None:
    """Cancel ``task`` and wait until it has ended. Its cancellation is its normal end; an
    exception it ended with is logged with its traceback; a cancellation of the caller while
    waiting propagates."""
    if task is None:
        return
    task.cancel()
    # asyncio.wait never raises the task's outcome, and raises CancelledError only for ours.
    await asyncio.wait([task])
    if not task.cancelled() and task.exception() is not None:
        log.error("task %s failed", task.get_name(), exc_info=task.exception())
