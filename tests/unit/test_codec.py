"""The task message format: round trips, and garbage that never decodes into a task."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from huey.registry import Message
from hypothesis import given
from hypothesis import strategies as st

from queueservice_server.core.codec import MessageDecodeError, decode_message, encode_message
from queueservice_server.worker.serializer import MsgpackSerializer, huey_message
from queueservice_server.worker.storage import MAX_ERROR_CHARS, format_error

json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20,
)


@given(payload=st.dictionaries(st.text(), json_values, max_size=5), retries=st.integers(0, 99))
def test_round_trip_through_huey_serializer(payload: dict[str, Any], retries: int) -> None:
    message = Message(
        id="default:" + "a" * 32,
        name="diag.noop",
        retries=retries,
        retry_delay=2.0,
        args=(payload,),
        kwargs={},
        timeout=300.0,
        retry_backoff=2.0,
    )
    back = huey_message(message.id, message.name, MsgpackSerializer().serialize(message))
    assert back.id == message.id
    assert back.name == "diag.noop"
    assert back.args == (payload,)
    assert (back.retries, back.retry_delay, back.timeout, back.retry_backoff) == (retries, 2.0, 300.0, 2.0)
    assert back.eta is None


def test_small_payload_fits_a_compact_redis_hash_value() -> None:
    msg = encode_message(payload={"submission": 123456}, retries=2, retry_delay=2.0, retry_backoff=2.0, timeout=300.0)
    assert len(msg) <= 64  # Redis's hash-max-listpack-value: compact encoding


def test_huey_never_decodes_with_pickle() -> None:
    with pytest.raises(TypeError):
        MsgpackSerializer().deserialize(b"\x80\x04K\x01.")


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_decode_into_a_task(data: bytes) -> None:
    try:
        fields = decode_message(data)
    except MessageDecodeError:
        return
    # Only a well-formed message of our format may decode.
    assert isinstance(fields["payload"], dict) and isinstance(fields["retries"], int)


def test_pickle_is_rejected() -> None:
    import pickle  # noqa: PLC0415 - only to prove it is refused

    with pytest.raises(MessageDecodeError):
        decode_message(pickle.dumps({"id": "x"}))


def test_wrong_version_and_shape_are_rejected() -> None:
    good = encode_message(payload={"a": 1}, retries=0, retry_delay=0, retry_backoff=0, timeout=None)
    assert decode_message(good)["payload"] == {"a": 1}
    for bad in ([1, {}, 0, 0, 0, None], [2, [], 0, 0, 0, None], [2, {}, "x", 0, 0, None], [2, {}, 0, 0, 0, "y"]):
        with pytest.raises(MessageDecodeError):
            decode_message(msgpack.packb(bad))


def test_pipelines_are_refused_at_serialization() -> None:
    serializer = MsgpackSerializer()
    inner = Message(id="q:2", name="t", args=({},), kwargs={})
    with pytest.raises(ValueError, match="pipelines"):
        serializer.serialize(Message(id="q:1", name="t", args=({},), kwargs={}, on_complete=inner))


@given(
    payload=st.dictionaries(st.text(), json_values, max_size=5),
    retries=st.integers(0, 99),
    delay=st.sampled_from([0, 0.2, 2.0, 7.5]),
    timeout=st.sampled_from([None, 1.0, 300.0, 0.5]),
)
def test_encoding_is_plain_msgpack(payload: dict[str, Any], retries: int, delay: float, timeout: float | None) -> None:
    """The pieced-together encoding (policy part cached) is byte for byte one msgpack array."""
    whole = [2, payload, retries, delay, 2, timeout]
    expected = msgpack.packb(
        [int(v) if isinstance(v, float) and v.is_integer() else v for v in whole], use_bin_type=True
    )
    assert (
        encode_message(payload=payload, retries=retries, retry_delay=delay, retry_backoff=2.0, timeout=timeout)
        == expected
    )


def test_a_task_error_is_always_utf8_and_cut_between_characters() -> None:
    # A lone surrogate (say, from a file name decoded with surrogateescape) cannot be encoded
    # for Redis; it becomes "?" rather than breaking the write of the attempt.
    assert format_error(ValueError("bad \udce9 name")) == "ValueError: bad ? name"
    long = format_error(RuntimeError("😀" * 5000))
    assert len(long) == MAX_ERROR_CHARS and long.endswith("😀…")
    long.encode()
