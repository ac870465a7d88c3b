"""Invariants of a finished run, read back from Redis: what the chaos run
(tests/reliability/test_chaos.py) asserts, usable from outside the tests too (no pytest).

    report = check(settings, job_ids, executions_key)
    print(report.counts)
    assert_holds(report)

`job_ids` are the ids the API accepted; `executions_key` is the prefix under which
`chaos.work` (tests/chaos_tasks.py) recorded each job's executions. Every job record of the
queues (accepted or not: a batch whose reply was lost may still have been written) is
checked, and the totals are compared against all of them.

(a) Final states: every accepted job has a record, COMPLETED or FAILED, and is a member of
    exactly the matching finished set and of no waiting / delayed / active set; those sets
    are empty; no finished-set member lacks a record.
(b) No overlap: a job's finished executions (start and end recorded), sorted by start, each
    start after every earlier one ended. Executions with no end (their process was killed)
    are counted, not judged.
(c) Figures equal the attempts: total_n == total_completed + total_failed + total_retried
    == the `timings` counter == the stream's entries (numbered 1..n, none missing or twice)
    == the minute hashes' `n` == their completed + failed + retried; each total equals its
    stream outcomes and its minute sums; total_completed / total_failed equal the COMPLETED /
    FAILED records; nothing evicted; exactly one terminal stream entry per job, its last,
    matching its state.
(d) Every completed job ran: at least one finished execution, and no job has more attempts
    recorded by a worker than executions that started.

Retention must keep everything (QUEUE_KEEP_COMPLETED, QUEUE_KEEP_FAILED and
QUEUE_TIMINGS_RETAINED above the run's jobs and attempts), or (a) and (c) fail by design.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis

from queueservice_server.core.codec import MessageDecodeError, decode_message
from queueservice_server.core.keys import CounterFields as C
from queueservice_server.core.keys import JobFields as J
from queueservice_server.core.keys import QueueKeys
from queueservice_server.core.keys import TimingFields as T
from queueservice_server.settings import Settings
from tests.chaos_tasks import executions_list

FINAL = ("COMPLETED", "FAILED")
# Failures the scripts record with no worker and no execution behind them (lua.fail_recorded).
_NOT_BY_A_WORKER = ("stalled ", "no job record")
_MAX_LISTED = 20
_CHUNK = 2000


@dataclass
class Counts:
    jobs: int = 0  # accepted by the API
    unconfirmed: int = 0  # records no accepted batch returned (its reply was lost)
    completed: int = 0
    failed: int = 0
    reaper_failed: int = 0  # failed by the reaper (stalled too often)
    executions: int = 0  # distinct starts recorded by the task
    finished_executions: int = 0
    unfinished_executions: int = 0  # no end: the process was killed
    reruns: int = 0  # executions beyond the first, over all jobs
    attempts: int = 0  # timings stream entries
    retried: int = 0
    stalled: int = 0
    minutes: int = 0


@dataclass
class Report:
    counts: Counts
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


@dataclass(frozen=True)
class Execution:
    run: str
    pid: int
    start: float
    end: float | None


@dataclass(frozen=True)
class Entry:
    """One timings stream entry."""

    seq: int
    job: str  # local id
    outcome: str
    attempt: int
    worker: str
    error: str


@dataclass
class _Queue:
    keys: QueueKeys
    sets: dict[str, set[str]]
    counters: dict[str, int]
    entries: list[Entry]
    minutes: list[dict[str, int]]
    records: dict[str, dict[str, Any]]  # local id -> decoded hash


def assert_holds(report: Report) -> None:
    if report.violations:
        shown = "\n  ".join(report.violations[:_MAX_LISTED])
        more = len(report.violations) - _MAX_LISTED
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise AssertionError(f"{len(report.violations)} invariant violations ({report.counts}):\n  {shown}{tail}")


def check(settings: Settings, job_ids: Iterable[str], executions_key: str) -> Report:
    accepted = list(job_ids)
    report = Report(Counts(jobs=len(accepted)))
    by_queue: dict[str, set[str]] = {queue: set() for queue in settings.queues}
    for job_id in accepted:
        queue, _, local = job_id.rpartition(":")
        by_queue.setdefault(queue, set()).add(local)
    duplicates = [job_id for job_id, n in Counter(accepted).items() if n > 1]
    if duplicates:
        report.violations.append(f"(a) job ids accepted twice: {duplicates[:_MAX_LISTED]}")
    client = redis.Redis.from_url(settings.redis_url)
    try:
        for queue, locals_ in by_queue.items():
            state = _read_queue(client, QueueKeys(settings.key_prefix, queue))
            report.counts.unconfirmed += len(set(state.records) - locals_)
            _check_states(state, locals_, report)
            _check_figures(state, report)
            executions = _read_executions(client, state, executions_key)
            _check_executions(state, executions, report)
    finally:
        client.close()
    return report


# -- reading -------------------------------------------------------------------------


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _scan(client: redis.Redis, prefix: str) -> list[str]:
    keys: Iterator[bytes] = client.scan_iter(match=_glob_escape(prefix) + "*", count=1000)
    return sorted(key.decode() for key in keys)


def _read_queue(client: redis.Redis, keys: QueueKeys) -> _Queue:
    names = {"waiting": keys.waiting, "delayed": keys.delayed, "active": keys.active}
    names |= {"completed": keys.completed, "failed": keys.failed}
    with client.pipeline(transaction=False) as pipe:
        for key in names.values():
            pipe.zrange(key, 0, -1)
        pipe.hgetall(keys.counters)
        replies: list[Any] = pipe.execute()
    sets = {name: {m.decode() for m in members} for name, members in zip(names, replies[:-1], strict=True)}
    counters = {k.decode(): int(v) for k, v in replies[-1].items()}
    minute_keys = _scan(client, keys.minute_prefix)
    job_keys = _scan(client, keys.job_prefix)
    minutes: list[dict[str, int]] = []
    records: dict[str, dict[str, Any]] = {}
    for start in range(0, max(len(minute_keys), len(job_keys)), _CHUNK):
        with client.pipeline(transaction=False) as pipe:
            for key in minute_keys[start : start + _CHUNK]:
                pipe.hgetall(key)
            for key in job_keys[start : start + _CHUNK]:
                pipe.hgetall(key)
            replies = pipe.execute()
        got = len(minute_keys[start : start + _CHUNK])
        for reply in replies[:got]:
            minutes.append({k.decode(): int(float(v)) for k, v in reply.items()})
        for key, reply in zip(job_keys[start : start + _CHUNK], replies[got:], strict=True):
            records[key[len(keys.job_prefix) :]] = {k.decode(): v for k, v in reply.items()}
    return _Queue(keys, sets, counters, _read_stream(client, keys.timings), minutes, records)


def _read_stream(client: redis.Redis, stream: str) -> list[Entry]:
    entries: list[Entry] = []
    low = "-"
    while True:
        batch: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange(stream, low, "+", count=_CHUNK)  # type: ignore[assignment]
        for _, fields in batch:

            def text(name: str, fields: dict[bytes, bytes] = fields) -> str:
                return fields.get(name.encode(), b"").decode(errors="replace")

            entries.append(
                Entry(
                    seq=int(text(T.SEQ) or 0),
                    job=text(T.JOB),
                    outcome=text(T.OUTCOME),
                    attempt=int(text(T.ATTEMPT) or 0),
                    worker=text(T.WORKER),
                    error=text(T.ERROR),
                )
            )
        if len(batch) < _CHUNK:
            return entries
        low = "(" + batch[-1][0].decode()


def _payload_n(record: dict[str, Any]) -> int | None:
    try:
        payload = decode_message(record.get(J.MSG, b""))["payload"]
    except MessageDecodeError:
        return None
    n = payload.get("n")
    # A payload is a protobuf Struct, whose numbers arrive as floats.
    if isinstance(n, int | float) and float(n).is_integer():
        return int(n)
    return None


def _parse_executions(lines: list[bytes]) -> list[Execution]:
    starts: dict[str, tuple[int, float]] = {}
    ends: dict[str, float] = {}
    for line in lines:
        kind, run, pid, at = line.decode().split()
        if kind == "start":
            starts.setdefault(run, (int(pid), float(at)))
        else:
            ends.setdefault(run, float(at))
    runs = [Execution(run, pid, start, ends.get(run)) for run, (pid, start) in starts.items()]
    # An end with no start cannot happen (the start is written first and retried until it lands).
    runs += [Execution(run, 0, float("nan"), end) for run, end in ends.items() if run not in starts]
    return sorted(runs, key=lambda e: e.start)


def _read_executions(client: redis.Redis, state: _Queue, executions_key: str) -> dict[str, list[Execution]]:
    """Local id -> its executions, found by the `n` in its payload."""
    numbers = {local: _payload_n(record) for local, record in state.records.items()}
    locals_ = [local for local, n in numbers.items() if n is not None]
    found: dict[str, list[Execution]] = {}
    for start in range(0, len(locals_), _CHUNK):
        chunk = locals_[start : start + _CHUNK]
        with client.pipeline(transaction=False) as pipe:
            for local in chunk:
                pipe.lrange(executions_list(executions_key, numbers[local] or 0), 0, -1)
            replies: list[list[bytes]] = pipe.execute()
        for local, lines in zip(chunk, replies, strict=True):
            found[local] = _parse_executions(lines)
    return found


# -- the invariants --------------------------------------------------------------------


def _check_states(state: _Queue, accepted: set[str], report: Report) -> None:
    """(a)"""
    queue = state.keys.queue
    bad = report.violations
    for name in ("waiting", "delayed", "active"):
        if state.sets[name]:
            bad.append(f"(a) {queue}: {len(state.sets[name])} jobs left {name}: {sorted(state.sets[name])[:5]}")
    for local in sorted(accepted - set(state.records)):
        bad.append(f"(a) {queue}:{local} was accepted and has no record")
    for name in ("completed", "failed"):
        for local in sorted(state.sets[name] - set(state.records)):
            bad.append(f"(a) {queue}:{local} is in the {name} set and has no record")
    for local, record in state.records.items():
        job_state = record.get(J.STATE, b"").decode()
        member_of = [name for name, members in state.sets.items() if local in members]
        if job_state not in FINAL:
            bad.append(f"(a) {queue}:{local} ended {job_state or 'with no state'} (in {member_of})")
        elif member_of != [job_state.lower()]:
            bad.append(f"(a) {queue}:{local} is {job_state} and a member of {member_of}")
        report.counts.completed += job_state == "COMPLETED"
        report.counts.failed += job_state == "FAILED"
        error = record.get(J.ERROR, b"").decode(errors="replace")
        report.counts.reaper_failed += job_state == "FAILED" and error.startswith("stalled ")


def _terminal(entry: Entry, max_attempts: int) -> bool:
    if entry.outcome in FINAL:
        return True
    # A timed-out attempt is retried while attempts remain, else it fails the job.
    return entry.outcome == "TIMED_OUT" and entry.attempt >= max_attempts


def _check_figures(state: _Queue, report: Report) -> None:
    """(c)"""
    queue = state.keys.queue
    bad = report.violations
    totals = {name: state.counters.get(name, 0) for name in (C.TOTAL_N, C.TOTAL_COMPLETED, C.TOTAL_FAILED)}
    totals[C.TOTAL_RETRIED] = state.counters.get(C.TOTAL_RETRIED, 0)
    n = totals[C.TOTAL_N]
    report.counts.attempts += len(state.entries)
    report.counts.retried += totals[C.TOTAL_RETRIED]
    report.counts.stalled += state.counters.get(C.STALLED, 0)
    report.counts.minutes += len(state.minutes)
    minute = Counter[str]()
    for figures in state.minutes:
        minute.update({k: figures.get(k, 0) for k in ("n", "completed", "failed", "retried")})
    moves = totals[C.TOTAL_COMPLETED] + totals[C.TOTAL_FAILED] + totals[C.TOTAL_RETRIED]
    equal = {
        "total_completed + total_failed + total_retried": moves,
        "counters timings": state.counters.get(C.TIMINGS, 0),
        "stream entries": len(state.entries),
        "sum of minute n": minute["n"],
        "sum of minute completed + failed + retried": minute["completed"] + minute["failed"] + minute["retried"],
    }
    for what, value in equal.items():
        if value != n:
            bad.append(f"(c) {queue}: total_n {n} != {what} {value}")
    for move in ("completed", "failed", "retried"):
        if minute[move] != totals[f"total_{move}"]:
            bad.append(f"(c) {queue}: total_{move} {totals[f'total_{move}']} != sum of minute {move} {minute[move]}")
    seqs = sorted(entry.seq for entry in state.entries)
    if seqs != list(range(1, len(seqs) + 1)):
        missing = sorted(set(range(1, len(seqs) + 1)) - set(seqs))
        twice = sorted(s for s, c in Counter(seqs).items() if c > 1)
        bad.append(f"(c) {queue}: stream seqs are not 1..{len(seqs)}: missing {missing[:10]}, twice {twice[:10]}")
    for name in (C.EVICTED_COMPLETED, C.EVICTED_FAILED):
        if state.counters.get(name, 0):
            bad.append(f"(c) {queue}: {name} = {state.counters[name]}: retention evicted records, raise it")
    states = Counter(record.get(J.STATE, b"").decode() for record in state.records.values())
    for job_state, total in (("COMPLETED", C.TOTAL_COMPLETED), ("FAILED", C.TOTAL_FAILED)):
        if states[job_state] != totals[total]:
            bad.append(f"(c) {queue}: {total} {totals[total]} != {states[job_state]} {job_state} records")
    _check_terminal_entries(state, totals, report)


def _check_terminal_entries(state: _Queue, totals: dict[str, int], report: Report) -> None:
    queue = state.keys.queue
    bad = report.violations
    per_job: dict[str, list[Entry]] = {}
    for entry in state.entries:
        per_job.setdefault(entry.job, []).append(entry)
    outcomes = Counter[str]()
    for local in sorted(set(per_job) - set(state.records)):
        bad.append(f"(c) {queue}:{local} has {len(per_job[local])} timings entries and no record")
    for local, record in state.records.items():
        entries = sorted(per_job.get(local, []), key=lambda e: e.seq)
        max_attempts = int(record.get(J.MAX_ATTEMPTS, b"0") or 0)
        terminal = [entry for entry in entries if _terminal(entry, max_attempts)]
        job_state = record.get(J.STATE, b"").decode()
        for entry in entries:
            final = _terminal(entry, max_attempts)
            outcomes["completed" if entry.outcome == "COMPLETED" else "final" if final else "retried"] += 1
        if len(terminal) != 1:
            history = [(e.seq, e.outcome, e.attempt) for e in entries]
            bad.append(f"(c) {queue}:{local} ({job_state}) has {len(terminal)} terminal timings entries: {history}")
        elif terminal[0] is not entries[-1]:
            bad.append(f"(c) {queue}:{local} has entries after its terminal one: {[e.outcome for e in entries]}")
        elif (terminal[0].outcome == "COMPLETED") != (job_state == "COMPLETED"):
            bad.append(f"(c) {queue}:{local} is {job_state} and its terminal entry {terminal[0].outcome}")
    if outcomes["completed"] != totals[C.TOTAL_COMPLETED]:
        bad.append(f"(c) {queue}: total_completed {totals[C.TOTAL_COMPLETED]} != {outcomes['completed']} entries")
    if outcomes["final"] != totals[C.TOTAL_FAILED]:
        bad.append(f"(c) {queue}: total_failed {totals[C.TOTAL_FAILED]} != {outcomes['final']} terminal failures")
    if outcomes["retried"] != totals[C.TOTAL_RETRIED]:
        bad.append(f"(c) {queue}: total_retried {totals[C.TOTAL_RETRIED]} != {outcomes['retried']} retried entries")


def _check_executions(state: _Queue, executions: dict[str, list[Execution]], report: Report) -> None:
    """(b) and (d)"""
    queue = state.keys.queue
    bad = report.violations
    by_worker = Counter(entry.job for entry in state.entries if not entry.error.startswith(_NOT_BY_A_WORKER))
    for local, record in state.records.items():
        runs = executions.get(local)
        if runs is None:
            bad.append(f"(d) {queue}:{local} has no `n` in its payload: not a chaos.work job")
            continue
        finished = [run for run in runs if run.end is not None]
        report.counts.executions += len(runs)
        report.counts.finished_executions += len(finished)
        report.counts.unfinished_executions += len(runs) - len(finished)
        report.counts.reruns += max(0, len(runs) - 1)
        if any(run.start != run.start for run in runs):  # NaN: an end with no start
            bad.append(f"(b) {queue}:{local} has an execution end with no start: {runs}")
        ended = float("-inf")
        previous: Execution | None = None
        for run in finished:
            assert run.end is not None
            if run.end < run.start:
                bad.append(f"(b) {queue}:{local} execution {run.run} ended before it started: {run}")
            if previous is not None and run.start < ended:
                bad.append(f"(b) {queue}:{local} executions overlap: {previous} and {run} (all: {runs})")
            if run.end >= ended:
                ended, previous = run.end, run
        if record.get(J.STATE) == b"COMPLETED" and not finished:
            bad.append(f"(d) {queue}:{local} is COMPLETED with no finished execution: {runs}")
        starts = len([run for run in runs if run.start == run.start])
        if by_worker[local] > starts:
            bad.append(f"(d) {queue}:{local} has {by_worker[local]} attempts recorded by workers, {starts} executions")
