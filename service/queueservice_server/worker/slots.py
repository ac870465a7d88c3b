"""What each worker process tells its supervisor, through shared memory.

A worker process writes which jobs it holds (taken and not yet acked) and
which one runs now with its hard deadline. The supervising parent reads it
to renew leases and to enforce timeouts, so both keep working while a task
holds the GIL in C code, and both survive the worker's death.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from multiprocessing.context import BaseContext
from typing import Any

# A job id is `queue:32 hex`, queue names at most 64 characters.
_ID_BYTES = 100


@dataclass(frozen=True)
class Running:
    job_id: str
    hard_deadline: float  # time.monotonic(), which every process on the host shares


class Slot:
    """One worker process's shared record; it outlives the process and is reused by its replacement."""

    def __init__(self, ctx: BaseContext, capacity: int) -> None:
        self._lock = ctx.Lock()
        self._held: Any = ctx.RawArray(ctypes.c_char, capacity * _ID_BYTES)
        self._running: Any = ctx.RawArray(ctypes.c_char, _ID_BYTES)
        self._deadline: Any = ctx.RawValue(ctypes.c_double, 0.0)

    def set_held(self, job_ids: list[str]) -> None:
        data = " ".join(job_ids).encode()
        if len(data) > len(self._held):
            raise ValueError("more jobs held than the slot was sized for")
        with self._lock:
            self._held.value = data

    def held(self) -> list[str]:
        with self._lock:
            data: bytes = self._held.value
        return data.decode().split()

    def start(self, job_id: str, timeout: float) -> None:
        with self._lock:
            self._running.value = job_id.encode()
            self._deadline.value = time.monotonic() + timeout

    def stop(self) -> None:
        with self._lock:
            self._running.value = b""
            self._deadline.value = 0.0

    def running(self) -> Running | None:
        with self._lock:
            job_id = self._running.value.decode()
            return Running(job_id, self._deadline.value) if job_id else None

    def clear(self) -> None:
        with self._lock:
            self._held.value = b""
            self._running.value = b""
            self._deadline.value = 0.0
