"""The consumer parent's Supervisor with real shared-memory Slots, in the test process.

A worker process is played by a QueueOps that takes jobs and publishes their tokens in a Slot,
as QueueStorage does; the supervisor then renews, reaps, records timeouts and hands back. Leases
are made to run out by moving their deadlines (lifecycle_support.expire), and short stall
intervals keep the reaper's one-lease wait after start or an outage short.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import redis

from queueservice_server.core.codec import decode_message
from queueservice_server.core.jobs import Token
from queueservice_server.core.keys import CounterFields, JobFields, QueueKeys, ServiceKeys, TimingFields, WorkerFields
from queueservice_server.core.timings import Outcome
from queueservice_server.embedded import RedisServer
from queueservice_server.settings import Settings
from queueservice_server.worker.queue_ops import QueueOps
from queueservice_server.worker.slots import Slot
from queueservice_server.worker.supervisor import Supervisor
from tests.integration import lifecycle_support as support
from tests.integration.lifecycle_support import (
    OTHER,
    WORKER,
    Held,
    counters,
    expire,
    hold,
    job_ids,
    local,
    lost_ids,
    new_slot,
    outcome,
    record,
    redis_now,
    registry,
    scores,
    stream,
    take,
)

MakeSupervisor = Callable[..., Supervisor]
SUPERVISOR_LOG = "queueservice_server.worker.supervisor"
DOWN = "redis unreachable; the supervisor retries every round"
BACK = "redis reachable again; the reaper waits one lease before reaping"

# Shared fixtures (lifecycle_support): a client of the test's Redis, and the default queue's keys.
r = support.r
keys = support.keys


# -- helpers ---------------------------------------------------------------------


@pytest.fixture
def make_supervisor() -> Iterator[MakeSupervisor]:
    made: list[Supervisor] = []

    def make(settings: Settings, slots: list[Slot]) -> Supervisor:
        supervisor = Supervisor(settings, settings.redis_url, slots)
        made.append(supervisor)
        return supervisor

    yield make
    for supervisor in made:
        supervisor.core.client.close()


@pytest.fixture
def fast(settings: Settings) -> Settings:
    """Leases of 150 ms, a supervisor round every 50 ms."""
    return replace(settings, stall_interval=0.2)


def next_round(supervisor: Supervisor) -> None:
    """Waits out the supervisor's period, so that its next tick does Redis work."""
    time.sleep(supervisor.period + 0.005)


def assert_handed_back(r: redis.Redis, keys: QueueKeys, handed: list[str], original: dict[str, int]) -> None:
    """Back where they stood in waiting, the take not counted, no stall."""
    waiting = scores(r, keys.waiting)
    for job_id in handed:
        assert waiting[local(job_id)] == original[local(job_id)]
        fields = record(r, keys, job_id)
        assert fields[JobFields.STATE] == b"WAITING"
        assert int(fields[JobFields.ATTEMPTS]) == 0
        assert JobFields.STALLS not in fields


def logged(caplog: pytest.LogCaptureFixture, message: str) -> int:
    return sum(1 for rec in caplog.records if rec.name == SUPERVISOR_LOG and rec.getMessage() == message)


# -- tick ------------------------------------------------------------------------


