"""QueueStorage, driven the way Huey's worker loop drives it, in the test process: no consumer,
no worker processes. Jobs come from `Producer`; what the storage did is read back from Redis.
Where a lease is lost, the test plays the other parties (a reaper, another worker, the supervisor)."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, cast

import pytest
import redis

from queueservice_server.core.codec import decode_message, encode_message, next_attempt
from queueservice_server.core.keys import CounterFields, JobFields, QueueKeys, TimingFields
from queueservice_server.core.timings import Outcome
from queueservice_server.settings import Settings
from queueservice_server.worker.queue_ops import QueueOps
from queueservice_server.worker.slots import Slot
from queueservice_server.worker.storage import FLUSH_AFTER, QueueStorage
from queueservice_server.worker.supervisor import Supervisor
from tests.integration import lifecycle_support as support
from tests.integration.lifecycle_support import (
    GHOST,
    OTHER,
    Held,
    expire,
    job_ids,
    local,
    lost_ids,
    members,
    new_slot,
    number,
    outcome,
    record,
    redis_now,
    scores,
    state,
    stream,
    take,
)
from tests.proxy import FaultProxy

MakeStorage = Callable[..., QueueStorage]
STORAGE_LOG = "queueservice_server.worker.storage"
NOT_RECORDED = "outcome not recorded: this worker's lease on the job was lost (it was reaped)"
LOST_BEFORE_START = "lease lost before the job started; not running it"

# Shared fixtures (lifecycle_support): a client of the test's Redis, and the default queue's keys.
r = support.r
keys = support.keys


# -- helpers ---------------------------------------------------------------------


@pytest.fixture
def make_storage(settings: Settings) -> Iterator[MakeStorage]:
    """QueueStorage as QueueHuey builds it (name, settings, redis_url), closed at the end."""
    made: list[QueueStorage] = []

    def make(redis_url: str = "", **overrides: Any) -> QueueStorage:
        storage = QueueStorage(
            "queueservice", settings=replace(settings, **overrides), redis_url=redis_url or settings.redis_url
        )
        made.append(storage)
        return storage

    yield make
    for storage in made:
        storage.close()


@contextlib.contextmanager
def supervising(settings: Settings, slot: Slot) -> Iterator[Supervisor]:
    """The consumer parent's Supervisor over this process's slot (its client closed after)."""
    supervisor = Supervisor(settings, settings.redis_url, [slot])
    try:
        yield supervisor
    finally:
        supervisor.core.client.close()


def popped_id(storage: QueueStorage) -> str:
    assert storage.popped is not None
    return storage.popped.job_id


def run_one(storage: QueueStorage) -> str:
    """One quick attempt, as Huey runs it: dequeue, pre-execute, post-execute."""
    assert storage.dequeue() is not None
    job_id = popped_id(storage)
    storage.started(job_id, None)
    storage.completed(job_id)
    return job_id


def warm_up(storage: QueueStorage, settings: Settings, r: redis.Redis, keys: QueueKeys) -> None:
    """Runs a dozen quick jobs, so the storage sizes its takes up to `prefetch`, and settles them."""
    warm = job_ids(settings, 12)
    for _ in warm:
        run_one(storage)
    assert storage.dequeue() is None
    assert all(state(r, keys, job_id) == "COMPLETED" for job_id in warm)


def take_over(settings: Settings, r: redis.Redis, keys: QueueKeys, job_id: str) -> Held:
    """What happens to a job whose holder stopped renewing: its lease runs out, a reaper returns
    it, another worker takes it (attempt 2)."""
    expire(r, keys, job_id)
    assert QueueOps(settings, r, "host-r:300").reap_expired(keys, "test") == (1, 0)
    (theirs,) = take(QueueOps(settings, r, OTHER), keys, 1).jobs
    assert (theirs.job_id, theirs.attempt) == (job_id, 2)
    return theirs


def warned(caplog: pytest.LogCaptureFixture, message: str) -> list[str]:
    """The job ids of the storage's warnings with this message."""
    return [
        getattr(rec, "job_id", "")
        for rec in caplog.records
        if rec.name == STORAGE_LOG and rec.levelno == logging.WARNING and rec.getMessage() == message
    ]


