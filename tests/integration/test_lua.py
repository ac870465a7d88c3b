"""Each Lua script's contract on a real Redis: what it moves, what it returns, what it refuses.

The scripts run through the code that runs them in production: `Producer` (ENQUEUE,
RETRY_FAILED), `QueueOps` (TAKE, SETTLE, PROMOTE, RENEW, REAP, HAND_BACK, HEARTBEAT) and the
bound `Scripts` where a test needs arguments QueueOps would not send. State is read straight
from Redis; per-minute figures are compared with `tests.figures_model`.

Fencing: a job's attempt is held under its token (attempt number and holder). The tests below
take a job as holder A, let its lease run out and the reaper return it, take it again as B,
and check that every call A could still make changes nothing.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any, cast

import pytest
import redis

from queueservice_server.core.codec import decode_message, encode_message, next_attempt
from queueservice_server.core.jobs import Token
from queueservice_server.core.keys import (
    CounterFields,
    JobFields,
    QueueKeys,
    ServiceKeys,
    TimingFields,
    WorkerFields,
)
from queueservice_server.core.producer import JobSpec, Producer
from queueservice_server.core.scripts import decode_enqueue
from queueservice_server.core.timings import Attempt, Outcome, bucket
from queueservice_server.settings import Settings
from queueservice_server.worker.queue_ops import LIMIT_SLACK_MS, QueueOps
from tests.figures_model import minute_hash
from tests.integration import lifecycle_support as support
from tests.integration.lifecycle_support import (
    CONSUMER,
    GHOST,
    OTHER,
    WORKER,
    Held,
    counters,
    enqueue,
    expire,
    figures,
    local,
    members,
    minute_hashes,
    number,
    outcome,
    queue_state,
    record,
    redis_now,
    scores,
    spec,
    stream,
    summed,
    take,
    with_producer,
)

# Shared fixtures (lifecycle_support): a client of the test's Redis, and the default queue's keys.
r = support.r
keys = support.keys


@pytest.fixture
def ops(settings: Settings, r: redis.Redis) -> QueueOps:
    """A worker process's QueueOps: its id is the holder of what it takes."""
    return QueueOps(settings, r, WORKER)


def reaper(settings: Settings, r: redis.Redis) -> QueueOps:
    """Another consumer's supervisor, reaping."""
    return QueueOps(settings, r, "host-r:300")


# -- ENQUEUE ----------------------------------------------------------------------


def test_enqueue_writes_the_record_and_joins_waiting(settings: Settings, r: redis.Redis, keys: QueueKeys) -> None:
    before = redis_now(r)
    (job,) = enqueue(
        settings,
        spec(task="billing.send", payload={"n": 1}, priority=3, max_attempts=4, timeout=1.5, retry_delay=0.5),
    )
    assert job.job_id.startswith("default:")
    assert not job.deduplicated
    fields = record(r, keys, local(job))
    assert fields[JobFields.STATE] == b"WAITING"
    assert fields[JobFields.TASK] == b"billing.send"
    assert number(fields, JobFields.PRIORITY) == 3
    assert number(fields, JobFields.MAX_ATTEMPTS) == 4
    assert number(fields, JobFields.TIMEOUT_MS) == 1500
    assert number(fields, JobFields.ATTEMPTS) == 0
    assert number(fields, JobFields.ENQUEUED_AT) == job.enqueued_at_ms >= before
    assert number(fields, JobFields.READY_AT) == job.enqueued_at_ms
    message = decode_message(fields[JobFields.MSG])
    assert message["payload"] == {"n": 1}
    assert message["retries"] == 3
    assert message["retry_delay"] == 0.5
    assert message["timeout"] == 1.5
    seq = number(fields, JobFields.SEQ)
    assert counters(r, keys)[CounterFields.SEQ] == seq
    # Priority bands sort first (higher first), FIFO by seq within one.
    assert scores(r, keys.waiting) == {local(job): seq - 3 * 10**12}
    assert members(r, keys.delayed) == []


def test_enqueue_idempotency_key_returns_the_first_job(settings: Settings, r: redis.Redis, keys: QueueKeys) -> None:
    (first,) = enqueue(settings, spec(idempotency_key="order-7", payload={"v": 1}))
    # Again later, and twice within one batch: always the first job.
    again, same_batch = enqueue(
        settings, spec(idempotency_key="order-7", payload={"v": 2}), spec(idempotency_key="order-7")
    )
    for dup in (again, same_batch):
        assert dup.job_id == first.job_id
        assert dup.deduplicated
        assert dup.enqueued_at_ms == first.enqueued_at_ms
    assert not first.deduplicated
    assert members(r, keys.waiting) == [local(first)]
    fields = record(r, keys, local(first))
    assert fields[JobFields.IDEMPOTENCY_KEY] == b"order-7"
    assert decode_message(fields[JobFields.MSG])["payload"] == {"v": 1}
    assert cast(bytes, r.get(keys.idempotency("order-7"))).decode() == local(first)
    ttl = r.pttl(keys.idempotency("order-7"))
    assert 0 < ttl <= settings.idempotency_window * 1000
    # A new key is a new job; the key is per queue.
    other, elsewhere = enqueue(settings, spec(idempotency_key="order-8"), spec("emails", idempotency_key="order-7"))
    assert not other.deduplicated and other.job_id != first.job_id
    assert not elsewhere.deduplicated and elsewhere.job_id.startswith("emails:")


def test_enqueue_orders_waiting_by_priority_then_fifo(settings: Settings, r: redis.Redis, keys: QueueKeys) -> None:
    jobs = enqueue(
        settings,
        spec(task="p0-first", priority=0),
        spec(task="p5", priority=5),
        spec(task="p0-second", priority=0),
        spec(task="p-2", priority=-2),
        spec(task="p5-second", priority=5),
    )
    order = members(r, keys.waiting)
    by_local = {local(job): record(r, keys, local(job))[JobFields.TASK].decode() for job in jobs}
    assert [by_local[member] for member in order] == ["p5", "p5-second", "p0-first", "p0-second", "p-2"]


def test_enqueue_with_a_delay_or_a_due_time_goes_to_delayed(
    settings: Settings, r: redis.Redis, keys: QueueKeys
) -> None:
    now = redis_now(r)
    delayed, scheduled, past = enqueue(
        settings, spec(delay_ms=60_000), spec(due_at_ms=now + 120_000), spec(due_at_ms=now - 1000)
    )
    assert scores(r, keys.delayed) == {
        local(delayed): delayed.enqueued_at_ms + 60_000,
        local(scheduled): now + 120_000,
    }
    assert members(r, keys.waiting) == [local(past)]
    fields = record(r, keys, local(delayed))
    assert fields[JobFields.STATE] == b"DELAYED"
    assert number(fields, JobFields.DUE_AT) == delayed.enqueued_at_ms + 60_000
    assert record(r, keys, local(past))[JobFields.STATE] == b"WAITING"


def test_enqueue_batch_over_two_queues_answers_in_request_order(settings: Settings, r: redis.Redis) -> None:
    default, emails = QueueKeys(settings.key_prefix, "default"), QueueKeys(settings.key_prefix, "emails")
    jobs = enqueue(settings, spec(task="a"), spec("emails", task="b"), spec(task="c"))
    assert [job.job_id.partition(":")[0] for job in jobs] == ["default", "emails", "default"]
    assert members(r, default.waiting) == [local(jobs[0]), local(jobs[2])]
    assert members(r, emails.waiting) == [local(jobs[1])]
    assert record(r, emails, local(jobs[1]))[JobFields.TASK] == b"b"


