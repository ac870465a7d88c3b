"""The Lua scripts bound to one Redis client (sync or async), and the key arguments each takes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from queueservice_server import lua


@dataclass(frozen=True)
class Scripts:
    enqueue: Any
    take: Any
    finish: Any
    retry: Any
    promote: Any

    @classmethod
    def bind(cls, client: Any) -> Scripts:
        """`client.register_script` for every script: redis-py runs EVALSHA and loads on NOSCRIPT."""
        return cls(
            enqueue=client.register_script(lua.ENQUEUE),
            take=client.register_script(lua.TAKE),
            finish=client.register_script(lua.FINISH),
            retry=client.register_script(lua.RETRY),
            promote=client.register_script(lua.PROMOTE),
        )