# -- taking ----------------------------------------------------------------------


def test_dequeue_takes_a_job_into_active_and_returns_its_message(
    settings: Settings, make_storage: MakeStorage, r: redis.Redis, keys: QueueKeys
) -> None:
    storage = make_storage()
    first, second = job_ids(settings, 2)
    msg = storage.dequeue()
    assert msg == record(r, keys, first)[JobFields.MSG]
    assert decode_message(msg)["payload"] == {"n": 0}
    assert popped_id(storage) == first
    assert storage.popped is not None
    assert storage.popped.task == "t.work"
    assert storage.popped.attempt == 1
    # The first take assumes slow jobs: one at a time.
    assert members(r, keys.active) == [local(first)]
    assert members(r, keys.waiting) == [local(second)]
    fields = record(r, keys, first)
    assert fields[JobFields.STATE] == b"ACTIVE"
    assert fields[JobFields.WORKER].decode() == f"{socket.gethostname()}:{os.getppid()}:{os.getpid()}"


def test_quick_jobs_grow_takes_up_to_prefetch_and_the_buffer_serves_them_one_by_one(
    settings: Settings, make_storage: MakeStorage, r: redis.Redis, keys: QueueKeys
) -> None:
    storage = make_storage(prefetch=4)
    enqueued = job_ids(settings, 20)
    served: list[str] = []
    taken: list[int] = []
    for _ in enqueued:
        waiting_before = int(r.zcard(keys.waiting))
        served.append(run_one(storage))
        taken.append(waiting_before - int(r.zcard(keys.waiting)))
    assert served == enqueued
    assert sum(taken) == len(enqueued)
    assert taken[0] == 1
    assert max(taken) == 4
    # A dequeue served from the buffer took nothing.
    assert 0 in taken
    assert storage.dequeue() is None
    assert all(state(r, keys, job_id) == "COMPLETED" for job_id in enqueued)


def test_dequeue_takes_the_queues_in_configured_order(
    settings: Settings, make_storage: MakeStorage, r: redis.Redis
) -> None:
    storage = make_storage()
    (email,) = job_ids(settings, 1, queue="emails")
    (default,) = job_ids(settings, 1)
    assert run_one(storage) == default
    assert run_one(storage) == email
    assert storage.dequeue() is None
    assert state(r, QueueKeys(settings.key_prefix, "emails"), email) == "COMPLETED"


def test_dequeue_under_an_exhausted_rate_limit_returns_nothing_and_takes_nothing(
    settings: Settings, make_storage: MakeStorage, r: redis.Redis, keys: QueueKeys
) -> None:
    storage = make_storage(rate_limit_max=1, rate_limit_window=60.0)
    first, second = job_ids(settings, 2)
    assert run_one(storage) == first
    # This round trip settles the first job; the take finds no token.
    assert storage.dequeue() is None
    assert state(r, keys, first) == "COMPLETED"
    assert members(r, keys.waiting) == [local(second)]
    assert storage.dequeue() is None
    assert members(r, keys.active) == []


def test_a_queue_at_its_rate_limit_does_not_stall_the_next_queue(
    settings: Settings, make_storage: MakeStorage, r: redis.Redis, keys: QueueKeys
) -> None:
    emails = QueueKeys(settings.key_prefix, "emails")
    storage = make_storage(rate_limit_max=1, rate_limit_window=60.0)
    first, held_up = job_ids(settings, 2)
    assert run_one(storage) == first
    (email,) = job_ids(settings, 1, queue="emails")
    # The default queue has a job waiting but no token: it is skipped, and the next queue served.
    assert storage.dequeue() is not None
    assert popped_id(storage) == email
    assert state(r, keys, first) == "COMPLETED"
    assert members(r, keys.waiting) == [local(held_up)]
    storage.started(email, None)
    storage.completed(email)
    # The limit is per queue: now both are at it. Nothing is taken; the outcome is written all the same.
    (email2,) = job_ids(settings, 1, queue="emails")
    assert storage.dequeue() is None
    assert state(r, emails, email) == "COMPLETED"
    assert members(r, keys.waiting) == [local(held_up)]
    assert members(r, emails.waiting) == [local(email2)]
    assert members(r, keys.active) == members(r, emails.active) == []