def test_enqueue_run_again_with_the_same_ids_never_overwrites_the_job(
    settings: Settings, r: redis.Redis, ops: QueueOps, keys: QueueKeys
) -> None:
    async def call_args(producer: Producer) -> tuple[list[str], list[Any]]:
        return producer._enqueue_call("default", [spec(task="t.first"), spec(task="t.second", idempotency_key="k-1")])

    # One call's keys and arguments (its job ids are in them), sent as a client whose reply was lost sends it again.
    script_keys, args = with_producer(settings, call_args)

    def run() -> list[tuple[str, bool, int]]:
        return decode_enqueue(ops.scripts.enqueue(keys=script_keys, args=args))

    replied = run()
    (first, first_dedup, _), (second, second_dedup, _) = replied
    assert not first_dedup and not second_dedup
    took = take(ops, keys, 1)
    assert [job.local for job in took.jobs] == [first]
    taken = record(r, keys, first)
    waiting = scores(r, keys.waiting)
    assert list(waiting) == [second]
    # Again while the first is taken: the same answer, and neither job is touched.
    assert run() == replied
    assert record(r, keys, first) == taken
    assert taken[JobFields.STATE] == b"ACTIVE"
    assert members(r, keys.active) == [first]
    assert scores(r, keys.waiting) == waiting
    # Again once it completed.
    now = redis_now(r)
    assert ops.settle(keys, [outcome(took.jobs[0], Outcome.COMPLETED, now, now + 1)]) == []
    completed = record(r, keys, first)
    assert run() == replied
    assert record(r, keys, first) == completed
    assert completed[JobFields.STATE] == b"COMPLETED"
    assert number(completed, JobFields.ATTEMPTS) == 1
    assert members(r, keys.completed) == [first]
    assert scores(r, keys.waiting) == waiting
    assert record(r, keys, second)[JobFields.STATE] == b"WAITING"
    assert len(stream(r, keys)) == 1


def test_enqueue_over_the_waiting_cap_writes_nothing_and_a_rerun_is_never_refused(
    settings: Settings, r: redis.Redis, ops: QueueOps, keys: QueueKeys
) -> None:
    capped = replace(settings, max_waiting=4)

    def call_args(*specs: JobSpec) -> tuple[list[str], list[Any]]:
        async def build(producer: Producer) -> tuple[list[str], list[Any]]:
            return producer._enqueue_call("default", list(specs))

        return with_producer(capped, build)

    def run(call: tuple[list[str], list[Any]]) -> list[Any]:
        reply: list[Any] = ops.scripts.enqueue(keys=call[0], args=call[1])
        return reply

    first = call_args(spec(), spec(delay_ms=60_000))
    replied = run(first)
    # A key repeated within a call is one new job: 3 of 4 now (waiting and delayed both count).
    keyed = run(call_args(spec(idempotency_key="k"), spec(idempotency_key="k")))
    assert keyed[1::3] == [0, 1] and keyed[0] == keyed[3]
    before = (members(r, keys.waiting), members(r, keys.delayed), counters(r, keys))
    # Two new jobs where one fits: neither is written.
    assert run(call_args(spec(), spec())) == [b"FULL", 3]
    assert (members(r, keys.waiting), members(r, keys.delayed), counters(r, keys)) == before
    # At the cap, a re-run of an accepted call and a known key are answered, not refused.
    run(call_args(spec()))
    assert decode_enqueue(run(first)) == decode_enqueue(replied)
    again = run(call_args(spec(idempotency_key="k")))
    assert again[:2] == [keyed[0], 1]
    assert run(call_args(spec())) == [b"FULL", 4]


# -- TAKE -------------------------------------------------------------------------


def test_take_moves_jobs_in_order_into_active_under_a_lease(
    settings: Settings, r: redis.Redis, ops: QueueOps, keys: QueueKeys
) -> None:
    low, high, low2 = enqueue(settings, spec(task="a"), spec(task="b", priority=5), spec(task="c"))
    took = take(ops, keys, 2)
    assert took.wait_ms == 0
    assert [job.local for job in took.jobs] == [local(high), local(low)]
    assert [job.task for job in took.jobs] == ["b", "a"]
    assert [job.attempt for job in took.jobs] == [1, 1]
    lease_until = took.now + ops.lease_ms
    assert ops.lease_ms == int(settings.stall_interval * 750)
    assert scores(r, keys.active) == {local(high): lease_until, local(low): lease_until}
    assert members(r, keys.waiting) == [local(low2)]
    for job in took.jobs:
        fields = record(r, keys, job.local)
        assert fields[JobFields.STATE] == b"ACTIVE"
        assert number(fields, JobFields.ATTEMPTS) == 1
        # The holder: with the attempt, the token that fences it.
        assert fields[JobFields.WORKER] == WORKER.encode()
        assert number(fields, JobFields.STARTED_AT) == took.now
        assert fields[JobFields.FINISHED_AT] == b""
        # The reply carries the record's message and ready time.
        assert job.msg == fields[JobFields.MSG]
        assert job.ready_at == number(fields, JobFields.READY_AT)
    assert record(r, keys, local(low2))[JobFields.STATE] == b"WAITING"


def test_take_of_an_empty_queue_returns_only_the_clock(r: redis.Redis, ops: QueueOps, keys: QueueKeys) -> None:
    before = redis_now(r)
    took = take(ops, keys, 8)
    assert took.jobs == []
    assert took.wait_ms == 0
    assert before <= took.now <= redis_now(r)
    # Nothing taken, so nothing to replay.
    assert r.exists(keys.take(WORKER)) == 0


def test_take_counts_each_attempt(settings: Settings, r: redis.Redis, ops: QueueOps, keys: QueueKeys) -> None:
    (job,) = enqueue(settings, spec())
    first = take(ops, keys, 1).jobs[0]
    # Back to waiting as a retry; the next take is attempt 2.
    retried = outcome(first, Outcome.RETRY, first.ready_at, first.ready_at + 1, "E: x", retry_msg=first.msg)
    assert ops.settle(keys, [retried]) == []
    second = take(ops, keys, 1).jobs[0]
    assert second.local == local(job)
    assert second.attempt == 2
    assert number(record(r, keys, local(job)), JobFields.ATTEMPTS) == 2


def test_take_again_with_its_token_returns_the_same_jobs_and_takes_no_more(
    settings: Settings, r: redis.Redis, keys: QueueKeys
) -> None:
    limited = QueueOps(replace(settings, rate_limit_max=10, rate_limit_window=60.0), r, WORKER)
    jobs = enqueue(settings, *[spec() for _ in range(5)])
    first = take(limited, keys, 2, token="take-1")
    assert [job.local for job in first.jobs] == [local(job) for job in jobs[:2]]
    # Kept for one lease under the holder's take key.
    assert 0 < r.pttl(keys.take(WORKER)) <= limited.lease_ms
    active, limiter = scores(r, keys.active), scores(r, keys.limiter)
    # Sent again (its reply was lost): the same jobs and attempts, no more taken, no lease or token spent.
    again = take(limited, keys, 2, token="take-1")
    assert again.jobs == first.jobs
    assert again.wait_ms == 0
    assert scores(r, keys.active) == active
    assert scores(r, keys.limiter) == limiter
    assert members(r, keys.waiting) == [local(job) for job in jobs[2:]]
    assert [number(record(r, keys, job), JobFields.ATTEMPTS) for job in first.jobs] == [1, 1]
    # Once one of them is settled, the replay returns the one still held.
    now = redis_now(r)
    assert limited.settle(keys, [outcome(first.jobs[0], Outcome.COMPLETED, now, now + 1)]) == []
    assert take(limited, keys, 2, token="take-1").jobs == first.jobs[1:]
    # Another holder's take under the same token string is its own.
    other = take(QueueOps(settings, r, OTHER), keys, 1, token="take-1")
    assert [job.local for job in other.jobs] == [local(jobs[2])]
    # A new token takes new jobs.
    fresh = take(limited, keys, 2, token="take-2")
    assert [job.local for job in fresh.jobs] == [local(jobs[3]), local(jobs[4])]
    assert [job.attempt for job in fresh.jobs] == [1, 1]
    assert members(r, keys.waiting) == []


