"""The per-minute figures hash that the scripts write (lua.py `tally`), modelled in Python for
tests: unit tests build hashes from it, integration tests check the scripts against it."""

from __future__ import annotations

from collections import Counter

from queueservice_server.core.timings import Attempt, Outcome, bucket


def move(attempt: Attempt) -> str:
    """The count an attempt adds to: the job's move, not how the attempt ended."""
    if attempt.outcome is Outcome.COMPLETED:
        return "completed"
    return "retried" if attempt.retry_msg else "failed"


def minute_hash(attempts: list[Attempt]) -> dict[bytes, bytes]:
    counts: Counter[str] = Counter()
    maxima = {"wait_max": 0, "proc_max": 0, "total_max": 0}
    for attempt in attempts:
        wait, proc = attempt.wait_ms, attempt.proc_ms
        total = wait + proc
        counts.update(["n", move(attempt), f"w:{bucket(wait)}", f"p:{bucket(proc)}", f"t:{bucket(total)}"])
        counts.update({"wait_sum": wait, "proc_sum": proc, "total_sum": total})
        for name, value in (("wait_max", wait), ("proc_max", proc), ("total_max", total)):
            maxima[name] = max(maxima[name], value)
    # Sums of zero are written too (the scripts add every sum of every attempt they record).
    fields = {field.encode(): str(amount).encode() for field, amount in counts.items()}
    if attempts:
        fields.update({name.encode(): str(value).encode() for name, value in maxima.items()})
    return fields