def test_tick_renews_held_leases_reaps_the_rest_and_writes_the_heartbeat(
    settings: Settings, fast: Settings, r: redis.Redis, keys: QueueKeys, make_supervisor: MakeSupervisor
) -> None:
    emails = QueueKeys(settings.key_prefix, "emails")
    worker = QueueOps(fast, r, WORKER)
    first, second, acked, orphan = job_ids(settings, 4)
    (email,) = job_ids(settings, 1, queue="emails")
    original = scores(r, keys.waiting)
    busy, idle = new_slot(), new_slot()
    running = hold(worker, busy, "default", 3)
    assert [job.job_id for job in running] == [first, second, acked]
    busy.start(running[0].token, 60)
    hold(worker, idle, "emails", 1)
    # Acked meanwhile, but still listed: a renew must not bring it back.
    assert worker.settle(keys, [outcome(running[2], Outcome.COMPLETED, redis_now(r) - 1, redis_now(r))]) == []
    # Nobody holds this one.
    take(worker, keys, 1)
    assert set(scores(r, keys.active)) == {local(first), local(second), local(orphan)}
    # Every lease has run out.
    for job_id in (first, second, orphan):
        expire(r, keys, job_id)
    expire(r, emails, email)
    supervisor = make_supervisor(fast, [busy, idle])
    lease_ms = supervisor.core.lease_ms
    before = redis_now(r)
    # The first round renews what the slots hold but reaps nothing: live consumers get one lease to renew.
    assert supervisor.tick([]) == []
    active = scores(r, keys.active)
    assert set(active) == {local(first), local(second), local(orphan)}
    assert all(active[local(job_id)] >= before + lease_ms for job_id in (first, second))
    assert active[local(orphan)] < before
    assert scores(r, emails.active)[local(email)] >= before + lease_ms
    assert record(r, keys, acked)[JobFields.STATE] == b"COMPLETED"
    # The acked job's renewal failed: its slot is told, but its process runs another job, so goes on.
    assert lost_ids(busy) == {acked}
    assert lost_ids(idle) == set()
    # One lease later the round renews the held leases (they ran out again) before it reaps the orphan.
    time.sleep(lease_ms / 1000)
    before = redis_now(r)
    assert supervisor.tick([]) == []
    active = scores(r, keys.active)
    assert set(active) == {local(first), local(second)}
    assert all(score >= before + lease_ms for score in active.values())
    assert scores(r, keys.waiting) == {local(orphan): original[local(orphan)]}
    assert int(record(r, keys, orphan)[JobFields.STALLS]) == 1
    assert counters(r, keys)[CounterFields.STALLED] == 1
    # Within its period a tick does no Redis work.
    service = ServiceKeys(settings.key_prefix)
    beat = scores(r, service.workers)[supervisor.worker_id]
    supervisor.tick([])
    assert scores(r, keys.active) == active
    assert scores(r, service.workers)[supervisor.worker_id] == beat
    next_round(supervisor)
    supervisor.tick([])
    assert all(score > active[member] for member, score in scores(r, keys.active).items())
    assert scores(r, service.workers)[supervisor.worker_id] > beat


def test_tick_writes_the_registry_entry_and_stamps_this_consumer_on_every_queue(
    settings: Settings, r: redis.Redis, keys: QueueKeys, make_supervisor: MakeSupervisor
) -> None:
    emails = QueueKeys(settings.key_prefix, "emails")
    job_ids(settings, 1)
    busy, idle = new_slot(), new_slot()
    (job,) = hold(QueueOps(settings, r, WORKER), busy, "default", 1)
    busy.start(job.token, 60)
    supervisor = make_supervisor(settings, [busy, idle])
    supervisor.tick([])
    service = ServiceKeys(settings.key_prefix)
    beat = scores(r, service.workers)
    assert list(beat) == [supervisor.worker_id]
    assert supervisor.worker_id == f"{socket.gethostname()}:{os.getpid()}"
    entry = registry(r, settings, supervisor.worker_id)
    assert entry[WorkerFields.HEARTBEAT_AT] == str(beat[supervisor.worker_id])
    assert entry[WorkerFields.HOST] == socket.gethostname()
    assert entry[WorkerFields.PID] == str(os.getpid())
    assert entry[WorkerFields.CONCURRENCY] == "2"
    assert entry[WorkerFields.BUSY] == "1"
    assert int(entry[WorkerFields.RSS_BYTES]) > 0
    assert entry[WorkerFields.QUEUES] == "default,emails"
    assert entry[WorkerFields.STARTED_AT] == str(supervisor.started_at)
    assert 0 < r.ttl(service.worker(supervisor.worker_id)) <= max(3, int(settings.stall_interval * 3))
    # The consumer's stamp on every queue (the reaper reads it), from the same round.
    for queue in (keys, emails):
        stamps = scores(r, queue.consumers)
        assert list(stamps) == [supervisor.worker_id]
        assert beat[supervisor.worker_id] - 1000 < stamps[supervisor.worker_id] <= beat[supervisor.worker_id]


