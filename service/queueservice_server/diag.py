"""Built-in diagnostic tasks for smoke tests and benchmarks (QUEUE_DIAG_TASKS=false turns them off)."""

from __future__ import annotations

import time
from typing import Any

from queueservice_server.tasks import task


@task("diag.noop")
def noop(payload: dict[str, Any]) -> None:
    """Does nothing: measures the queue itself."""


@task("diag.sleep")
def sleep(payload: dict[str, Any]) -> None:
    """Sleeps `payload["seconds"]` (default 1)."""
    seconds = payload.get("seconds", 1)
    if not isinstance(seconds, int | float) or seconds < 0:
        raise ValueError('diag.sleep needs payload {"seconds": <non-negative number>}')
    time.sleep(seconds)


@task("diag.fail")
def fail(payload: dict[str, Any]) -> None:
    """Always raises, with `payload["message"]` if given."""
    raise RuntimeError(payload.get("message") or "diag.fail always fails")