# -- outcomes --------------------------------------------------------------------


def test_completed_is_written_with_the_next_take(
    settings: Settings, make_storage: MakeStorage, r: redis.Redis, keys: QueueKeys
) -> None:
    storage = make_storage()
    first, second = job_ids(settings, 2)
    assert run_one(storage) == first
    # Buffered, not written yet.
    assert state(r, keys, first) == "ACTIVE"
    assert members(r, keys.active) == [local(first)]
    assert stream(r, keys) == []
    storage.dequeue()
    assert popped_id(storage) == second
    # One round trip: the ack of the first and the take of the second.
    assert state(r, keys, first) == "COMPLETED"
    assert members(r, keys.completed) == [local(first)]
    assert members(r, keys.active) == [local(second)]
    (entry,) = stream(r, keys)
    assert entry[TimingFields.JOB] == local(first)
    assert entry[TimingFields.OUTCOME] == "COMPLETED"
    assert entry[TimingFields.ATTEMPT] == "1"
    assert entry[TimingFields.WORKER] == storage.core.worker_id
    assert int(entry[TimingFields.FINISH]) >= int(entry[TimingFields.START])
    assert int(cast(bytes, r.hget(keys.counters, CounterFields.TOTAL_COMPLETED))) == 1


def test_outcomes_wait_at_most_flush_after_while_the_buffer_serves(
    settings: Settings, make_storage: MakeStorage, r: redis.Redis, keys: QueueKeys
) -> None:
    storage = make_storage(prefetch=4)
    warm_up(storage, settings, r, keys)
    a, b, c = job_ids(settings, 3)
    assert run_one(storage) == a
    # The whole batch was taken at once.
    assert set(members(r, keys.active)) == {local(a), local(b), local(c)}
    storage.dequeue()
    assert popped_id(storage) == b
    assert state(r, keys, a) == "ACTIVE"
    time.sleep(FLUSH_AFTER + 0.02)
    storage.dequeue()
    assert popped_id(storage) == c
    assert state(r, keys, a) == "COMPLETED"
    assert set(members(r, keys.active)) == {local(b), local(c)}


def test_failed_and_reject_record_the_error(
    settings: Settings, make_storage: MakeStorage, r: redis.Redis, keys: QueueKeys
) -> None:
    storage = make_storage()
    first, second = job_ids(settings, 2)
    storage.dequeue()
    storage.started(first, None)
    storage.failed(first, "ValueError: disk on fire")
    storage.dequeue()
    assert popped_id(storage) == second
    assert state(r, keys, first) == "FAILED"
    assert record(r, keys, first)[JobFields.ERROR] == b"ValueError: disk on fire"
    # The job just taken cannot run: it fails with the reason, never started.
    storage.reject("cannot run this job: KeyError: 'no.such.task'")
    assert state(r, keys, second) == "ACTIVE"
    storage.shut_down()
    assert state(r, keys, second) == "FAILED"
    assert record(r, keys, second)[JobFields.ERROR] == b"cannot run this job: KeyError: 'no.such.task'"
    # Both fail within a millisecond or two: the failed set's order may tie, its members may not.
    assert sorted(members(r, keys.failed)) == sorted([local(first), local(second)])
    assert members(r, keys.active) == members(r, keys.waiting) == []
    assert [entry[TimingFields.OUTCOME] for entry in stream(r, keys)] == ["FAILED", "FAILED"]