def test_take_under_a_rate_limit_takes_only_what_the_window_allows(
    settings: Settings, r: redis.Redis, keys: QueueKeys
) -> None:
    limited = QueueOps(replace(settings, rate_limit_max=2, rate_limit_window=60.0), r, WORKER)
    jobs = enqueue(settings, *[spec() for _ in range(4)])
    first = take(limited, keys, 5)
    assert [job.local for job in first.jobs] == [local(jobs[0]), local(jobs[1])]
    assert first.wait_ms == 0
    assert scores(r, keys.limiter) == {f"{local(job)}:1": first.now for job in jobs[:2]}
    blocked = take(limited, keys, 5)
    assert blocked.jobs == []
    # Until the oldest token frees: its take time + window + slack (+1 ms).
    assert blocked.wait_ms == first.now + 60_000 + LIMIT_SLACK_MS - blocked.now + 1
    # It takes nothing to put it back.
    assert members(r, keys.waiting) == [local(jobs[2]), local(jobs[3])]
    assert len(members(r, keys.active)) == 2


def test_take_of_an_empty_queue_under_an_exhausted_rate_limit_says_no_wait(
    settings: Settings, r: redis.Redis, keys: QueueKeys
) -> None:
    limited = QueueOps(replace(settings, rate_limit_max=1, rate_limit_window=60.0), r, WORKER)
    enqueue(settings, spec())
    assert len(take(limited, keys, 1).jobs) == 1
    # The window is full, but nothing waits: no wait, so a worker does not skip the queue for nothing.
    empty = take(limited, keys, 1)
    assert (empty.jobs, empty.wait_ms) == ([], 0)
    enqueue(settings, spec())
    blocked = take(limited, keys, 1)
    assert blocked.jobs == []
    assert blocked.wait_ms > 0


def test_a_rate_limit_token_frees_after_its_window(settings: Settings, r: redis.Redis, keys: QueueKeys) -> None:
    limited = QueueOps(replace(settings, rate_limit_max=1, rate_limit_window=0.05), r, WORKER)
    enqueue(settings, spec(), spec())
    assert len(take(limited, keys, 2).jobs) == 1
    blocked = take(limited, keys, 2)
    assert blocked.jobs == []
    assert 0 < blocked.wait_ms <= 50 + LIMIT_SLACK_MS + 1
    time.sleep(blocked.wait_ms / 1000 + 0.01)
    after = take(limited, keys, 2)
    assert after.wait_ms == 0
    assert len(after.jobs) == 1
    assert len(members(r, keys.limiter)) == 1


def test_take_fails_a_waiting_member_without_a_record(
    settings: Settings, r: redis.Redis, ops: QueueOps, keys: QueueKeys
) -> None:
    (good,) = enqueue(settings, spec())
    # Written by hand, ahead of everything.
    r.zadd(keys.waiting, {GHOST: -(10**13)})
    took = take(ops, keys, 5)
    assert [job.local for job in took.jobs] == [local(good)]
    assert members(r, keys.active) == [local(good)]
    assert scores(r, keys.failed) == {GHOST: took.now}
    fields = record(r, keys, GHOST)
    assert fields[JobFields.STATE] == b"FAILED"
    error = fields[JobFields.ERROR].decode()
    assert error.startswith("no job record")
    assert number(fields, JobFields.FINISHED_AT) == took.now
    assert members(r, keys.waiting) == []
    # A failed attempt like any other: its timings entry, its totals and its figures.
    assert stream(r, keys) == [
        {
            TimingFields.SEQ: "1",
            TimingFields.JOB: GHOST,
            TimingFields.TASK: "",
            TimingFields.OUTCOME: "FAILED",
            TimingFields.ATTEMPT: "0",
            TimingFields.WAIT: "0",
            TimingFields.PROC: "0",
            TimingFields.START: str(took.now),
            TimingFields.FINISH: str(took.now),
            TimingFields.WORKER: "",
            TimingFields.ERROR: error,
        }
    ]
    totals = counters(r, keys)
    assert (totals[CounterFields.TOTAL_N], totals[CounterFields.TOTAL_FAILED], totals[CounterFields.TIMINGS]) == (
        1,
        1,
        1,
    )
    assert CounterFields.TOTAL_COMPLETED not in totals
    failed = Attempt(GHOST, "", Outcome.FAILED, 0, took.now, took.now, took.now, "", error)
    assert figures(r, keys) == [minute_hash([failed])]


# -- SETTLE -----------------------------------------------------------------------


def test_settle_completed_records_the_outcome_the_stream_and_the_figures(
    settings: Settings, r: redis.Redis, ops: QueueOps, keys: QueueKeys
) -> None:
    enqueue(settings, spec(task="t.ok"))
    took = take(ops, keys, 1)
    job = took.jobs[0]
    start, finish = took.now + 2, took.now + 7
    done = outcome(job, Outcome.COMPLETED, start, finish)
    assert ops.settle(keys, [done]) == []
    assert members(r, keys.active) == []
    assert scores(r, keys.completed) == {job.local: finish}
    fields = record(r, keys, job.local)
    assert fields[JobFields.STATE] == b"COMPLETED"
    assert number(fields, JobFields.STARTED_AT) == start
    assert number(fields, JobFields.FINISHED_AT) == finish
    assert fields[JobFields.ERROR] == b""
    wait = start - job.ready_at
    assert stream(r, keys) == [
        {
            TimingFields.SEQ: "1",
            TimingFields.JOB: job.local,
            TimingFields.TASK: "t.ok",
            TimingFields.OUTCOME: "COMPLETED",
            TimingFields.ATTEMPT: "1",
            TimingFields.WAIT: str(wait),
            TimingFields.PROC: "5",
            TimingFields.START: str(start),
            TimingFields.FINISH: str(finish),
            TimingFields.WORKER: WORKER,
            TimingFields.ERROR: "",
        }
    ]
    totals = counters(r, keys)
    assert totals[CounterFields.TIMINGS] == 1
    assert totals[CounterFields.TOTAL_N] == 1
    assert totals[CounterFields.TOTAL_COMPLETED] == 1
    assert CounterFields.TOTAL_FAILED not in totals
    ((key, raw),) = minute_hashes(r, keys).items()
    assert raw == minute_hash([done])
    minute = {name.decode(): int(value) for name, value in raw.items()}
    assert minute["n"] == minute["completed"] == 1
    assert minute["proc_sum"] == minute["proc_max"] == 5
    assert minute["wait_sum"] == minute["wait_max"] == wait
    assert minute["total_sum"] == wait + 5
    assert minute[f"p:{bucket(5)}"] == 1
    assert minute[f"w:{bucket(wait)}"] == 1
    assert "failed" not in minute
    ttl = r.ttl(key)
    assert int(settings.metrics_history) < ttl <= int(settings.metrics_history) + 120


