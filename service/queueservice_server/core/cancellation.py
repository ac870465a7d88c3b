"""Stopping asyncio tasks that talk to Redis.

redis.asyncio can swallow a cancellation that lands while a command completes
(redis-py issues #2028, #2551; measured here: about half the cancels of a task
inside PING are lost), so a task cancelled once may run on and an `await` on it
hang. `stop_task` cancels until the task is really gone.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

RETRY_S = 0.05


async def stop_task(task: asyncio.Task[Any]) -> None:
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=RETRY_S)
    with contextlib.suppress(asyncio.CancelledError, Exception):
        # Retrieved so that an error it ended with is not logged as never retrieved.
        task.result()
