"""Plain Huey, the baseline: `RedisHuey` as a Huey user gets it (pickle, results
on, BRPOP consumer) with one no-op task, importable by the bench and by the
consumer process alike so both agree on the task's name."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from huey import RedisHuey


def noop(payload: dict[str, Any]) -> None:
    return None


class PlainHuey:
    """A plain Huey app on `redis_url` and its no-op task."""

    def __init__(self, redis_url: str) -> None:
        self.huey: Any = RedisHuey("bench", url=redis_url)
        self.noop: Any = self.huey.task(name="bench.noop")(noop)

    def enqueue_one_at_a_time(self, payloads: Sequence[dict[str, Any]]) -> None:
        """What a Huey user writes: call the task, one Redis round trip per job."""
        for payload in payloads:
            self.noop(payload)

    def enqueue_pipelined(self, payloads: Sequence[dict[str, Any]], chunk: int = 1000) -> None:
        """Huey's best case (not its API): the same messages, serialized by Huey, LPUSHed in pipelines."""
        storage = self.huey.storage
        for start in range(0, len(payloads), chunk):
            with storage.conn.pipeline(transaction=False) as pipe:
                for payload in payloads[start : start + chunk]:
                    pipe.lpush(storage.queue_key, self.huey.serialize_task(self.noop.s(payload)))
                pipe.execute()

    def waiting(self) -> int:
        count: int = self.huey.storage.conn.llen(self.huey.storage.queue_key)
        return count

    def close(self) -> None:
        self.huey.storage.conn.close()
