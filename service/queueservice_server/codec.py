"""The task message format: msgpack, never pickle.

Huey hands its storage opaque bytes; ours are a msgpack list, so anyone who
can write to Redis can at worst make a message fail to decode, never run code.
A message carries no due time: scheduling lives in Redis, on the Redis clock.
"""

from __future__ import annotations

import calendar
import datetime
from typing import Any

import msgpack
from huey.registry import Message
from huey.serializer import Serializer

FORMAT_VERSION = 1


class MessageDecodeError(ValueError):
    """Bytes in the queue that are not a task message of ours."""


def to_timestamp(value: datetime.datetime | None) -> float | None:
    if value is None:
        return None
    return calendar.timegm(value.utctimetuple()) + value.microsecond / 1e6


class MsgpackSerializer(Serializer):  # type: ignore[misc]
    """Huey serializer for our messages: the fields a job needs, as msgpack."""

    def _serialize(self, data: Message) -> bytes:
        if data.on_complete or data.on_error or data.chord_config:
            raise ValueError("task pipelines (then/error/chord) are not supported by the queue service")
        return encode_message(
            job_id=data.id,
            task=data.name,
            payload=data.args[0] if data.args else {},
            retries=data.retries or 0,
            retry_delay=data.retry_delay or 0,
            retry_backoff=data.retry_backoff or 0,
            timeout=data.timeout,
        )

    def _deserialize(self, data: bytes) -> Message:
        fields = decode_message(data)
        return Message(
            id=fields["id"],
            name=fields["task"],
            retries=fields["retries"],
            retry_delay=fields["retry_delay"],
            args=(fields["payload"],),
            kwargs={},
            timeout=fields["timeout"],
            retry_backoff=fields["retry_backoff"],
        )


def encode_message(
    *,
    job_id: str,
    task: str,
    payload: dict[str, Any],
    retries: int,
    retry_delay: float,
    retry_backoff: float,
    timeout: float | None,
) -> bytes:
    packed: bytes = msgpack.packb(
        [FORMAT_VERSION, job_id, task, payload, retries, retry_delay, retry_backoff, timeout],
        use_bin_type=True,
    )
    return packed


_FIELDS = ("id", "task", "payload", "retries", "retry_delay", "retry_backoff", "timeout")


def decode_message(data: bytes) -> dict[str, Any]:
    try:
        items = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:
        raise MessageDecodeError(f"not a msgpack task message: {exc}") from exc
    if not isinstance(items, list) or len(items) != len(_FIELDS) + 1 or items[0] != FORMAT_VERSION:
        raise MessageDecodeError(f"not a task message of format version {FORMAT_VERSION}")
    fields = dict(zip(_FIELDS, items[1:], strict=True))
    if not isinstance(fields["id"], str) or not isinstance(fields["task"], str):
        raise MessageDecodeError("task message has no job id or task name")
    if not isinstance(fields["payload"], dict):
        raise MessageDecodeError("task message payload is not a map")
    return fields


def _reencode(fields: dict[str, Any], retries: int, retry_delay: float) -> bytes:
    return encode_message(
        job_id=fields["id"],
        task=fields["task"],
        payload=fields["payload"],
        retries=retries,
        retry_delay=retry_delay,
        retry_backoff=fields["retry_backoff"],
        timeout=fields["timeout"],
    )


def next_attempt(fields: dict[str, Any]) -> tuple[bytes, float] | None:
    """The message and delay (s) of the next attempt after a failed one, or None when
    the attempts are spent: the policy Huey applies to a task that raised, for
    attempts that ended without Huey seeing them (a worker killed at its hard timeout)."""
    retries: int = fields["retries"]
    if retries <= 0:
        return None
    delay: float = fields["retry_delay"] or 0
    backoff: float = fields["retry_backoff"] or 0
    return _reencode(fields, retries - 1, delay * backoff if backoff else delay), delay


def fresh_message(fields: dict[str, Any], max_attempts: int) -> bytes:
    """The message a failed job starts over with: every attempt back, the first retry delay restored."""
    backoff: float = fields["retry_backoff"] or 0
    spent = max(0, max_attempts - 1 - fields["retries"])
    delay: float = fields["retry_delay"] or 0
    return _reencode(fields, max_attempts - 1, delay / backoff**spent if backoff else delay)