def test_settle_keeps_maxima_and_adds_sums_over_batches(
    settings: Settings, r: redis.Redis, ops: QueueOps, keys: QueueKeys
) -> None:
    enqueue(settings, spec(), spec())
    took = take(ops, keys, 2)
    first, second = took.jobs
    ops.settle(keys, [outcome(first, Outcome.COMPLETED, took.now, took.now + 9)])
    ops.settle(keys, [outcome(second, Outcome.FAILED, took.now, took.now + 4, "E: no")])
    # One minute hash, or two if the minute turned between the calls.
    assert summed(r, keys, "n") == 2
    assert summed(r, keys, "proc_sum") == 13
    assert max(int(fields[b"proc_max"]) for fields in figures(r, keys)) == 9
    assert summed(r, keys, "completed") == 1
    assert summed(r, keys, "failed") == 1
    totals = counters(r, keys)
    assert totals[CounterFields.TOTAL_N] == 2
    assert totals[CounterFields.TOTAL_COMPLETED] == totals[CounterFields.TOTAL_FAILED] == 1


def test_settle_failed_and_retry_moves(settings: Settings, r: redis.Redis, ops: QueueOps, keys: QueueKeys) -> None:
    a, b, c = enqueue(settings, spec(), spec(), spec())
    took = take(ops, keys, 3)
    late = enqueue(settings, spec())[0]
    ja, jb, jc = took.jobs
    finish = took.now + 3
    seq_c = number(record(r, keys, jc.local), JobFields.SEQ)
    retry_msg = encode_message(payload={"next": True}, retries=1, retry_delay=4, retry_backoff=2, timeout=300)
    stale = ops.settle(
        keys,
        [
            outcome(ja, Outcome.FAILED, took.now, finish, "ValueError: bad input"),
            outcome(jb, Outcome.RETRY, took.now, finish, "E: later", retry_msg=retry_msg, retry_due_ms=finish + 60_000),
            outcome(jc, Outcome.RETRY, took.now, finish, "E: now", retry_msg=retry_msg),
        ],
    )
    assert stale == []
    assert members(r, keys.active) == []
    # FAILED: the failed set, with its error.
    assert scores(r, keys.failed) == {local(a): finish}
    failed = record(r, keys, local(a))
    assert failed[JobFields.STATE] == b"FAILED"
    assert failed[JobFields.ERROR] == b"ValueError: bad input"
    # RETRY with a due time: delayed, with the next attempt's message.
    assert scores(r, keys.delayed) == {local(b): finish + 60_000}
    later = record(r, keys, local(b))
    assert later[JobFields.STATE] == b"DELAYED"
    assert number(later, JobFields.DUE_AT) == finish + 60_000
    assert later[JobFields.MSG] == retry_msg
    assert later[JobFields.ERROR] == b"E: later"
    # RETRY due now: the back of its priority band, behind a job enqueued after it was taken.
    assert members(r, keys.waiting) == [local(late), local(c)]
    now = record(r, keys, local(c))
    assert now[JobFields.STATE] == b"WAITING"
    assert number(now, JobFields.SEQ) > seq_c
    assert number(now, JobFields.READY_AT) >= took.now
    assert now[JobFields.MSG] == retry_msg
    assert [entry[TimingFields.OUTCOME] for entry in stream(r, keys)] == ["FAILED", "RETRY", "RETRY"]
    totals = counters(r, keys)
    assert totals[CounterFields.TOTAL_N] == 3
    assert totals[CounterFields.TOTAL_FAILED] == 1
    assert totals[CounterFields.TOTAL_RETRIED] == 2
    assert CounterFields.TOTAL_COMPLETED not in totals


def test_settle_timed_out_retries_with_a_next_message_and_fails_without(
    settings: Settings, r: redis.Redis, ops: QueueOps, keys: QueueKeys
) -> None:
    enqueue(settings, spec(), spec())
    took = take(ops, keys, 2)
    again, last = took.jobs
    retry_msg = encode_message(payload={}, retries=0, retry_delay=4, retry_backoff=2, timeout=1)
    error = "TaskTimeout: timeout (1s)"
    stale = ops.settle(
        keys,
        [
            outcome(again, Outcome.TIMED_OUT, took.now, took.now + 5, error, retry_msg=retry_msg),
            outcome(last, Outcome.TIMED_OUT, took.now, took.now + 5, error),
        ],
    )
    assert stale == []
    retried = record(r, keys, again.local)
    assert retried[JobFields.STATE] == b"WAITING"
    assert retried[JobFields.MSG] == retry_msg
    assert retried[JobFields.ERROR] == error.encode()
    assert members(r, keys.waiting) == [again.local]
    failed = record(r, keys, last.local)
    assert failed[JobFields.STATE] == b"FAILED"
    assert failed[JobFields.ERROR] == error.encode()
    assert scores(r, keys.failed) == {last.local: took.now + 5}
    # The stream says how the attempt ended; the tallies count the job's move.
    assert [entry[TimingFields.OUTCOME] for entry in stream(r, keys)] == ["TIMED_OUT", "TIMED_OUT"]
    totals = counters(r, keys)
    assert totals[CounterFields.TOTAL_N] == 2
    assert totals[CounterFields.TOTAL_RETRIED] == totals[CounterFields.TOTAL_FAILED] == 1
    assert summed(r, keys, "retried") == 1
    assert summed(r, keys, "failed") == 1


def test_settle_retention_keeps_the_newest_and_counts_the_evicted(
    settings: Settings, r: redis.Redis, keys: QueueKeys
) -> None:
    ops = QueueOps(replace(settings, keep_completed=2, keep_failed=1), r, WORKER)
    enqueue(settings, *[spec() for _ in range(6)])
    (untouched,) = enqueue(settings, spec())
    took = take(ops, keys, 6)
    done = [outcome(job, Outcome.COMPLETED, took.now, took.now + 1 + n) for n, job in enumerate(took.jobs[:4])]
    broken = [outcome(job, Outcome.FAILED, took.now, took.now + 10 + n, "E") for n, job in enumerate(took.jobs[4:])]
    assert ops.settle(keys, done + broken) == []
    locals_ = [job.local for job in took.jobs]
    assert members(r, keys.completed) == locals_[2:4]
    assert members(r, keys.failed) == locals_[5:]
    for evicted in (*locals_[:2], locals_[4]):
        assert record(r, keys, evicted) == {}
    for kept in (*locals_[2:4], locals_[5]):
        assert record(r, keys, kept) != {}
    totals = counters(r, keys)
    assert totals[CounterFields.EVICTED_COMPLETED] == 2
    assert totals[CounterFields.EVICTED_FAILED] == 1
    # Waiting jobs are never evicted.
    assert record(r, keys, local(untouched))[JobFields.STATE] == b"WAITING"


def test_settle_numbers_stream_entries_across_batches(
    settings: Settings, r: redis.Redis, ops: QueueOps, keys: QueueKeys
) -> None:
    enqueue(settings, spec(), spec(), spec())
    took = take(ops, keys, 3)
    done = [outcome(job, Outcome.COMPLETED, took.now, took.now + 1) for job in took.jobs]
    assert ops.settle(keys, done[:2]) == []
    assert ops.settle(keys, done[2:]) == []
    entries = stream(r, keys)
    assert [entry[TimingFields.SEQ] for entry in entries] == ["1", "2", "3"]
    assert [entry[TimingFields.JOB] for entry in entries] == [job.local for job in took.jobs]
    assert counters(r, keys)[CounterFields.TIMINGS] == 3


