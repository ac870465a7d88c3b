"""The Lua scripts bound to one Redis client (sync or async), and how to run them in pipelines.

redis-py checks every script of a pipeline with SCRIPT EXISTS before each
execute, which costs a round trip per pipeline; here pipelines queue EVALSHA
directly and load the scripts only when Redis answers NOSCRIPT (a restarted
or flushed server), then run the pipeline once more. That re-run, and the
Redis client's one retry on a broken connection (core/redis.py), are safe
because every script is safe to run twice with the same arguments: fenced by
job tokens, or by a per-call token (TAKE), or by never overwriting (ENQUEUE);
each script's header in lua.py says which.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from redis.exceptions import NoScriptError

from queueservice_server.core import lua


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
        """`client.register_script` for every script: a direct call runs EVALSHA and loads on NOSCRIPT."""
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

    def texts(self) -> list[str]:
        return [getattr(self, f.name).script for f in fields(self)]


@dataclass(frozen=True)
class TakenJob:
    """One job of a TAKE reply."""

    local_id: str
    msg: bytes
    ready_ms: int
    attempt: int
    task: str


@dataclass(frozen=True)
class TakeReply:
    now_ms: int
    # When the rate limit let nothing be taken: ms until a token frees up (else 0).
    wait_ms: int
    jobs: list[TakenJob]

    @classmethod
    def decode(cls, reply: Sequence[Any]) -> TakeReply:
        """{now, wait_ms, then per job: local id, msg, ready_at, attempt, task} (see lua.TAKE)."""
        now_ms, wait_ms, *flat = reply
        jobs = [
            TakenJob(local.decode(), msg, int(ready), int(attempt), task.decode(errors="replace"))
            for local, msg, ready, attempt, task in zip(*[iter(flat)] * 5, strict=True)
        ]
        return cls(int(now_ms), int(wait_ms), jobs)


def decode_enqueue(reply: Sequence[Any]) -> list[tuple[str, bool, int]]:
    """Per job (local id, deduplicated, enqueued_at ms) from {id, dedup, at, ...} (see lua.ENQUEUE)."""
    return [(local.decode(), bool(dedup), int(at)) for local, dedup, at in zip(*[iter(reply)] * 3, strict=True)]


def call(script: Any, keys: Sequence[Any], args: Sequence[Any], pipe: Any = None) -> Any:
    """Runs `script` (when `pipe` is None) or queues it on `pipe` without redis-py's script check."""
    if pipe is None:
        return script(keys=keys, args=args)
    return pipe.evalsha(script.sha, len(keys), *keys, *args)


def execute(client: Any, scripts: Scripts, build: Callable[[Any], None]) -> list[Any]:
    """Builds a pipeline with `build` and runs it, loading the scripts once if Redis lost them."""
    for attempt in range(2):
        with client.pipeline(transaction=False) as pipe:
            build(pipe)
            try:
                replies: list[Any] = pipe.execute()
                return replies
            except NoScriptError:
                if attempt:
                    raise
                for text in scripts.texts():
                    client.script_load(text)
    raise AssertionError("unreachable")


async def execute_async(client: Any, scripts: Scripts, build: Callable[[Any], Awaitable[None] | None]) -> list[Any]:
    """`execute` for redis.asyncio clients."""
    for attempt in range(2):
        async with client.pipeline(transaction=False) as pipe:
            built = build(pipe)
            if built is not None:
                await built
            try:
                replies: list[Any] = await pipe.execute()
                return replies
            except NoScriptError:
                if attempt:
                    raise
                for text in scripts.texts():
                    await client.script_load(text)
    raise AssertionError("unreachable")
