"""The Redis record schema lives in one place: core/keys.py names every field, the Lua
scripts use no other names, and JobRecord is the one decoder of a job hash."""

from __future__ import annotations

import re

from queueservice_server.core import lua
from queueservice_server.core.jobs import JobRecord, State
from queueservice_server.core.keys import CounterFields, JobFields, SnapshotFields, TimingFields, WorkerFields
from queueservice_server.core.timings import Attempt, Outcome
from tests.figures_model import minute_hash


def names(fields: type) -> set[str]:
    return {value for key, value in vars(fields).items() if key.isupper()}


def minute_fields() -> set[str]:
    attempt = Attempt("x", "t", Outcome.COMPLETED, 1, 0, 0, 0, "h")
    fixed = {name.decode() for name in minute_hash([attempt]) if b":" not in name}
    return fixed | {"completed", "failed", "retried"}


def lua_literals() -> set[str]:
    scripts = "\n".join(value for name, value in vars(lua).items() if name.isupper() and isinstance(value, str))
    return set(re.findall(r"'([a-z_]+)'", scripts))


def test_every_name_the_lua_scripts_use_is_a_field_of_keys_py() -> None:
    known = names(JobFields) | names(CounterFields) | names(TimingFields) | names(WorkerFields) | minute_fields()
    # `'total_' .. field` builds the counters' running totals from the minute fields, and
    # w / p / t are the prefixes of the minute hash's histogram fields (`w:<bucket>`).
    unknown = lua_literals() - known - {"total_", "w", "p", "t"}
    assert not unknown, f"field names in lua.py that core/keys.py does not list: {sorted(unknown)}"


def test_the_check_sees_the_scripts_names() -> None:
    assert {"state", "attempts", "ready_at", "evicted_failed", "outcome"} <= lua_literals()


def test_job_record_decodes_every_job_field() -> None:
    values = {name: str(n + 1) for n, name in enumerate(sorted(names(JobFields)))}
    values[JobFields.STATE] = "ACTIVE"
    record = JobRecord.from_hash("q", "a" * 32, {k.encode(): v.encode() for k, v in values.items()})
    assert record.id == "q:" + "a" * 32 and record.state is State.ACTIVE
    decoded = {
        JobFields.TASK: record.task,
        JobFields.MSG: record.msg.decode(),
        JobFields.PRIORITY: str(record.priority),
        JobFields.SEQ: str(record.seq),
        JobFields.ATTEMPTS: str(record.attempts),
        JobFields.MAX_ATTEMPTS: str(record.max_attempts),
        JobFields.TIMEOUT_MS: str(record.timeout_ms),
        JobFields.STALLS: str(record.stalls),
        JobFields.ERROR: record.error,
        JobFields.WORKER: record.worker,
        JobFields.IDEMPOTENCY_KEY: record.idempotency_key,
        JobFields.ENQUEUED_AT: str(record.enqueued_at),
        JobFields.READY_AT: str(record.ready_at),
        JobFields.DUE_AT: str(record.due_at),
        JobFields.STARTED_AT: str(record.started_at),
        JobFields.FINISHED_AT: str(record.finished_at),
    }
    assert decoded == {name: value for name, value in values.items() if name != JobFields.STATE}


def test_unset_times_decode_as_none() -> None:
    record = JobRecord.from_hash("q", "b" * 32, {b"state": b"WAITING", b"task": b"t", b"enqueued_at": b"5"})
    assert (record.enqueued_at, record.ready_at, record.started_at, record.finished_at) == (5, None, None, None)
    assert record.attempts == 0 and record.msg == b""


def test_snapshot_fields_cover_the_counts() -> None:
    assert names(SnapshotFields) == {"waiting", "active", "delayed", "completed", "failed", "oldest_wait_ms"}