def test_settle_of_an_attempt_no_longer_active_changes_nothing(
    settings: Settings, r: redis.Redis, ops: QueueOps, keys: QueueKeys
) -> None:
    enqueue(settings, spec(), spec(), spec())
    took = take(ops, keys, 3)
    acked, reaped, live = took.jobs
    assert ops.settle(keys, [outcome(acked, Outcome.COMPLETED, took.now, took.now + 1)]) == []
    assert ops.reap_held([reaped.token], "test") == (1, 0)
    acked_before, reaped_before = record(r, keys, acked.local), record(r, keys, reaped.local)
    stale = [
        outcome(acked, Outcome.FAILED, took.now, took.now + 2, "E: stale"),
        outcome(reaped, Outcome.COMPLETED, took.now, took.now + 2),
        outcome(live, Outcome.COMPLETED, took.now, took.now + 2),
    ]
    # Only the attempt whose job is still active under its token is recorded; the others are named.
    assert ops.settle(keys, stale) == [acked.local.encode(), reaped.local.encode()]
    assert record(r, keys, acked.local) == acked_before
    assert record(r, keys, reaped.local) == reaped_before
    assert members(r, keys.failed) == []
    assert members(r, keys.waiting) == [reaped.local]
    assert set(members(r, keys.completed)) == {acked.local, live.local}
    # One stream entry per recorded attempt, numbered on.
    assert [(e[TimingFields.SEQ], e[TimingFields.JOB]) for e in stream(r, keys)] == [
        ("1", acked.local),
        ("2", live.local),
    ]
    assert counters(r, keys)[CounterFields.TIMINGS] == 2
    # A batch with nothing held writes no job and no entry.
    assert ops.settle(keys, stale[:2]) == [acked.local.encode(), reaped.local.encode()]
    assert len(stream(r, keys)) == 2
    assert counters(r, keys)[CounterFields.TOTAL_N] == 2


def test_settle_of_a_superseded_attempt_leaves_the_new_attempt_alone(
    settings: Settings, r: redis.Redis, ops: QueueOps, keys: QueueKeys
) -> None:
    enqueue(settings, spec())
    first = take(ops, keys, 1)
    # Its process died: reaped by its token, then taken again elsewhere.
    assert ops.reap_held([first.jobs[0].token], "test") == (1, 0)
    other = QueueOps(settings, r, OTHER)
    second = take(other, keys, 1)
    assert second.jobs[0].attempt == 2
    late = outcome(first.jobs[0], Outcome.COMPLETED, first.now, first.now + 1)
    assert ops.settle(keys, [late]) == [first.jobs[0].local.encode()]
    fields = record(r, keys, second.jobs[0].local)
    assert fields[JobFields.STATE] == b"ACTIVE"
    assert fields[JobFields.WORKER] == OTHER.encode()
    assert number(fields, JobFields.ATTEMPTS) == 2
    assert members(r, keys.active) == [second.jobs[0].local]
    assert members(r, keys.completed) == []
    assert stream(r, keys) == []


def test_a_settle_sent_three_times_counts_once(
    settings: Settings, r: redis.Redis, ops: QueueOps, keys: QueueKeys
) -> None:
    enqueue(settings, spec(), spec())
    took = take(ops, keys, 2)
    ok, broken = took.jobs
    batch = [
        outcome(ok, Outcome.COMPLETED, took.now + 1, took.now + 6),
        outcome(broken, Outcome.FAILED, took.now + 2, took.now + 40, "E: no"),
    ]
    assert ops.settle(keys, batch) == []
    recorded = {job.local: record(r, keys, job) for job in took.jobs}
    # Sent again twice, as a worker whose reply was lost sends it: nothing more is recorded, and
    # nothing is called stale (the attempts were recorded, by the first run).
    for _ in range(2):
        assert ops.settle(keys, batch) == []
    assert {job.local: record(r, keys, job) for job in took.jobs} == recorded
    assert figures(r, keys) == [minute_hash(batch)]
    totals = counters(r, keys)
    assert totals[CounterFields.TOTAL_N] == 2
    assert totals[CounterFields.TOTAL_COMPLETED] == totals[CounterFields.TOTAL_FAILED] == 1
    assert totals[CounterFields.TIMINGS] == 2
    assert [(e[TimingFields.JOB], e[TimingFields.OUTCOME]) for e in stream(r, keys)] == [
        (ok.local, "COMPLETED"),
        (broken.local, "FAILED"),
    ]
    assert members(r, keys.completed) == [ok.local]
    assert members(r, keys.failed) == [broken.local]


# Times (ms) across bucket edges: bucket 0 is [0, 1), bucket b >= 1 is [1.25^(b-1), 1.25^b).
BUCKET_MS = [0, 1, 2, 3, 4, 5, 6, 25, 125, 999, 1000, 1001, 123456, 10**7]


def test_the_scripts_bucket_times_as_timings_bucket(
    settings: Settings, r: redis.Redis, ops: QueueOps, keys: QueueKeys
) -> None:
    enqueue(settings, *[spec() for _ in BUCKET_MS])
    took = take(ops, keys, len(BUCKET_MS))
    # Attempt n waits BUCKET_MS[n] and runs BUCKET_MS[-1 - n]: every value in every histogram.
    batch = []
    for job, wait, proc in zip(took.jobs, BUCKET_MS, reversed(BUCKET_MS), strict=True):
        start = job.ready_at + wait
        batch.append(outcome(job, Outcome.COMPLETED, start, start + proc))
    assert ops.settle(keys, batch) == []
    (raw,) = figures(r, keys)
    assert raw == minute_hash(batch)
    totals = [wait + proc for wait, proc in zip(BUCKET_MS, reversed(BUCKET_MS), strict=True)]
    for kind, times in (("w", BUCKET_MS), ("p", BUCKET_MS), ("t", totals)):
        expected = Counter(f"{kind}:{bucket(ms)}" for ms in times)
        found = {name.decode(): int(count) for name, count in raw.items() if name.startswith(f"{kind}:".encode())}
        assert found == expected, kind


# -- FENCING: what a superseded holder can still send -----------------------------


def superseded(settings: Settings, r: redis.Redis, keys: QueueKeys) -> tuple[Held, Held]:
    """One job taken by WORKER (attempt 1), reaped when its lease ran out, then taken by OTHER
    (attempt 2): (WORKER's attempt, OTHER's attempt)."""
    enqueue(settings, spec(task="t.fenced"))
    (first,) = take(QueueOps(settings, r, WORKER), keys, 1).jobs
    expire(r, keys, first)
    # Nobody stamped WORKER's consumer: its expired lease is reaped.
    assert reaper(settings, r).reap_expired(keys, "its worker stopped renewing the lease") == (1, 0)
    # OTHER's lease is longer than the one a renewal sets, so a renewal of it would show.
    longer = replace(settings, stall_interval=settings.stall_interval * 2)
    (second,) = take(QueueOps(longer, r, OTHER), keys, 1).jobs
    assert (second.local, second.attempt, second.holder) == (first.local, 2, OTHER)
    return first, second


StaleCall = Callable[[Settings, redis.Redis, QueueKeys, Held], None]