def test_a_retry_without_delay_goes_back_to_waiting_with_its_error(
    settings: Settings, make_storage: MakeStorage, r: redis.Redis, keys: QueueKeys
) -> None:
    storage = make_storage()
    (job_id,) = job_ids(settings, 1)
    storage.dequeue()
    storage.started(job_id, None)
    next_msg = encode_message(payload={"n": 0}, retries=1, retry_delay=0, retry_backoff=0, timeout=None)
    # Huey's post-execute hook leaves the error, then re-enqueues the task.
    storage.pending_errors[job_id] = ("RuntimeError: flaky", Outcome.RETRY)
    storage.enqueue(next_msg)
    assert state(r, keys, job_id) == "ACTIVE"
    storage.shut_down()
    fields = record(r, keys, job_id)
    assert fields[JobFields.STATE] == b"WAITING"
    assert fields[JobFields.MSG] == next_msg
    assert fields[JobFields.ERROR] == b"RuntimeError: flaky"
    assert members(r, keys.waiting) == [local(job_id)]
    assert storage.pending_errors == {}
    (entry,) = stream(r, keys)
    assert (entry[TimingFields.OUTCOME], entry[TimingFields.ERROR]) == ("RETRY", "RuntimeError: flaky")
    # The next take is its second attempt.
    storage.dequeue()
    assert storage.popped is not None
    assert storage.popped.attempt == 2


def test_a_timed_out_attempt_is_recorded_as_timed_out(
    settings: Settings, make_storage: MakeStorage, r: redis.Redis, keys: QueueKeys
) -> None:
    storage = make_storage()
    retried, spent = job_ids(settings, 2)
    storage.dequeue()
    storage.started(retried, 1)
    next_msg = encode_message(payload={"n": 0}, retries=0, retry_delay=0, retry_backoff=0, timeout=1)
    # A soft timeout with an attempt left: Huey re-enqueues it.
    storage.pending_errors[retried] = ("TaskTimeout: timeout (1s)", Outcome.TIMED_OUT)
    storage.enqueue(next_msg)
    storage.dequeue()
    assert popped_id(storage) == spent
    storage.started(spent, 1)
    # With no attempt left it fails, still recorded as timed out.
    storage.failed(spent, "TaskTimeout: timeout (1s)", Outcome.TIMED_OUT)
    storage.shut_down()
    assert state(r, keys, retried) == "WAITING"
    assert record(r, keys, retried)[JobFields.MSG] == next_msg
    assert state(r, keys, spent) == "FAILED"
    assert record(r, keys, spent)[JobFields.ERROR] == b"TaskTimeout: timeout (1s)"
    entries = stream(r, keys)
    assert [(e[TimingFields.JOB], e[TimingFields.OUTCOME]) for e in entries] == [
        (local(retried), "TIMED_OUT"),
        (local(spent), "TIMED_OUT"),
    ]
    totals = cast(dict[bytes, bytes], r.hgetall(keys.counters))
    assert int(totals[CounterFields.TOTAL_RETRIED.encode()]) == 1
    assert int(totals[CounterFields.TOTAL_FAILED.encode()]) == 1


def test_a_retry_with_backoff_waits_in_delayed(
    settings: Settings, make_storage: MakeStorage, r: redis.Redis, keys: QueueKeys
) -> None:
    storage = make_storage()
    (job_id,) = job_ids(settings, 1)
    storage.dequeue()
    storage.started(job_id, None)
    next_msg = encode_message(payload={"n": 0}, retries=1, retry_delay=60, retry_backoff=2, timeout=None)
    # Huey's schedule time: naive UTC, on this host's clock.
    due = datetime.datetime.now(datetime.UTC).replace(tzinfo=None) + datetime.timedelta(seconds=30)
    storage.add_to_schedule(next_msg, due)
    storage.shut_down()
    fields = record(r, keys, job_id)
    assert fields[JobFields.STATE] == b"DELAYED"
    assert fields[JobFields.MSG] == next_msg
    due_ms = scores(r, keys.delayed)[local(job_id)]
    assert abs(due_ms - (int(fields[JobFields.FINISHED_AT]) + 30_000)) < 1000
    assert int(fields[JobFields.DUE_AT]) == due_ms
    assert members(r, keys.waiting) == members(r, keys.active) == []


