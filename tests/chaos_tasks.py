"""The task of the chaos run (tests/reliability/test_chaos.py), loaded by its workers with
QUEUE_TASK_MODULES=tests.chaos_tasks.

`chaos.work` records every execution in Redis, in LIST `<executions>:<n>` (see
`executions_list`): `start <run> <pid> <time>` when it begins and `end <run> <pid> <time>`
when it ends (returning or raising), `<run>` being a random id of this execution, so a
record written twice (a command re-sent over a broken connection) is recognised. An
execution whose process was killed has a start and no end. tests/invariants.py reads them.

Redis may be down while it runs (the chaos restarts it): every write is retried until it
lands, for up to RECORD_PATIENCE seconds, so an outage costs a job no attempt.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import redis

from queueservice_server.tasks import task

T = TypeVar("T")
TASK = "chaos.work"
RECORD_PATIENCE = 60.0

_clients: dict[int, redis.Redis] = {}


def executions_list(executions_key: str, n: int) -> str:
    """The LIST of job `n`'s executions."""
    return f"{executions_key}:{n}"


def fail_counter(executions_key: str, n: int) -> str:
    """The counter a `fail_once` job's executions INCR: the first one fails."""
    return f"{executions_key}:fail:{n}"


def payload(executions_key: str, n: int, seconds: float, *, fail_once: bool = False) -> dict[str, Any]:
    return {"executions": executions_key, "n": n, "seconds": seconds, "fail_once": fail_once}


def _redis() -> redis.Redis:
    client = _clients.get(os.getpid())
    if client is None:
        client = _clients[os.getpid()] = redis.Redis.from_url(
            os.environ["QUEUE_REDIS_URL"], socket_timeout=5.0, socket_connect_timeout=2.0
        )
    return client


def _persist(command: Callable[[redis.Redis], T]) -> T:
    """Runs `command` until Redis answers it (an outage, a connection cut, a restart)."""
    deadline = time.monotonic() + RECORD_PATIENCE
    while True:
        try:
            return command(_redis())
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@task(TASK)
def work(data: dict[str, Any]) -> None:
    """Sleeps `seconds`; a `fail_once` job raises on its first execution (so it is retried)."""
    key = executions_list(data["executions"], int(data["n"]))
    run = uuid.uuid4().hex
    pid = os.getpid()
    _persist(lambda r: r.rpush(key, f"start {run} {pid} {time.time():.6f}"))
    try:
        time.sleep(float(data["seconds"]))
        if data.get("fail_once"):
            counter = fail_counter(data["executions"], int(data["n"]))
            if _persist(lambda r: r.incr(counter)) == 1:
                raise RuntimeError("chaos.work fails the first execution of a fail_once job")
    finally:
        _persist(lambda r: r.rpush(key, f"end {run} {pid} {time.time():.6f}"))
