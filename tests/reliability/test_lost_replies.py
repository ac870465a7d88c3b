"""Replies lost on the way back from Redis (tests/proxy.py between the service and Redis):
Redis ran the script, the client saw its connection break and sent it again."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import redis

from queueservice_server.core import lua
from queueservice_server.core.keys import QueueKeys
from queueservice_server.settings import Settings
from tests.proxy import FaultProxy
from tests.support import WorkerProcess, enqueue_counted, job_hashes, request, stub_for, wait_all

StartWorker = Callable[..., WorkerProcess]


def sha(script: str) -> bytes:
    return hashlib.sha1(script.encode()).hexdigest().encode()


def test_a_lost_take_reply_orphans_no_lease_and_costs_no_stall(
    lc: Settings, server_factory: Any, worker_factory: StartWorker
) -> None:
    # A lease of 15 s: a take orphaned by the lost reply would hold its jobs that long.
    settings = replace(lc, stall_interval=20.0, worker_concurrency=1)
    counter = f"{settings.key_prefix}:runs"
    job_ids = enqueue_counted(stub_for(server_factory(settings)), counter, 20, 0.0)
    take = sha(lua.TAKE)
    with FaultProxy.from_url(settings.redis_url) as proxy:
        proxy.drop_reply_matching(lambda command: take in command)
        worker_factory(replace(settings, redis_url=proxy.url))
        proxy.wait_dropped(20)
        wait_all(settings, job_ids, "COMPLETED", timeout=10)
    runs = redis.Redis.from_url(settings.redis_url).hgetall(counter)
    assert {int(n): int(c) for n, c in runs.items()} == dict.fromkeys(range(20), 1)
    records = job_hashes(settings, job_ids)
    assert {(r[b"attempts"], r.get(b"stalls", b"0")) for r in records.values()} == {(b"1", b"0")}


def test_a_lost_enqueue_reply_never_resurrects_a_job_a_worker_took(
    lc: Settings, server_factory: Any, worker_factory: StartWorker
) -> None:
    """The Enqueue's script ran, its reply was lost, and the client's retry reached Redis only
    after a worker had taken and finished the job: the retry must return that job as it is."""
    settings = replace(lc, worker_concurrency=1)
    counter = f"{settings.key_prefix}:runs"
    worker_factory(settings)
    enqueue = sha(lua.ENQUEUE)
    with FaultProxy.from_url(settings.redis_url) as proxy:
        # Once the reply is lost, everything through the proxy (the retry) waits 2 s while the
        # worker, which talks to Redis directly, takes and finishes the job.
        proxy.drop_reply_matching(lambda command: enqueue in command, then=lambda: proxy.stall(2.0))
        stub = stub_for(server_factory(replace(settings, redis_url=proxy.url)))
        job_id = stub.Enqueue(request("test.count", {"n": 0, "counter": counter}), timeout=10).job_id
        assert proxy.dropped == 1
    wait_all(settings, [job_id], "COMPLETED", timeout=10)
    record = job_hashes(settings, [job_id])[job_id]
    assert (record[b"state"], record[b"attempts"]) == (b"COMPLETED", b"1")
    direct = redis.Redis.from_url(settings.redis_url)
    keys = QueueKeys(settings.key_prefix, "default")
    assert direct.zcard(keys.waiting) == 0 and direct.zscore(keys.completed, job_id.split(":")[1]) is not None
    assert direct.hgetall(counter) == {b"0": b"1"}
