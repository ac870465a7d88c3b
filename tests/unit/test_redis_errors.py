"""How Redis error replies map to what callers get, for the replies a single machine cannot
produce for real (LOADING at will, a cluster's TRYAGAIN and CLUSTERDOWN), and for each form
redis-py hands a reply over in: its own class, a pipeline's annotation, Redis 6.2's wrapping
of an error inside a script. The replies tests/integration/test_redis_errors.py makes for
real are here too, in the forms those tests meet."""

from __future__ import annotations

import grpc
import pytest
import redis.exceptions
from redis._parsers import _RESP2Parser

from queueservice_server.api.errors import redis_error
from queueservice_server.core.redis import Kind, Trouble, error_code, trouble

SCRIPT_6_2 = "Error running script (call to f_82cd): @user_script:1: @user_script: 1: -{reply}"
PIPELINE = "Command # 1 (EVALSHA 82cd 3 k1 k2 k3 a b) of pipeline caused error: {reply}"


def parsed(reply: str) -> Exception:
    """The exception redis-py raises for the error reply `reply` (without its leading '-')."""
    exc = _RESP2Parser(socket_read_size=65536).parse_error(reply)  # type: ignore[no-untyped-call]
    assert isinstance(exc, Exception)
    return exc


@pytest.mark.parametrize(
    ("reply", "code", "fragment"),
    [
        ("LOADING Redis is loading the dataset in memory", "LOADING", "loading its data into memory"),
        ("TRYAGAIN Multiple keys request during rehashing of slot", "TRYAGAIN", "moving keys between cluster nodes"),
        ("CLUSTERDOWN The cluster is down", "CLUSTERDOWN", "cannot serve every slot"),
        ("MASTERDOWN Link with MASTER is down", "MASTERDOWN", "lost its primary"),
        ("READONLY You can't write against a read only replica.", "READONLY", "read-only replica"),
        ("BUSY Redis is busy running a script.", "BUSY", "busy running a long script"),
    ],
)
def test_try_again_replies_are_unavailable_in_every_form(reply: str, code: str, fragment: str) -> None:
    for exc in (
        parsed(reply),
        redis.exceptions.ResponseError(PIPELINE.format(reply=reply)),
        redis.exceptions.ResponseError(SCRIPT_6_2.format(reply=reply)),
        redis.exceptions.ResponseError(PIPELINE.format(reply=SCRIPT_6_2.format(reply=reply))),
    ):
        assert trouble(exc) == Trouble(Kind.RETRY, code), exc
        error = redis_error(Trouble(Kind.RETRY, code), exc)
        assert error.code == grpc.StatusCode.UNAVAILABLE
        assert fragment in error.message and f"({code}" in error.message and "retry with backoff" in error.message


def test_oom_is_resource_exhausted_about_redis_memory() -> None:
    reply = "OOM command not allowed when used memory > 'maxmemory'."
    for exc in (parsed(reply), redis.exceptions.ResponseError(SCRIPT_6_2.format(reply=reply))):
        found = trouble(exc)
        assert found == Trouble(Kind.OUT_OF_MEMORY, "OOM")
        error = redis_error(found, exc)
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "maxmemory" in error.message


@pytest.mark.parametrize(
    "reply", ["WRONGPASS invalid username-password pair or user is disabled.", "NOAUTH Authentication required."]
)
def test_a_refused_password_is_unavailable_saying_so(reply: str) -> None:
    exc = parsed(reply)
    # redis-py counts it as a connection error; it must not read as "unreachable".
    assert isinstance(exc, redis.exceptions.ConnectionError)
    found = trouble(exc)
    assert found == Trouble(Kind.AUTH, "AUTH")
    error = redis_error(found, exc)
    assert error.code == grpc.StatusCode.UNAVAILABLE and error.message.startswith("Redis refused the password")


def test_down_and_unknown_errors() -> None:
    assert trouble(redis.exceptions.ConnectionError("Connection refused")) == Trouble(Kind.DOWN, "")
    assert trouble(redis.exceptions.TimeoutError("Timeout reading")) == Trouble(Kind.DOWN, "")
    # Not Redis's state: a bug, answered INTERNAL.
    for exc in (
        redis.exceptions.ResponseError("ERR wrong number of arguments for 'hget' command"),
        redis.exceptions.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
        ValueError("BUSY"),
    ):
        assert trouble(exc) is None, exc
    # A caller's text inside a pipeline's command echo is not the reply: the last prefix counts.
    echoed = "Command # 1 (EVALSHA 82cd 1 x) of pipeline caused error: BUSY y) of pipeline caused error: ERR no"
    assert error_code(redis.exceptions.ResponseError(echoed)) == "ERR"
    assert trouble(redis.exceptions.ResponseError(echoed)) is None
