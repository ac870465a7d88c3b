"""Tasks the lifecycle tests run in real worker processes (QUEUE_TASK_MODULES=tests.lifecycle_tasks).

`test.count` records every execution in Redis, so a test can tell a job that
ran twice from one that ran once.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from typing import Any

import redis

from queueservice_server.tasks import task

_clients: dict[int, redis.Redis] = {}


def _redis() -> redis.Redis:
    client = _clients.get(os.getpid())
    if client is None:
        client = _clients[os.getpid()] = redis.Redis.from_url(os.environ["QUEUE_REDIS_URL"])
    return client


@task("test.count")
def count(payload: dict[str, Any]) -> None:
    """Sleeps `seconds`, then counts one run of item `n` in HASH `counter`."""
    time.sleep(float(payload.get("seconds", 0)))
    _redis().hincrby(payload["counter"], str(int(payload["n"])), 1)


@task("test.spin_in_c")
def spin_in_c(payload: dict[str, Any]) -> None:
    """Minutes of key stretching inside OpenSSL: C code that never returns to the
    interpreter, so Huey's SIGALRM soft timeout cannot interrupt it."""
    hashlib.pbkdf2_hmac("sha256", b"password", b"salt", 2**31 - 1)


@task("test.crash")
def crash(payload: dict[str, Any]) -> None:
    """Kills its own worker process, as the OOM killer would."""
    os.kill(os.getpid(), signal.SIGKILL)


@task("test.fail_other")
def fail_other(payload: dict[str, Any]) -> None:
    raise RuntimeError("a second failing task, to filter RetryFailed by")
