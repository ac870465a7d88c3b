"""The task message format: msgpack, never pickle.

A message holds what an attempt needs besides what the job record already
holds (the job id is the record's key; the task name is its `task` field):
payload and retry policy. Kept this small, a job record stays under Redis's
64-byte limit for compact hash values, which makes a waiting job about four
times smaller in memory. Anyone who can write to Redis can at worst make a
message fail to decode, never run code. A message carries no due time:
scheduling lives in Redis, on the Redis clock.
"""

from __future__ import annotations

import functools
from typing import Any

import msgpack

FORMAT_VERSION = 2


class MessageDecodeError(ValueError):
    """Bytes in the queue that are not a task message of ours."""


def _compact(value: float | None) -> float | int | None:
    """Whole seconds pack as small ints rather than 9-byte floats."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# A msgpack array of 6, then the version: what every message starts with.
_HEAD = b"\x96" + msgpack.packb(FORMAT_VERSION)


@functools.lru_cache(maxsize=1024)
def _policy(retries: int, retry_delay: float, retry_backoff: float, timeout: float | None) -> bytes:
    """The message's last four items, packed; jobs of a batch mostly share them."""
    return b"".join(msgpack.packb(_compact(value)) for value in (retries, retry_delay, retry_backoff, timeout))


def encode_message(
    *, payload: dict[str, Any], retries: int, retry_delay: float, retry_backoff: float, timeout: float | None
) -> bytes:
    """msgpack [version, payload, retries, retry_delay, retry_backoff, timeout]."""
    return _HEAD + msgpack.packb(payload, use_bin_type=True) + _policy(retries, retry_delay, retry_backoff, timeout)


_FIELDS = ("payload", "retries", "retry_delay", "retry_backoff", "timeout")
_NUMBER = (int, float)


def decode_message(data: bytes) -> dict[str, Any]:
    try:
        items = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:
        raise MessageDecodeError(f"not a msgpack task message: {exc}") from exc
    if not isinstance(items, list) or len(items) != len(_FIELDS) + 1 or items[0] != FORMAT_VERSION:
        raise MessageDecodeError(f"not a task message of format version {FORMAT_VERSION}")
    fields = dict(zip(_FIELDS, items[1:], strict=True))
    if not isinstance(fields["payload"], dict):
        raise MessageDecodeError("task message payload is not a map")
    if not isinstance(fields["retries"], int) or not all(
        isinstance(fields[name], _NUMBER) for name in ("retry_delay", "retry_backoff")
    ):
        raise MessageDecodeError("task message retry policy is not numeric")
    if fields["timeout"] is not None and not isinstance(fields["timeout"], _NUMBER):
        raise MessageDecodeError("task message timeout is not numeric")
    return fields


def _reencode(fields: dict[str, Any], retries: int, retry_delay: float) -> bytes:
    return encode_message(
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