def stale_settle_completed(settings: Settings, r: redis.Redis, keys: QueueKeys, job: Held) -> None:
    now = redis_now(r)
    done = outcome(job, Outcome.COMPLETED, now - 5, now)
    assert QueueOps(settings, r, WORKER).settle(keys, [done]) == [job.local.encode()]


def stale_settle_retry(settings: Settings, r: redis.Redis, keys: QueueKeys, job: Held) -> None:
    now = redis_now(r)
    following = next_attempt(decode_message(job.msg))
    assert following is not None
    retry = outcome(job, Outcome.RETRY, now - 5, now, "E: flaky", retry_msg=following[0])
    assert QueueOps(settings, r, WORKER).settle(keys, [retry]) == [job.local.encode()]


def stale_hand_back(settings: Settings, r: redis.Redis, keys: QueueKeys, job: Held) -> None:
    assert QueueOps(settings, r, WORKER).hand_back([job.token]) == 0


def stale_reap_held(settings: Settings, r: redis.Redis, keys: QueueKeys, job: Held) -> None:
    assert QueueOps(settings, r, CONSUMER).reap_held([job.token], "its worker process died") == (0, 0)


def stale_renew(settings: Settings, r: redis.Redis, keys: QueueKeys, job: Held) -> None:
    assert QueueOps(settings, r, CONSUMER).renew([job.token]) == {job.job_id}


@pytest.mark.parametrize(
    "stale_call",
    [
        pytest.param(stale_settle_completed, id="settle-completed"),
        pytest.param(stale_settle_retry, id="settle-retry"),
        pytest.param(stale_hand_back, id="hand-back"),
        pytest.param(stale_reap_held, id="reap-held"),
        pytest.param(stale_renew, id="renew"),
    ],
)
def test_a_superseded_holder_changes_nothing_and_the_new_one_settles(
    settings: Settings, r: redis.Redis, keys: QueueKeys, stale_call: StaleCall
) -> None:
    first, second = superseded(settings, r, keys)
    before = queue_state(r, keys, [first.local])
    assert before.sets["active"] == {first.local: before.sets["active"][first.local]}
    stale_call(settings, r, keys, first)
    assert queue_state(r, keys, [first.local]) == before
    fields = before.jobs[first.local]
    assert fields[JobFields.STATE] == b"ACTIVE"
    assert fields[JobFields.WORKER] == OTHER.encode()
    assert number(fields, JobFields.ATTEMPTS) == 2
    assert before.stream == []
    assert before.figures == {}
    assert CounterFields.TOTAL_N not in before.counters
    # The holder of the lease settles, and that is recorded.
    now = redis_now(r)
    done = outcome(second, Outcome.COMPLETED, now, now + 4)
    assert QueueOps(settings, r, OTHER).settle(keys, [done]) == []
    assert record(r, keys, second)[JobFields.STATE] == b"COMPLETED"
    assert members(r, keys.active) == []
    assert members(r, keys.completed) == [second.local]
    (entry,) = stream(r, keys)
    assert (entry[TimingFields.ATTEMPT], entry[TimingFields.WORKER], entry[TimingFields.TASK]) == (
        "2",
        OTHER,
        "t.fenced",
    )
    assert figures(r, keys) == [minute_hash([done])]
    totals = counters(r, keys)
    assert (totals[CounterFields.TOTAL_N], totals[CounterFields.TOTAL_COMPLETED]) == (1, 1)
    assert totals[CounterFields.STALLED] == 1


# -- PROMOTE ----------------------------------------------------------------------


def test_promote_moves_due_delayed_jobs_to_the_back_of_waiting(
    settings: Settings, r: redis.Redis, ops: QueueOps, keys: QueueKeys
) -> None:
    emails = QueueKeys(settings.key_prefix, "emails")
    (ahead,) = enqueue(settings, spec())
    soon, soon2, later, soon_email = enqueue(
        settings, spec(delay_ms=30), spec(delay_ms=30), spec(delay_ms=60_000), spec("emails", delay_ms=30)
    )
    (behind_in_band_below,) = enqueue(settings, spec(priority=-1))
    assert set(members(r, keys.delayed)) == {local(soon), local(soon2), local(later)}
    time.sleep(0.06)
    # At most `max_moved` per call.
    moved = ops.scripts.promote(keys=[keys.delayed, keys.waiting, keys.counters], args=[keys.job_prefix, 1])
    assert moved == 1
    ops.promote()
    assert members(r, keys.delayed) == [local(later)]
    waiting = members(r, keys.waiting)
    assert waiting[0] == local(ahead)
    assert set(waiting[1:3]) == {local(soon), local(soon2)}
    assert waiting[3] == local(behind_in_band_below)
    assert members(r, emails.waiting) == [local(soon_email)]
    assert members(r, emails.delayed) == []
    promoted = record(r, keys, local(soon))
    assert promoted[JobFields.STATE] == b"WAITING"
    assert number(promoted, JobFields.READY_AT) >= number(promoted, JobFields.DUE_AT)
    assert number(promoted, JobFields.SEQ) > number(record(r, keys, local(behind_in_band_below)), JobFields.SEQ)
    assert record(r, keys, local(later))[JobFields.STATE] == b"DELAYED"
    # Nothing else is due.
    assert ops.scripts.promote(keys=[keys.delayed, keys.waiting, keys.counters], args=[keys.job_prefix, 10]) == 0


# -- RENEW ------------------------------------------------------------------------


def test_renew_extends_held_leases_stamps_the_consumer_and_names_the_lost(
    settings: Settings, r: redis.Redis, ops: QueueOps, keys: QueueKeys
) -> None:
    emails = QueueKeys(settings.key_prefix, "emails")
    consumer = QueueOps(settings, r, CONSUMER)
    stall_ms = int(settings.stall_interval * 1000)
    held, acked, waiting = enqueue(settings, spec(), spec(), spec(priority=-1))
    enqueue(settings, spec("emails"))
    took = take(ops, keys, 2)
    kept, done = took.jobs
    assert (kept.local, done.local) == (local(held), local(acked))
    (email,) = take(ops, emails, 1).jobs
    assert ops.settle(keys, [outcome(done, Outcome.COMPLETED, took.now, took.now)]) == []
    before = scores(r, keys.active)[kept.local]
    email_before = scores(r, emails.active)[email.local]
    r.zadd(keys.consumers, {"gone:1": took.now - 10 * stall_ms - 1000, "quiet:1": took.now - 9 * stall_ms})
    time.sleep(0.02)
    # A token that no longer holds (another attempt, another holder) renews nothing.
    wrong = [Token(kept.job_id, 2, WORKER), Token(kept.job_id, 1, OTHER)]
    assert consumer.renew(wrong) == {kept.job_id}
    assert scores(r, keys.active)[kept.local] == before
    # Several queues in one round trip; acked and never-taken jobs are lost and never re-added.
    lost = consumer.renew([kept.token, email.token, done.token, Token(waiting.job_id, 1, WORKER)])
    assert lost == {done.job_id, waiting.job_id}
    after = scores(r, keys.active)
    assert set(after) == {kept.local}
    assert before + 20 <= after[kept.local] <= redis_now(r) + consumer.lease_ms
    assert scores(r, emails.active)[email.local] > email_before
    assert members(r, keys.waiting) == [local(waiting)]
    assert record(r, keys, acked)[JobFields.STATE] == b"COMPLETED"
    # The consumer is stamped on every queue; one silent for ten stall intervals is forgotten.
    stamped = scores(r, keys.consumers)
    assert set(stamped) == {CONSUMER, "quiet:1"}
    # Stamped on the Redis clock of the renewal.
    assert stamped[CONSUMER] == after[kept.local] - consumer.lease_ms
    assert set(scores(r, emails.consumers)) == {CONSUMER}
    # A renewal of nothing still stamps.
    time.sleep(0.002)
    assert consumer.renew([]) == set()
    assert scores(r, keys.consumers)[CONSUMER] > stamped[CONSUMER]