def test_shut_down_acks_what_finished_and_hands_back_the_unstarted_buffer(
    settings: Settings, make_storage: MakeStorage, r: redis.Redis, keys: QueueKeys
) -> None:
    storage = make_storage(prefetch=4)
    slot = new_slot(10)
    storage.slot = slot
    warm_up(storage, settings, r, keys)
    batch = job_ids(settings, 4)
    original = scores(r, keys.waiting)
    assert run_one(storage) == batch[0]
    assert {token.job_id for token in slot.held()} == set(batch)
    storage.shut_down()
    assert state(r, keys, batch[0]) == "COMPLETED"
    assert members(r, keys.active) == []
    assert scores(r, keys.waiting) == {local(job_id): original[local(job_id)] for job_id in batch[1:]}
    for job_id in batch[1:]:
        fields = record(r, keys, job_id)
        assert fields[JobFields.STATE] == b"WAITING"
        assert int(fields[JobFields.ATTEMPTS]) == 0
    assert r.hget(keys.counters, CounterFields.STALLED) is None
    assert slot.held() == []


def test_hand_back_of_an_interrupted_attempt(
    settings: Settings, make_storage: MakeStorage, r: redis.Redis, keys: QueueKeys
) -> None:
    storage = make_storage()
    slot = new_slot(4)
    storage.slot = slot
    (job_id,) = job_ids(settings, 1)
    storage.dequeue()
    storage.started(job_id, 10)
    assert slot.running() is not None
    storage.hand_back(job_id)
    assert state(r, keys, job_id) == "WAITING"
    assert int(record(r, keys, job_id)[JobFields.ATTEMPTS]) == 0
    assert slot.running() is None
    assert slot.held() == []


def test_an_outcome_for_a_job_not_held_is_dropped_with_a_warning(
    settings: Settings, make_storage: MakeStorage, r: redis.Redis, keys: QueueKeys, caplog: pytest.LogCaptureFixture
) -> None:
    storage = make_storage()
    (job_id,) = job_ids(settings, 1)
    run_one(storage)
    storage.shut_down()
    assert state(r, keys, job_id) == "COMPLETED"
    caplog.set_level(logging.WARNING, logger="queueservice_server.worker.storage")
    storage.failed(job_id, "E: too late")
    storage.failed(f"default:{GHOST}", "E: never taken")
    dropped = [
        rec for rec in caplog.records if rec.getMessage() == "outcome of a job this worker does not hold was dropped"
    ]
    assert [getattr(rec, "job_id", None) for rec in dropped] == [job_id, f"default:{GHOST}"]
    assert all(rec.levelno == logging.WARNING for rec in dropped)
    storage.shut_down()
    assert storage.dequeue() is None
    assert state(r, keys, job_id) == "COMPLETED"
    assert members(r, keys.failed) == []
    assert len(stream(r, keys)) == 1


def test_the_slot_sees_held_tokens_and_the_running_job(
    settings: Settings, make_storage: MakeStorage, r: redis.Redis, keys: QueueKeys
) -> None:
    storage = make_storage(prefetch=4)
    slot = new_slot(10)
    storage.slot = slot
    warm_up(storage, settings, r, keys)
    assert slot.held() == []
    a, b, c = job_ids(settings, 3)
    storage.dequeue()
    held = slot.held()
    assert [token.job_id for token in held] == [a, b, c]
    # Each with the attempt and holder it is fenced by.
    assert {(token.attempt, token.holder) for token in held} == {(1, storage.core.worker_id)}
    storage.started(a, 10)
    running = slot.running()
    assert running is not None
    assert running.token == held[0]
    expected = time.monotonic() + 10 + settings.timeout_grace
    assert expected - 1 < running.hard_deadline <= expected
    storage.completed(a)
    assert slot.running() is None
    # Still held until Redis has the outcome.
    assert a in [token.job_id for token in slot.held()]
    storage.dequeue()
    storage.started(b, None)
    running = slot.running()
    assert running is not None
    assert running.token.job_id == b
    assert running.hard_deadline > time.monotonic() + settings.default_timeout
    storage.completed(b)
    time.sleep(FLUSH_AFTER + 0.02)
    storage.dequeue()
    # The flush took both outcomes; only the job just served is held.
    assert popped_id(storage) == c
    assert slot.held() == [held[2]]
    storage.completed(c)
    storage.shut_down()
    assert slot.held() == []
    assert all(state(r, keys, job_id) == "COMPLETED" for job_id in (a, b, c))


