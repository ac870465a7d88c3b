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

from queueservice_server.core.jobs import Token

# A token is `queue:32 hex@attempt`, queue names at most 64 characters; a holder is `host:pid:pid`.
_TOKEN_BYTES = 112
_HOLDER_BYTES = 128


@dataclass(frozen=True)
class Running:
    token: Token
    hard_deadline: float  # time.monotonic(), which every process on the host shares


def _tokens(holder: str, data: bytes) -> list[Token]:
    found = []
    for item in data.decode().split():
        job_id, _, attempt = item.rpartition("@")
        found.append(Token(job_id, int(attempt), holder))
    return found


class Slot:
    """One worker process's shared record; it outlives the process and is reused by its replacement.

    The process writes its holder id, the tokens it holds (taken, not yet acked) and the one
    running now; the supervisor writes the tokens whose leases it could not renew (lost), which
    the process then never starts (a later take of the same job has another token)."""

    def __init__(self, ctx: BaseContext, capacity: int) -> None:
        self._lock = ctx.Lock()
        self._holder: Any = ctx.RawArray(ctypes.c_char, _HOLDER_BYTES)
        self._held: Any = ctx.RawArray(ctypes.c_char, capacity * _TOKEN_BYTES)
        self._running: Any = ctx.RawArray(ctypes.c_char, _TOKEN_BYTES)
        self._deadline: Any = ctx.RawValue(ctypes.c_double, 0.0)
        self._lost: Any = ctx.RawArray(ctypes.c_char, capacity * _TOKEN_BYTES)
        self._lost_version: Any = ctx.RawValue(ctypes.c_long, 0)

    def set_held(self, holder: str, tokens: list[Token]) -> None:
        data = " ".join([token.text for token in tokens]).encode()
        if len(data) > len(self._held):
            raise ValueError("more jobs held than the slot was sized for")
        with self._lock:
            self._holder.value = holder.encode()
            self._held.value = data

    def held(self) -> list[Token]:
        with self._lock:
            holder: bytes = self._holder.value
            data: bytes = self._held.value
        return _tokens(holder.decode(), data)

    def start(self, token: Token, timeout: float) -> None:
        with self._lock:
            self._running.value = token.text.encode()
            self._deadline.value = time.monotonic() + timeout

    def stop(self) -> None:
        with self._lock:
            self._running.value = b""
            self._deadline.value = 0.0

    def running(self) -> Running | None:
        with self._lock:
            found = _tokens(self._holder.value.decode(), self._running.value)
            return Running(found[0], self._deadline.value) if found else None

    def mark_lost(self, tokens: list[Token]) -> None:
        data = " ".join([token.text for token in tokens]).encode()[: len(self._lost) - 1]
        with self._lock:
            self._lost.value = data
            self._lost_version.value += 1

    @property
    def lost_version(self) -> int:
        """Read without the lock: a worker process compares it before every start."""
        version: int = self._lost_version.value
        return version

    def lost(self) -> set[Token]:
        with self._lock:
            holder: bytes = self._holder.value
            data: bytes = self._lost.value
        return set(_tokens(holder.decode(), data))

    def clear(self) -> None:
        with self._lock:
            self._held.value = b""
            self._running.value = b""
            self._deadline.value = 0.0
            self._lost.value = b""