# -- REAP -------------------------------------------------------------------------


def test_reap_returns_expired_leases_to_where_they_stood(
    settings: Settings, r: redis.Redis, ops: QueueOps, keys: QueueKeys
) -> None:
    first, second, third = enqueue(settings, spec(), spec(), spec())
    original = scores(r, keys.waiting)
    take(ops, keys, 2)
    expire(r, keys, first)
    # Only the expired lease: the other one is still running.
    assert reaper(settings, r).reap_expired(keys, "lease expired") == (1, 0)
    assert scores(r, keys.waiting) == {local(first): original[local(first)], local(third): original[local(third)]}
    assert members(r, keys.waiting)[0] == local(first)
    assert members(r, keys.active) == [local(second)]
    fields = record(r, keys, local(first))
    assert fields[JobFields.STATE] == b"WAITING"
    assert number(fields, JobFields.STALLS) == 1
    # The stalled attempt stays counted.
    assert number(fields, JobFields.ATTEMPTS) == 1
    assert counters(r, keys)[CounterFields.STALLED] == 1
    # Requeued, not finished: no timings entry, no figures.
    assert stream(r, keys) == []
    assert figures(r, keys) == []
    # Run again: nothing is expired any more.
    assert reaper(settings, r).reap_expired(keys, "lease expired") == (0, 0)
    assert counters(r, keys)[CounterFields.STALLED] == 1


def test_the_reaper_spares_the_recent_expiry_of_a_consumer_that_renews(
    settings: Settings, r: redis.Redis, ops: QueueOps, keys: QueueKeys
) -> None:
    """The window is one lease (lua.REAP): a consumer that renewed within a lease keeps a job whose
    lease ran out less than a lease ago. Each side is pinned 500 ms from the edge (a lease here is
    3.75 s, a stall interval 5 s)."""
    lease_ms = ops.lease_ms
    assert lease_ms + 500 < settings.stall_interval * 1000
    enqueue(settings, spec(), spec())
    (mine,) = take(ops, keys, 1).jobs
    (theirs,) = take(QueueOps(settings, r, OTHER), keys, 1).jobs
    # WORKER's consumer renews (with nothing to renew: it only stamps); OTHER's does not.
    QueueOps(settings, r, CONSUMER).renew([])
    expire(r, keys, mine, lease_ms - 500)
    expire(r, keys, theirs, lease_ms - 500)
    assert reaper(settings, r).reap_expired(keys, "test") == (1, 0)
    assert members(r, keys.active) == [mine.local]
    assert record(r, keys, theirs)[JobFields.STATE] == b"WAITING"
    # Its lease ran out more than a lease ago: reaped, renewing consumer or not.
    expire(r, keys, mine, lease_ms + 500)
    assert reaper(settings, r).reap_expired(keys, "test") == (1, 0)
    assert members(r, keys.active) == []
    # A consumer stamp older than a lease protects nothing either.
    (again,) = take(ops, keys, 1).jobs
    r.zadd(keys.consumers, {CONSUMER: redis_now(r) - lease_ms - 500})
    expire(r, keys, again, 1)
    assert reaper(settings, r).reap_expired(keys, "test") == (1, 0)
    assert members(r, keys.active) == []
    assert counters(r, keys)[CounterFields.STALLED] == 3


def test_reap_fails_a_job_stalled_more_than_max_stalls(settings: Settings, r: redis.Redis, keys: QueueKeys) -> None:
    ops = QueueOps(replace(settings, max_stalls=1), r, WORKER)
    (job,) = enqueue(settings, spec())
    (first,) = take(ops, keys, 1).jobs
    # By token: whatever its lease says.
    assert ops.reap_held([first.token], "worker died") == (1, 0)
    took = take(ops, keys, 1)
    (second,) = took.jobs
    assert ops.reap_held([second.token], "worker died") == (0, 1)
    assert members(r, keys.active) == members(r, keys.waiting) == []
    assert list(scores(r, keys.failed)) == [local(job)]
    assert scores(r, keys.failed)[local(job)] >= took.now
    fields = record(r, keys, local(job))
    assert fields[JobFields.STATE] == b"FAILED"
    assert fields[JobFields.ERROR] == b"stalled 2 times (worker died)"
    assert counters(r, keys)[CounterFields.STALLED] == 2
    (entry,) = stream(r, keys)
    assert (entry[TimingFields.OUTCOME], entry[TimingFields.ATTEMPT], entry[TimingFields.WORKER]) == (
        "FAILED",
        "2",
        WORKER,
    )
    assert entry[TimingFields.ERROR] == "stalled 2 times (worker died)"
    assert counters(r, keys)[CounterFields.TOTAL_FAILED] == 1


def test_the_reaper_fails_an_expired_job_past_max_stalls_with_its_timings_and_figures(
    settings: Settings, r: redis.Redis, ops: QueueOps, keys: QueueKeys
) -> None:
    strict = QueueOps(replace(settings, max_stalls=0), r, "host-r:300")
    enqueue(settings, spec(task="t.stuck"))
    took = take(ops, keys, 1)
    (job,) = took.jobs
    expire(r, keys, job)
    reason = "its worker stopped renewing the lease"
    assert strict.reap_expired(keys, reason) == (0, 1)
    fields = record(r, keys, job)
    error = f"stalled 1 times ({reason})"
    assert fields[JobFields.STATE] == b"FAILED"
    assert fields[JobFields.ERROR] == error.encode()
    finished = number(fields, JobFields.FINISHED_AT)
    assert scores(r, keys.failed) == {job.local: finished}
    assert members(r, keys.active) == members(r, keys.waiting) == []
    assert stream(r, keys) == [
        {
            TimingFields.SEQ: "1",
            TimingFields.JOB: job.local,
            TimingFields.TASK: "t.stuck",
            TimingFields.OUTCOME: "FAILED",
            TimingFields.ATTEMPT: "1",
            TimingFields.WAIT: str(took.now - job.ready_at),
            TimingFields.PROC: str(finished - took.now),
            TimingFields.START: str(took.now),
            TimingFields.FINISH: str(finished),
            TimingFields.WORKER: WORKER,
            TimingFields.ERROR: error,
        }
    ]
    totals = counters(r, keys)
    assert (totals[CounterFields.TOTAL_N], totals[CounterFields.TOTAL_FAILED]) == (1, 1)
    assert (totals[CounterFields.STALLED], totals[CounterFields.TIMINGS]) == (1, 1)
    attempt = Attempt(job.local, "t.stuck", Outcome.FAILED, 1, job.ready_at, took.now, finished, WORKER, error)
    assert figures(r, keys) == [minute_hash([attempt])]