# -- leases lost, replies lost ---------------------------------------------------


def test_an_outcome_whose_lease_was_lost_is_not_recorded_and_said_once(
    settings: Settings, make_storage: MakeStorage, r: redis.Redis, keys: QueueKeys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=STORAGE_LOG)
    storage = make_storage()
    (job_id,) = job_ids(settings, 1)
    assert run_one(storage) == job_id
    # Before its outcome reached Redis, its lease ran out and another worker took it.
    take_over(settings, r, keys, job_id)
    taken_over = record(r, keys, job_id)
    assert storage.dequeue() is None
    assert record(r, keys, job_id) == taken_over
    assert taken_over[JobFields.STATE] == b"ACTIVE"
    assert taken_over[JobFields.WORKER] == OTHER.encode()
    assert number(taken_over, JobFields.ATTEMPTS) == 2
    assert stream(r, keys) == []
    assert warned(caplog, NOT_RECORDED) == [job_id]
    # It is pending no more: not sent, nor said, again.
    assert storage.dequeue() is None
    storage.shut_down()
    assert warned(caplog, NOT_RECORDED) == [job_id]
    assert record(r, keys, job_id) == taken_over


def test_a_buffered_job_whose_lease_was_lost_is_dropped_not_started(
    settings: Settings,
    make_storage: MakeStorage,
    r: redis.Redis,
    keys: QueueKeys,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=STORAGE_LOG)
    storage = make_storage(prefetch=4)
    slot = new_slot(10)
    storage.slot = slot
    warm_up(storage, settings, r, keys)
    a, b, c = job_ids(settings, 3)
    assert run_one(storage) == a
    # b and c wait in the buffer; c's lease is lost meanwhile, and the supervisor's renewal says so.
    take_over(settings, r, keys, c)
    with supervising(settings, slot) as supervisor:
        assert supervisor.tick([]) == []
    assert lost_ids(slot) == {c}
    assert run_one(storage) == b
    assert warned(caplog, LOST_BEFORE_START) == [c]
    assert c not in [token.job_id for token in slot.held()]
    assert storage.dequeue() is None
    storage.shut_down()
    assert state(r, keys, a) == state(r, keys, b) == "COMPLETED"
    # c is the other worker's, untouched: never run here, nor handed back.
    fields = record(r, keys, c)
    assert (fields[JobFields.STATE], fields[JobFields.WORKER]) == (b"ACTIVE", OTHER.encode())
    assert number(fields, JobFields.ATTEMPTS) == 2
    assert [entry[TimingFields.JOB] for entry in stream(r, keys)][-2:] == [local(a), local(b)]
    assert slot.held() == []


def test_a_lost_mark_for_an_earlier_attempt_does_not_drop_a_new_take_of_the_job(
    settings: Settings,
    make_storage: MakeStorage,
    r: redis.Redis,
    keys: QueueKeys,
) -> None:
    storage = make_storage(prefetch=4)
    slot = new_slot(10)
    storage.slot = slot
    warm_up(storage, settings, r, keys)
    (job_id,) = job_ids(settings, 1)
    assert run_one(storage) == job_id
    # Attempt 1's outcome is pending when its lease is lost; the supervisor marks the job lost.
    theirs = take_over(settings, r, keys, job_id)
    with supervising(settings, slot) as supervisor:
        assert supervisor.tick([]) == []
    assert lost_ids(slot) == {job_id}
    # Attempt 2 fails and goes back, behind a job enqueued meanwhile.
    (ahead,) = job_ids(settings, 1)
    now = redis_now(r)
    following = next_attempt(decode_message(theirs.msg))
    assert following is not None
    retry = outcome(theirs, Outcome.RETRY, now, now + 1, "E: flaky", retry_msg=following[0])
    assert QueueOps(settings, r, OTHER).settle(keys, [retry]) == []
    # This worker's next round trip settles attempt 1 (stale) and takes both: attempt 3 is its own.
    assert run_one(storage) == ahead
    assert number(record(r, keys, job_id), JobFields.ATTEMPTS) == 3
    assert record(r, keys, job_id)[JobFields.WORKER].decode() == storage.core.worker_id
    assert storage.dequeue() is not None
    assert popped_id(storage) == job_id


