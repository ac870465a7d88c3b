"""The Lua scripts bound to one Redis client (sync or async)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from queueservice_server import lua


@dataclass(frozen=True)
class Scripts:
    enqueue: Any
    take: Any
    settle: Any
    promote: Any
    renew: Any
    reap: Any
    hand_back: Any
    retry_failed: Any
    heartbeat: Any

    @classmethod
    def bind(cls, client: Any) -> Scripts:
        """`client.register_script` for every script: redis-py runs EVALSHA and loads on NOSCRIPT."""
        return cls(
            enqueue=client.register_script(lua.ENQUEUE),
            take=client.register_script(lua.TAKE),
            settle=client.register_script(lua.SETTLE),
            promote=client.register_script(lua.PROMOTE),
            renew=client.register_script(lua.RENEW),
            reap=client.register_script(lua.REAP),
            hand_back=client.register_script(lua.HAND_BACK),
            retry_failed=client.register_script(lua.RETRY_FAILED),
            heartbeat=client.register_script(lua.HEARTBEAT),
        )