def test_the_reaper_spares_the_expired_jobs_of_its_own_consumers_processes(
    fast: Settings, r: redis.Redis, keys: QueueKeys, make_supervisor: MakeSupervisor
) -> None:
    """A job one of this consumer's worker processes took but has not published yet is not reaped
    while the consumer renews, until its lease ran out more than a lease ago."""
    slot = new_slot()
    supervisor = make_supervisor(fast, [slot])
    lease_ms = supervisor.core.lease_ms
    own = QueueOps(fast, r, f"{supervisor.worker_id}:4242")
    (job_id,) = job_ids(fast, 1)
    take(own, keys, 1)
    supervisor.tick([])
    # The reaper's first lease after start.
    time.sleep(lease_ms / 1000)
    expire(r, keys, job_id, lease_ms // 2)
    supervisor.tick([])
    assert list(scores(r, keys.active)) == [local(job_id)]
    expire(r, keys, job_id, lease_ms + 50)
    next_round(supervisor)
    supervisor.tick([])
    assert scores(r, keys.active) == {}
    assert int(record(r, keys, job_id)[JobFields.STALLS]) == 1


def test_tick_stops_the_slot_whose_running_job_was_taken_over(
    settings: Settings, fast: Settings, r: redis.Redis, keys: QueueKeys, make_supervisor: MakeSupervisor
) -> None:
    worker = QueueOps(fast, r, WORKER)
    job_ids(settings, 3)
    busy, idle = new_slot(), new_slot()
    running, spare = hold(worker, busy, "default", 2)
    busy.start(running.token, 60)
    (queued,) = hold(worker, idle, "default", 1)
    # Their leases ran out, a reaper returned them, another worker took them.
    expire(r, keys, running)
    expire(r, keys, queued)
    assert QueueOps(settings, r, "host-r:300").reap_expired(keys, "test") == (2, 0)
    theirs = take(QueueOps(settings, r, OTHER), keys, 2)
    assert {(job.local, job.attempt) for job in theirs.jobs} == {(running.local, 2), (queued.local, 2)}
    taken_over = {job.local: record(r, keys, job) for job in theirs.jobs}
    deadlines = scores(r, keys.active)
    supervisor = make_supervisor(fast, [busy, idle])
    # The process running a job that is no longer its own must not go on; the idle one is only told.
    assert supervisor.tick([]) == [busy]
    assert lost_ids(busy) == {running.job_id}
    assert lost_ids(idle) == {queued.job_id}
    assert (busy.lost_version, idle.lost_version) == (1, 1)
    # The other worker's attempts are untouched; the spare was renewed.
    assert {job.local: record(r, keys, job) for job in theirs.jobs} == taken_over
    after = scores(r, keys.active)
    assert {job.local: after[job.local] for job in theirs.jobs} == {
        job.local: deadlines[job.local] for job in theirs.jobs
    }
    assert after[spare.local] > deadlines[spare.local]


# -- hard timeouts ---------------------------------------------------------------


def test_overdue_only_past_the_hard_deadline(settings: Settings, make_supervisor: MakeSupervisor) -> None:
    slot = new_slot()
    supervisor = make_supervisor(settings, [slot])
    token = Token("default:" + "a" * 32, 1, WORKER)
    assert supervisor.overdue(slot) is None
    slot.set_held(WORKER, [token])
    slot.start(token, 60)
    assert supervisor.overdue(slot) is None
    slot.start(token, 0)
    time.sleep(0.001)
    overdue = supervisor.overdue(slot)
    assert overdue is not None
    assert overdue.token == token


def test_timed_out_retries_by_the_jobs_policy_and_hands_back_the_rest(
    settings: Settings, r: redis.Redis, keys: QueueKeys, make_supervisor: MakeSupervisor
) -> None:
    (killed,) = job_ids(settings, 1, timeout=1.5, retry_delay=2.0, retry_backoff=3.0)
    others = job_ids(settings, 2)
    original = scores(r, keys.waiting)
    slot = new_slot()
    held = hold(QueueOps(settings, r, WORKER), slot, "default", 3)
    slot.start(held[0].token, 0)
    supervisor = make_supervisor(settings, [slot])
    running = supervisor.overdue(slot)
    assert running is not None
    before = redis_now(r)
    supervisor.timed_out(slot, running)
    fields = record(r, keys, killed)
    assert fields[JobFields.STATE] == b"DELAYED"
    error = f"TaskTimeout: killed after running past its timeout of 1.5s plus {settings.timeout_grace:g}s grace"
    assert fields[JobFields.ERROR].decode() == error
    # Retried after the job's own delay, with one attempt fewer and the backoff applied.
    due = scores(r, keys.delayed)[local(killed)]
    assert before + 2000 <= due <= redis_now(r) + 2000
    following = decode_message(fields[JobFields.MSG])
    assert (following["retries"], following["retry_delay"]) == (1, 6.0)
    (entry,) = stream(r, keys)
    assert entry[TimingFields.OUTCOME] == "TIMED_OUT"
    assert entry[TimingFields.JOB] == local(killed)
    assert entry[TimingFields.ATTEMPT] == "1"
    assert entry[TimingFields.WORKER] == WORKER
    assert entry[TimingFields.ERROR] == error
    assert counters(r, keys)[CounterFields.TOTAL_RETRIED] == 1
    assert_handed_back(r, keys, others, original)
    assert scores(r, keys.active) == {}
    assert slot.held() == []
    assert slot.running() is None


def test_timed_out_with_no_attempt_left_fails_the_job(
    settings: Settings, r: redis.Redis, keys: QueueKeys, make_supervisor: MakeSupervisor
) -> None:
    (killed,) = job_ids(settings, 1, max_attempts=1, timeout=2.0)
    slot = new_slot()
    (held,) = hold(QueueOps(settings, r, WORKER), slot, "default", 1)
    slot.start(held.token, 0)
    supervisor = make_supervisor(settings, [slot])
    running = supervisor.overdue(slot)
    assert running is not None
    supervisor.timed_out(slot, running)
    fields = record(r, keys, killed)
    assert fields[JobFields.STATE] == b"FAILED"
    assert fields[JobFields.ERROR].startswith(b"TaskTimeout: killed after running past its timeout of 2s")
    assert list(scores(r, keys.failed)) == [local(killed)]
    assert scores(r, keys.active) == scores(r, keys.delayed) == scores(r, keys.waiting) == {}
    assert [entry[TimingFields.OUTCOME] for entry in stream(r, keys)] == ["TIMED_OUT"]
    assert counters(r, keys)[CounterFields.TOTAL_FAILED] == 1
    assert slot.running() is None


def test_timed_out_after_the_lease_was_taken_over_records_nothing(
    settings: Settings, r: redis.Redis, keys: QueueKeys, make_supervisor: MakeSupervisor
) -> None:
    job_ids(settings, 1)
    slot = new_slot()
    (held,) = hold(QueueOps(settings, r, WORKER), slot, "default", 1)
    slot.start(held.token, 0)
    expire(r, keys, held)
    assert QueueOps(settings, r, "host-r:300").reap_expired(keys, "test") == (1, 0)
    (theirs,) = take(QueueOps(settings, r, OTHER), keys, 1).jobs
    taken_over = record(r, keys, theirs)
    supervisor = make_supervisor(settings, [slot])
    running = supervisor.overdue(slot)
    assert running is not None
    supervisor.timed_out(slot, running)
    assert record(r, keys, theirs) == taken_over
    assert list(scores(r, keys.active)) == [theirs.local]
    assert stream(r, keys) == []
    assert slot.held() == []


# -- dead worker processes -------------------------------------------------------


def test_process_died_counts_a_stall_for_the_running_job_and_hands_back_the_rest(
    settings: Settings, r: redis.Redis, keys: QueueKeys, make_supervisor: MakeSupervisor
) -> None:
    jobs = job_ids(settings, 3)
    original = scores(r, keys.waiting)
    slot = new_slot()
    held = hold(QueueOps(settings, r, WORKER), slot, "default", 3)
    slot.start(held[0].token, 60)
    supervisor = make_supervisor(settings, [slot])
    supervisor.process_died(slot)
    # The running job: back where it stood, its attempt counted, one stall.
    assert scores(r, keys.waiting) == original
    fields = record(r, keys, jobs[0])
    assert fields[JobFields.STATE] == b"WAITING"
    assert int(fields[JobFields.STALLS]) == 1
    assert int(fields[JobFields.ATTEMPTS]) == 1
    assert counters(r, keys)[CounterFields.STALLED] == 1
    assert_handed_back(r, keys, jobs[1:], original)
    assert scores(r, keys.active) == {}
    assert slot.held() == []
    assert slot.running() is None


def test_process_died_fails_a_running_job_past_max_stalls(
    settings: Settings, r: redis.Redis, keys: QueueKeys, make_supervisor: MakeSupervisor
) -> None:
    strict = replace(settings, max_stalls=0)
    running, other = job_ids(settings, 2)
    original = scores(r, keys.waiting)
    slot = new_slot()
    held = hold(QueueOps(strict, r, WORKER), slot, "default", 2)
    slot.start(held[0].token, 60)
    make_supervisor(strict, [slot]).process_died(slot)
    fields = record(r, keys, running)
    assert fields[JobFields.STATE] == b"FAILED"
    assert fields[JobFields.ERROR] == b"stalled 1 times (its worker process died)"
    assert list(scores(r, keys.failed)) == [local(running)]
    assert_handed_back(r, keys, [other], original)
    # A failed attempt: its timings entry and totals.
    (entry,) = stream(r, keys)
    assert (entry[TimingFields.JOB], entry[TimingFields.OUTCOME], entry[TimingFields.WORKER]) == (
        local(running),
        "FAILED",
        WORKER,
    )
    assert counters(r, keys)[CounterFields.TOTAL_FAILED] == 1


def test_process_died_while_idle_hands_everything_back_uncounted(
    settings: Settings, r: redis.Redis, keys: QueueKeys, make_supervisor: MakeSupervisor
) -> None:
    jobs = job_ids(settings, 2)
    original = scores(r, keys.waiting)
    slot = new_slot()
    hold(QueueOps(settings, r, WORKER), slot, "default", 2)
    make_supervisor(settings, [slot]).process_died(slot)
    assert_handed_back(r, keys, jobs, original)
    assert CounterFields.STALLED not in counters(r, keys)
    assert slot.held() == []


# -- Redis outages ---------------------------------------------------------------


@dataclass
class Stoppable:
    """A Redis of this test's own, of the version under test, to stop and start again."""

    settings: Settings
    server: RedisServer
    client: redis.Redis


@pytest.fixture
def stoppable(fast: Settings, tmp_path: Path) -> Iterator[Stoppable]:
    with redis.Redis.from_url(fast.redis_url) as target:
        binary = str(target.info("server")["executable"])
    with RedisServer(tmp_path / "outage", binary=binary) as server, redis.Redis.from_url(server.url) as client:
        yield Stoppable(replace(fast, redis_url=server.url), server, client)


@dataclass(frozen=True)
class Work:
    """Three worker processes' slots: `killing` runs `killed`, past its hard deadline; `idle` runs
    nothing and has `buffered` taken; `dying` runs `died` and has `died_other` taken. `orphan` is
    nobody's, its lease over."""

    killing: Slot
    idle: Slot
    dying: Slot
    killed: Held
    buffered: list[Held]
    died: Held
    died_other: Held
    orphan: str
    waiting: dict[str, int]


def three_processes_at_work(settings: Settings, r: redis.Redis, keys: QueueKeys) -> Work:
    job_ids(settings, 5)
    (orphan,) = job_ids(settings, 1, priority=-1)
    waiting = scores(r, keys.waiting)
    worker = QueueOps(settings, r, WORKER)
    killing, idle, dying = new_slot(), new_slot(), new_slot()
    (killed,) = hold(worker, killing, "default", 1)
    buffered = hold(worker, idle, "default", 2)
    died, died_other = hold(worker, dying, "default", 2)
    killing.start(killed.token, 0)
    dying.start(died.token, 60)
    take(worker, keys, 1)
    expire(r, keys, orphan)
    return Work(killing, idle, dying, killed, buffered, died, died_other, orphan, waiting)


def test_an_outage_is_logged_once_and_the_pending_work_is_done_when_redis_is_back(
    stoppable: Stoppable, make_supervisor: MakeSupervisor, caplog: pytest.LogCaptureFixture
) -> None:
    settings, server, r = stoppable.settings, stoppable.server, stoppable.client
    keys = QueueKeys(settings.key_prefix, "default")
    work = three_processes_at_work(settings, r, keys)
    supervisor = make_supervisor(settings, [work.killing, work.idle, work.dying])
    assert supervisor.tick([]) == []
    caplog.set_level(logging.WARNING, logger=SUPERVISOR_LOG)

    server.stop()
    # While Redis is down a process is killed at its hard deadline, and two die (one idle, one
    # running a job): each call's own Redis step fails first. Nothing raises, every slot is cleared.
    running = supervisor.overdue(work.killing)
    assert running is not None
    supervisor.timed_out(work.killing, running)
    supervisor.process_died(work.idle)
    supervisor.process_died(work.dying)
    for slot in (work.killing, work.idle, work.dying):
        assert (slot.held(), slot.running()) == ([], None)
    for _ in range(2):
        next_round(supervisor)
        assert supervisor.tick([]) == []
    assert (logged(caplog, DOWN), logged(caplog, BACK)) == (1, 0)

    server.start()
    next_round(supervisor)
    assert supervisor.tick([]) == []
    assert (logged(caplog, DOWN), logged(caplog, BACK)) == (1, 1)
    # The killed job: its timed-out attempt, retried later; the dead process's running job: one
    # stall, back where it stood; what was taken and never started: back, uncounted.
    assert record(r, keys, work.killed)[JobFields.STATE] == b"DELAYED"
    assert [(e[TimingFields.JOB], e[TimingFields.OUTCOME]) for e in stream(r, keys)] == [
        (work.killed.local, "TIMED_OUT")
    ]
    fields = record(r, keys, work.died)
    assert (fields[JobFields.STATE], fields[JobFields.STALLS], fields[JobFields.ATTEMPTS]) == (b"WAITING", b"1", b"1")
    assert scores(r, keys.waiting)[work.died.local] == work.waiting[work.died.local]
    assert_handed_back(r, keys, [job.job_id for job in (*work.buffered, work.died_other)], work.waiting)
    # The reaper waits one lease after the outage too, though the orphan's lease has long run out.
    assert list(scores(r, keys.active)) == [local(work.orphan)]
    time.sleep(supervisor.core.lease_ms / 1000)
    supervisor.tick([])
    assert scores(r, keys.active) == {}
    assert record(r, keys, work.orphan)[JobFields.STALLS] == b"1"
    assert counters(r, keys)[CounterFields.STALLED] == 2
    # Nothing is pending any more: the next round changes nothing.
    before = stream(r, keys), counters(r, keys)
    next_round(supervisor)
    supervisor.tick([])
    assert (stream(r, keys), counters(r, keys)) == before
    assert logged(caplog, DOWN) == 1


# -- shutdown --------------------------------------------------------------------


def test_stopped_hands_back_everything_held_and_leaves_the_registry(
    settings: Settings, r: redis.Redis, keys: QueueKeys, make_supervisor: MakeSupervisor
) -> None:
    emails = QueueKeys(settings.key_prefix, "emails")
    jobs = job_ids(settings, 3)
    (email,) = job_ids(settings, 1, queue="emails")
    (untaken,) = job_ids(settings, 1)
    original = scores(r, keys.waiting)
    first, second = new_slot(), new_slot()
    worker = QueueOps(settings, r, WORKER)
    hold(worker, first, "default", 2)
    (last,) = hold(worker, second, "default", 1)
    hold(worker, second, "emails", 1)
    second.start(last.token, 60)
    supervisor = make_supervisor(settings, [first, second])
    supervisor.tick([])
    service = ServiceKeys(settings.key_prefix)
    assert supervisor.worker_id in scores(r, service.workers)
    # Another consumer's entry stays.
    QueueOps(settings, r, "someone-else:1").heartbeat({WorkerFields.BUSY: 0})
    supervisor.stopped()
    assert scores(r, keys.active) == scores(r, emails.active) == {}
    assert_handed_back(r, keys, jobs, original)
    assert record(r, keys, untaken)[JobFields.STATE] == b"WAITING"
    assert list(scores(r, emails.waiting)) == [local(email)]
    assert CounterFields.STALLED not in counters(r, keys)
    assert list(scores(r, service.workers)) == ["someone-else:1"]
    assert registry(r, settings, supervisor.worker_id) == {}
    assert first.held() == second.held() == []
    assert second.running() is None