def test_reap_by_token_ignores_a_job_not_in_active(
    settings: Settings, r: redis.Redis, ops: QueueOps, keys: QueueKeys
) -> None:
    (job,) = enqueue(settings, spec())
    score = scores(r, keys.waiting)[local(job)]
    tokens = [Token(job.job_id, 1, WORKER), Token(f"default:{GHOST}", 1, WORKER)]
    assert ops.reap_held(tokens, "test") == (0, 0)
    assert scores(r, keys.waiting) == {local(job): score}
    assert JobFields.STALLS not in record(r, keys, local(job))
    assert record(r, keys, GHOST) == {}
    assert CounterFields.STALLED not in counters(r, keys)


# -- HAND_BACK --------------------------------------------------------------------


def test_hand_back_returns_jobs_uncounted(settings: Settings, r: redis.Redis, ops: QueueOps, keys: QueueKeys) -> None:
    emails = QueueKeys(settings.key_prefix, "emails")
    jobs = enqueue(settings, spec(), spec(), spec())
    enqueue(settings, spec("emails"))
    original = scores(r, keys.waiting)
    took = take(ops, keys, 2)
    (email,) = take(ops, emails, 1).jobs
    # The third job is still waiting: ignored.
    tokens = [*(job.token for job in took.jobs), Token(jobs[2].job_id, 1, WORKER), email.token]
    assert ops.hand_back(tokens) == 3
    assert scores(r, keys.waiting) == original
    assert members(r, keys.active) == members(r, emails.active) == []
    assert members(r, emails.waiting) == [email.local]
    for job in jobs:
        fields = record(r, keys, local(job))
        assert fields[JobFields.STATE] == b"WAITING"
        assert number(fields, JobFields.ATTEMPTS) == 0
        assert JobFields.STALLS not in fields
    assert CounterFields.STALLED not in counters(r, keys)
    # Nothing is active any more: a second hand-back changes nothing.
    assert ops.hand_back([took.jobs[0].token]) == 0
    assert number(record(r, keys, local(jobs[0])), JobFields.ATTEMPTS) == 0
    # The next take is attempt 1 again.
    assert [job.attempt for job in take(ops, keys, 3).jobs] == [1, 1, 1]


# -- RETRY_FAILED -----------------------------------------------------------------


def test_retry_failed_moves_only_failed_jobs_with_a_fresh_message(
    settings: Settings, r: redis.Redis, ops: QueueOps, keys: QueueKeys
) -> None:
    job, waiting = enqueue(
        settings, spec(payload={"k": 1}, max_attempts=3, retry_delay=2.0, retry_backoff=2.0), spec(priority=-1)
    )
    # Attempt 1 retries with the next message, attempt 2 fails for good.
    first = take(ops, keys, 1).jobs[0]
    following = next_attempt(decode_message(first.msg))
    assert following is not None
    ops.settle(
        keys, [outcome(first, Outcome.RETRY, first.ready_at, first.ready_at + 1, "E: 1", retry_msg=following[0])]
    )
    second = take(ops, keys, 1).jobs[0]
    ops.settle(keys, [outcome(second, Outcome.FAILED, second.ready_at, second.ready_at + 1, "E: 2")])
    spent = decode_message(record(r, keys, local(job))[JobFields.MSG])
    assert (spent["retries"], spent["retry_delay"]) == (1, 4.0)
    unknown = f"default:{GHOST}"

    retried = with_producer(
        settings, lambda producer: producer.retry_failed("default", [job.job_id, waiting.job_id, unknown], "", 0)
    )
    assert retried.job_ids == [job.job_id]
    assert retried.not_failed == [waiting.job_id]
    assert retried.not_found == [unknown]
    assert members(r, keys.failed) == []
    assert members(r, keys.waiting) == [local(job), local(waiting)]
    fields = record(r, keys, local(job))
    assert fields[JobFields.STATE] == b"WAITING"
    assert number(fields, JobFields.ATTEMPTS) == 0
    assert number(fields, JobFields.STALLS) == 0
    assert fields[JobFields.ERROR] == b""
    for gone in (JobFields.STARTED_AT, JobFields.FINISHED_AT, JobFields.WORKER):
        assert gone not in fields
    fresh = decode_message(fields[JobFields.MSG])
    assert fresh["payload"] == {"k": 1}
    assert (fresh["retries"], fresh["retry_delay"]) == (2, 2.0)
    # The script moves a job only from the failed set: a repeat moves nothing.
    args = [keys.job_prefix, local(job), b"other", local(waiting), b"other"]
    assert ops.scripts.retry_failed(keys=[keys.failed, keys.waiting, keys.counters], args=args) == []
    assert record(r, keys, local(job))[JobFields.MSG] == fields[JobFields.MSG]


def test_retry_failed_moves_a_job_once_and_to_the_back(
    settings: Settings, r: redis.Redis, ops: QueueOps, keys: QueueKeys
) -> None:
    (job,) = enqueue(settings, spec(max_attempts=1))
    took = take(ops, keys, 1).jobs[0]
    ops.settle(keys, [outcome(took, Outcome.FAILED, took.ready_at, took.ready_at + 1, "E")])
    (newer,) = enqueue(settings, spec())
    script_keys = [keys.failed, keys.waiting, keys.counters]
    args = [keys.job_prefix, local(job), took.msg]
    assert ops.scripts.retry_failed(keys=script_keys, args=args) == [local(job).encode()]
    assert ops.scripts.retry_failed(keys=script_keys, args=args) == []
    # Back of its band, as a new job would be.
    assert members(r, keys.waiting) == [local(newer), local(job)]


# -- HEARTBEAT --------------------------------------------------------------------


def test_heartbeat_writes_the_registry_entry_with_a_ttl(settings: Settings, r: redis.Redis, ops: QueueOps) -> None:
    service = ServiceKeys(settings.key_prefix)
    script_keys = [service.workers, service.worker("w-1")]
    before = redis_now(r)
    now = int(ops.scripts.heartbeat(keys=script_keys, args=["w-1", 7, "host", "h1", "busy", 2]))
    assert before <= now <= redis_now(r)
    assert scores(r, service.workers) == {"w-1": now}
    raw = cast(dict[bytes, bytes], r.hgetall(service.worker("w-1")))
    assert raw == {b"heartbeat_at": str(now).encode(), b"host": b"h1", b"busy": b"2"}
    assert 0 < r.ttl(service.worker("w-1")) <= 7
    time.sleep(0.005)
    # Through QueueOps: this worker's id, a TTL of three stall intervals (at least 3 s).
    ops.heartbeat({WorkerFields.HOST: "h2", WorkerFields.BUSY: 0})
    entries = scores(r, service.workers)
    assert set(entries) == {"w-1", WORKER}
    assert entries[WORKER] > now
    mine = cast(dict[bytes, bytes], r.hgetall(service.worker(WORKER)))
    assert mine == {b"heartbeat_at": str(entries[WORKER]).encode(), b"host": b"h2", b"busy": b"0"}
    ttl = r.ttl(service.worker(WORKER))
    assert max(3, int(settings.stall_interval * 3)) - 2 <= ttl <= max(3, int(settings.stall_interval * 3))
    # A later beat moves the score and keeps the fields it does not name.
    time.sleep(0.005)
    ops.heartbeat({WorkerFields.BUSY: 1})
    assert scores(r, service.workers)[WORKER] > entries[WORKER]
    mine = cast(dict[bytes, bytes], r.hgetall(service.worker(WORKER)))
    assert (mine[b"host"], mine[b"busy"]) == (b"h2", b"1")
    ops.leave_registry()
    assert set(scores(r, service.workers)) == {"w-1"}
    assert r.exists(service.worker(WORKER)) == 0
