"""Huey's side of the task message: the serializer Huey is given, and the Huey
message the worker builds for one attempt from a job's record (see core/codec.py
for the format itself)."""

from __future__ import annotations

import calendar
import datetime

from huey.registry import Message
from huey.serializer import Serializer

from queueservice_server.core.codec import decode_message, encode_message


def to_timestamp(value: datetime.datetime | None) -> float | None:
    if value is None:
        return None
    return calendar.timegm(value.utctimetuple()) + value.microsecond / 1e6


def huey_message(job_id: str, task: str, data: bytes) -> Message:
    """The Huey message for one attempt of job `job_id` of `task`."""
    fields = decode_message(data)
    return Message(
        id=job_id,
        name=task,
        retries=fields["retries"],
        retry_delay=fields["retry_delay"],
        args=(fields["payload"],),
        kwargs={},
        timeout=fields["timeout"],
        retry_backoff=fields["retry_backoff"],
    )


class MsgpackSerializer(Serializer):  # type: ignore[misc]
    """Huey serializer for our messages. Huey serializes a task it retries; it never
    deserializes one here: the worker builds messages with `huey_message`, from the record."""

    def _serialize(self, data: Message) -> bytes:
        if data.on_complete or data.on_error or data.chord_config:
            raise ValueError("task pipelines (then/error/chord) are not supported by the queue service")
        return encode_message(
            payload=data.args[0] if data.args else {},
            retries=data.retries or 0,
            retry_delay=data.retry_delay or 0,
            retry_backoff=data.retry_backoff or 0,
            timeout=data.timeout,
        )

    def _deserialize(self, data: bytes) -> Message:
        # Huey's default here is pickle.loads: make sure nothing ever reaches it.
        raise TypeError("queue messages are decoded with serializer.huey_message, never by Huey")
