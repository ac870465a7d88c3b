"""The audit trail: one JSON line per audited call on stderr, in the shape of every other log
line (logger `queueservice_server.audit`), whatever QUEUE_LOG_LEVEL says.

Calls only append a tuple; the lines are formatted and written together every
FLUSH_INTERVAL_S, at a third of what the logging module costs per line (an Enqueue
is audited, so this is on the hot path). A SIGKILL loses at most that interval's lines.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any, TextIO

LOGGER = "queueservice_server.audit"
FLUSH_INTERVAL_S = 0.1

Entry = tuple[float, str, str, str, dict[str, Any]]


class AuditTrail:
    def __init__(self, stream: TextIO | None = None) -> None:
        # None: whatever sys.stderr is when the lines are written.
        self.stream = stream
        self.pending: list[Entry] = []

    def add(self, rpc: str, who: str, code: str, details: dict[str, Any]) -> None:
        self.pending.append((time.time(), rpc, who, code, details))

    def flush(self) -> None:
        if not self.pending:
            return
        entries, self.pending = self.pending, []
        stream = self.stream or sys.stderr
        stream.write("".join(_line(entry) for entry in entries))
        stream.flush()

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(FLUSH_INTERVAL_S)
                self.flush()
        finally:
            self.flush()


def _line(entry: Entry) -> str:
    ts, rpc, who, code, details = entry
    head = {"ts": round(ts, 3), "level": "INFO", "logger": LOGGER, "msg": f"audit {rpc} by {who}: {code}"}
    return json.dumps({**head, "audit": True, "who": who, "rpc": rpc, "code": code, **details}, default=str) + "\n"