def test_a_take_whose_reply_was_lost_is_sent_again_with_its_token_and_orphans_nothing(
    settings: Settings, make_storage: MakeStorage, r: redis.Redis, keys: QueueKeys
) -> None:
    with FaultProxy.from_url(settings.redis_url) as proxy:
        storage = make_storage(redis_url=proxy.url)
        first, second, third = job_ids(settings, 3)
        assert run_one(storage) == first
        take_sha = storage.core.scripts.take.sha.encode()

        def lose(request: bytes) -> bool:
            # The take runs in Redis and its reply is lost; the client's own retry finds Redis gone too.
            if take_sha in request:
                proxy.refuse(True)
                return True
            return False

        proxy.drop_reply_matching(lose)
        with pytest.raises(redis.ConnectionError):
            storage.dequeue()
        assert proxy.dropped == 1
        # In Redis: the first job's outcome, and the second taken by the take whose reply was lost.
        assert state(r, keys, first) == "COMPLETED"
        assert members(r, keys.active) == [local(second)]
        proxy.refuse(False)
        # Sent again with the same token: the same job comes back, nothing more is taken.
        assert storage.dequeue() is not None
        assert popped_id(storage) == second
        assert storage.popped is not None
        assert storage.popped.attempt == 1
        assert members(r, keys.active) == [local(second)]
        assert members(r, keys.waiting) == [local(third)]
        storage.started(second, None)
        storage.completed(second)
        assert run_one(storage) == third
        storage.shut_down()
    assert [state(r, keys, job_id) for job_id in (first, second, third)] == ["COMPLETED"] * 3
    assert [entry[TimingFields.JOB] for entry in stream(r, keys)] == [local(first), local(second), local(third)]
    assert int(cast(bytes, r.hget(keys.counters, CounterFields.TOTAL_COMPLETED))) == 3


def test_a_settle_whose_reply_was_lost_is_not_reported_as_not_recorded(
    settings: Settings, make_storage: MakeStorage, r: redis.Redis, keys: QueueKeys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=STORAGE_LOG)
    with FaultProxy.from_url(settings.redis_url) as proxy:
        storage = make_storage(redis_url=proxy.url)
        first, second = job_ids(settings, 2)
        assert run_one(storage) == first
        take_sha = storage.core.scripts.take.sha.encode()
        # The round trip that settles the first job and takes the second loses its reply once.
        proxy.drop_reply_matching(lambda request: take_sha in request)
        assert storage.dequeue() is not None
        assert proxy.dropped == 1
        assert popped_id(storage) == second
        assert state(r, keys, first) == "COMPLETED"
        assert len(stream(r, keys)) == 1
        storage.shut_down()
    assert warned(caplog, NOT_RECORDED) == []


# -- schedule and sizes ----------------------------------------------------------


def test_read_schedule_promotes_due_jobs_inside_redis(
    settings: Settings, make_storage: MakeStorage, r: redis.Redis, keys: QueueKeys
) -> None:
    storage = make_storage()
    (soon,) = job_ids(settings, 1, delay_ms=30)
    (later,) = job_ids(settings, 1, delay_ms=60_000)
    (waiting,) = job_ids(settings, 1, queue="emails")
    assert storage.queue_size() == 1
    assert storage.schedule_size() == 2
    time.sleep(0.05)
    assert storage.read_schedule(datetime.datetime.now(datetime.UTC)) == []
    assert members(r, keys.waiting) == [local(soon)]
    assert members(r, keys.delayed) == [local(later)]
    assert (storage.queue_size(), storage.schedule_size()) == (2, 1)
    assert waiting.startswith("emails:")
