"""Hypothesis strategies for hostile but well-formed requests, built from the protos' own
descriptors: every RPC of every service, every field kind, without a strategy per message.

`rpc_calls(hints)` draws `(method, request)` pairs across every method the descriptors
declare, so a new RPC or field is fuzzed without touching this file. Field values are hostile
(edge integers, unknown enum numbers, NUL / RTL / combining-mark text, huge strings and
repeated fields, deep Structs with NaN and infinities, Timestamps and Durations out of
range) and biased, by field name, toward what the service checks (queue and task names,
job id shapes, stream cursors), so that many requests get past the first check.

Sizes stay bounded by construction (see MAX_REQUEST_BYTES): oversized messages are a
different test's concern.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from google.protobuf import struct_pb2, text_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

from queueservice.v1 import admin_service_pb2, queue_service_pb2

# Every message is far below the server's limit (QUEUE_GRPC_MAX_MESSAGE_BYTES, 64 MiB) and
# below the payload limit's order (1 MiB): hostile content, not hostile size.
T = TypeVar("T")
MAX_REQUEST_BYTES = 512 * 1024
MAX_DEPTH = 3
MAX_STRUCT_NESTING = 36
# A field with a tame value (Hints.tame) takes one this many times out of one more.
TAME_WEIGHT = 5

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
UINT32 = (0, 2**32 - 1)
UINT64 = (0, 2**64 - 1)

# Text a service might choke on. No lone surrogates: they are not valid proto3 strings
# (the client library refuses to serialize them), so no caller can send one.
HOSTILE_TEXT = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\x00" * 64,
    "\r\n",
    "\t\x0b\x0c",
    "\x7f\x1b[2J",
    "\u202eevil\u202c",  # RTL override
    "\u200f\u200e\u2066\u2069",  # bidi marks and isolates
    "e" + "\u0301" * 200,  # a pile of combining marks on one letter
    "\u0363" * 50,
    "\ufeff",
    "\ufffd",
    "\uffff",
    "\U0010ffff",
    "\U0001f600\U0001f3f3\ufe0f\u200d\U0001f308",
    "Ⅻ",
    "٣٣",
    "İı",
    "ß",
    "%s%n%x",
    "{}",
    "{0}",
    "${jndi:ldap://x}",
    "'; DROP TABLE jobs; --",
    "../../../../etc/passwd",
    "*",
    "?",
    "[a-z]",
    "{tag}",
    "|",
    "/",
    ":",
    "::",
    "-",
    "a" * 64,
    "a" * 65,
    "null",
    "NaN",
    "-0",
    "1e309",
    "18446744073709551616",
    "-9223372036854775809",
]


def weighted(*choices: tuple[int, st.SearchStrategy[T]]) -> st.SearchStrategy[T]:
    """One of `choices`, each chosen in proportion to its weight. (`st.one_of(a, a, b)` is
    no way to weight: it drops the repeated branch.)"""
    index = st.sampled_from([i for i, (weight, _) in enumerate(choices) for _ in range(weight)])
    strategies = [strategy for _, strategy in choices]

    @st.composite
    def draw(draw: st.DrawFn) -> T:
        return draw(strategies[draw(index)])

    return draw()


# Text with any code point except surrogates (categories Cs), so also unassigned ones.
_ANY_CHAR = st.characters(exclude_categories=["Cs"])
_SHORT_TEXT = st.text(_ANY_CHAR, max_size=12)

# Drawn as one choice from a pool rather than character by character: Hypothesis spends
# ~40 us per choice, and 100,000 requests must be generated in well under a minute.
_PIECES = ["a", "\x00", "\u202e", "e\u0301", "\U0001f600", "ab|", "é"]
HOSTILE_POOL: tuple[str, ...] = (
    *HOSTILE_TEXT,
    *(a + b for a in HOSTILE_TEXT[:16] for b in ("diag.noop", "default", "\x00", "\u202e")),
    *(piece * n for piece in _PIECES for n in (256, 257, 4097)),
    "a" * 40_000,
)
_SHORT_POOL = tuple(text for text in HOSTILE_POOL if len(text) < 300)
HOSTILE_STRINGS: st.SearchStrategy[str] = weighted((3, st.sampled_from(HOSTILE_POOL)), (1, _SHORT_TEXT))


def edge_ints(low: int, high: int) -> st.SearchStrategy[int]:
    """Integers in [low, high], often at the edges and around zero."""
    edges = sorted({v for v in (low, low + 1, -1, 0, 1, 2, high - 1, high) if low <= v <= high})
    return st.one_of(st.sampled_from(edges), st.integers(low, high), st.integers(max(low, -1100), min(high, 1100)))


_DOUBLES = st.one_of(
    st.sampled_from([0.0, -0.0, math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, 2.0**53 + 1, 2.0**63, 2.0**64]),
    st.floats(allow_nan=True, allow_infinity=True),
)
_FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)


# --- the service's own vocabulary, by field name -------------------------------------------


@dataclass(frozen=True)
class Hints:
    """What this service checks, so generated values often pass the first check.
    `job_ids`: ids of real jobs (any state), so GetJob and RetryFailed reach Redis."""

    queues: Sequence[str] = ("default",)
    tasks: Sequence[str] = ("diag.noop", "diag.fail", "diag.sleep")
    job_ids: Sequence[str] = ()
    by_field: dict[str, st.SearchStrategy[Any]] = field(default_factory=dict)

    def queue_names(self) -> st.SearchStrategy[str]:
        near = [
            "",
            "Default",
            "default ",
            " default",
            "default\x00",
            "nope",
            "x.y-z_1",
            "a" * 64,
            "a" * 65,
            "d\u0435fault",
        ]
        return st.one_of(st.sampled_from([*self.queues, *self.queues, *near]), HOSTILE_STRINGS)

    def task_names(self) -> st.SearchStrategy[str]:
        near = ["", "diag.", "DIAG.NOOP", "diag.noop ", "diag.noop\x00", "diag.sleep.x", "test.count"]
        return st.one_of(st.sampled_from([*self.tasks, *self.tasks, *near]), HOSTILE_STRINGS)

    def job_id_shapes(self) -> st.SearchStrategy[str]:
        """Ids shaped like core/jobs.py's `queue:<32 hex>`, and near misses of that shape."""
        hex32 = st.text("0123456789abcdef", min_size=32, max_size=32)
        alnum32 = st.text(st.characters(categories=("Nd", "Lu", "Ll", "Lo", "Nl")), min_size=32, max_size=32)
        local = st.one_of(
            hex32, alnum32, st.text(_ANY_CHAR, min_size=31, max_size=33), st.sampled_from(["", "0" * 32, "Z" * 32])
        )
        shaped = st.builds(
            lambda q, sep, lo: f"{q}{sep}{lo}", self.queue_names(), st.sampled_from([":", ":", "::", "/", ""]), local
        )
        real = [st.sampled_from(list(self.job_ids))] if self.job_ids else []
        return weighted(*[(2, r) for r in real], (1, shaped), (1, HOSTILE_STRINGS))

    def cursors(self) -> st.SearchStrategy[str]:
        """`queue/ms-seq/n` parts joined by `|` (monitor/events.py), with hostile numbers."""
        number = st.one_of(
            st.sampled_from(["0", "1", "-1", "", "+1", "01", " 1", "1e3", "0x10", "\u0661"]),
            st.integers(0, 2**64 + 1).map(str),
            st.sampled_from([str(2**63 - 1), str(2**63), str(2**64 - 1), str(2**64), str(10**30)]),
        )
        stream_id = st.one_of(st.builds(lambda a, b: f"{a}-{b}", number, number), number, st.just("*"), st.just("$"))
        # Mostly configured queues: a cursor is only parsed further when every part names one.
        queue = weighted((3, st.sampled_from(list(self.queues))), (1, self.queue_names()))
        part = st.builds(lambda q, i, n: f"{q}/{i}/{n}", queue, stream_id, number)
        joined = st.lists(part, min_size=1, max_size=4).map("|".join)
        return weighted((2, joined), (1, HOSTILE_STRINGS))

    def tame(self, name: str) -> st.SearchStrategy[Any] | None:
        """A value the service accepts for a field of this name, as plain Python (a dict for
        Struct, Timestamp and Duration), or None: most drawn fields take one of these so
        that a request with one hostile field often passes every other check."""
        now = int(time.time())
        seconds = {"delay": (0, 3600), "timeout": (1, 600), "window": (60, 86400)}
        if name in seconds:
            return st.builds(
                lambda s, n: {"seconds": s, "nanos": n}, st.integers(*seconds[name]), st.integers(0, 999_999_999)
            )
        tame: dict[str, st.SearchStrategy[Any]] = {
            "task": st.sampled_from(list(self.tasks)),
            "queue": st.sampled_from([*self.queues, ""]),
            "job_id": st.sampled_from(list(self.job_ids) or ["default:" + "0" * 32]),
            "job_ids": st.sampled_from(list(self.job_ids) or ["default:" + "0" * 32]),
            "cursor": st.builds(
                lambda q, ms, n: f"{q}/{ms}-0/{n}",
                st.sampled_from(list(self.queues)),
                st.integers(0, now * 1000),
                st.integers(0, 100),
            ),
            "idempotency_key": st.sampled_from(["k1", "k2", "k3"]),
            "priority": st.integers(0, 1000),
            "max_attempts": st.integers(1, 100),
            "limit": st.integers(0, 50),
            "last_n": st.integers(0, 100),
            "schedule_time": st.builds(lambda s: {"seconds": s, "nanos": 0}, st.integers(now - 60, now + 3600)),
            "payload": st.builds(
                _diag_payload,
                st.sampled_from([None, 0, 0.01]),
                st.sampled_from(["", "boom", "é" * 200, "x" + "é" * 300, "\U0001f600" * 200]),
            ),
        }
        return tame.get(name)

    def for_field(self, name: str) -> st.SearchStrategy[Any] | None:
        """Near misses for a string field of this name: values shaped like what it takes."""
        if name in self.by_field:
            return self.by_field[name]
        if name in ("queue", "queues"):
            return self.queue_names()
        if name == "task":
            return self.task_names()
        if name in ("job_id", "job_ids"):
            return self.job_id_shapes()
        if name == "cursor":
            return self.cursors()
        if name == "idempotency_key":
            # A few shared keys so deduplication is hit, plus the length limit's edges.
            return st.one_of(st.sampled_from(["k1", "k2", "ключ", "a" * 256, "a" * 257, "é" * 256]), HOSTILE_STRINGS)
        return None


# --- well-known types --------------------------------------------------------------------


def _nested(depth: int, leaf: Any) -> Any:
    value = leaf
    for level in range(depth):
        value = {"n": value} if level % 2 else [value]
    return value if isinstance(value, dict) else {"n": value}


def _json_leaves() -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), st.booleans(), _DOUBLES, HOSTILE_STRINGS)


def struct_values(hints: Hints) -> st.SearchStrategy[dict[str, Any]]:
    """google.protobuf.Struct contents: deep nesting, huge and non-finite numbers, hostile
    keys, and the keys diag tasks read. Nesting stops short of protobuf's limit of 100 message
    levels (a level of `_nested` is 2-3 of them): past it the client library itself refuses
    the message, so only raw bytes can carry it (test_fuzz.py sends those)."""
    keys = st.one_of(st.sampled_from(["seconds", "message", "n", "", *_SHORT_POOL]), _SHORT_TEXT)
    leaf = _json_leaves()
    # Nested containers without st.recursive, which costs ten times more per value here.
    value = weighted((2, leaf), (1, st.lists(leaf, max_size=3)), (1, st.dictionaries(keys, leaf, max_size=3)))
    diag = st.builds(
        _diag_payload, st.one_of(_DOUBLES, st.sampled_from([None, 0, 0.001, 0.05, 1, -1, "1"])), HOSTILE_STRINGS
    )
    deep = st.builds(_nested, st.integers(1, MAX_STRUCT_NESTING), leaf)
    wide = st.builds(lambda n, v: {f"k{i}": v for i in range(n)}, st.integers(100, 500), leaf)
    return weighted((3, diag), (1, st.dictionaries(keys, value, max_size=4)), (1, deep), (1, wide))


def _diag_payload(seconds: Any, message: str) -> dict[str, Any]:
    # What diag.sleep and diag.fail read, hostile: short sleeps only, or the worker spends
    # the run asleep (a huge or negative number fails the job, which is fine).
    payload: dict[str, Any] = {"message": message}
    if seconds is not None:
        payload["seconds"] = seconds if not isinstance(seconds, float) or not 0 < seconds < 1e6 else seconds % 0.05
    return payload


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


# Seconds the proto allows on the wire (int64) against the range Timestamp documents
# (0001-01-01 .. 9999-12-31) and Duration's +-10,000 years.
_TIMESTAMP_MIN, _TIMESTAMP_MAX = -62_135_596_800, 253_402_300_799
_DURATION_MAX = 315_576_000_000


def _seconds_near_now() -> st.SearchStrategy[int]:
    now = int(time.time())
    return st.integers(now - 7 * 86400, now + 400 * 86400)


def timestamps() -> st.SearchStrategy[dict[str, int]]:
    seconds = st.one_of(
        _seconds_near_now(),
        edge_ints(*INT64),
        st.sampled_from([_TIMESTAMP_MIN, _TIMESTAMP_MIN - 1, _TIMESTAMP_MAX, _TIMESTAMP_MAX + 1, 0, -1]),
    )
    nanos = st.one_of(st.integers(0, 999_999_999), edge_ints(*INT32))
    return st.fixed_dictionaries({"seconds": seconds, "nanos": nanos})


def durations() -> st.SearchStrategy[dict[str, int]]:
    seconds = st.one_of(
        st.integers(-10, 400 * 86400),
        edge_ints(*INT64),
        st.sampled_from([_DURATION_MAX, _DURATION_MAX + 1, -_DURATION_MAX - 1, 59, 60, 86400, 86401]),
    )
    nanos = st.one_of(st.integers(-999_999_999, 999_999_999), edge_ints(*INT32))
    return st.fixed_dictionaries({"seconds": seconds, "nanos": nanos})


# --- generic fields and messages ---------------------------------------------------------

_SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_INT32: edge_ints(*INT32),
    FieldDescriptor.TYPE_SINT32: edge_ints(*INT32),
    FieldDescriptor.TYPE_SFIXED32: edge_ints(*INT32),
    FieldDescriptor.TYPE_INT64: edge_ints(*INT64),
    FieldDescriptor.TYPE_SINT64: edge_ints(*INT64),
    FieldDescriptor.TYPE_SFIXED64: edge_ints(*INT64),
    FieldDescriptor.TYPE_UINT32: edge_ints(*UINT32),
    FieldDescriptor.TYPE_FIXED32: edge_ints(*UINT32),
    FieldDescriptor.TYPE_UINT64: edge_ints(*UINT64),
    FieldDescriptor.TYPE_FIXED64: edge_ints(*UINT64),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_DOUBLE: _DOUBLES,
    FieldDescriptor.TYPE_FLOAT: _FLOATS,
    FieldDescriptor.TYPE_STRING: HOSTILE_STRINGS,
    FieldDescriptor.TYPE_BYTES: st.one_of(
        st.binary(max_size=64), st.builds(bytes.__mul__, st.binary(min_size=1, max_size=4), st.integers(1000, 40_000))
    ),
}


def _message_type(fd: FieldDescriptor) -> Descriptor:
    assert fd.message_type is not None, fd.full_name
    return fd.message_type


def _enum_values(fd: FieldDescriptor) -> st.SearchStrategy[int]:
    assert fd.enum_type is not None
    known = [v.number for v in fd.enum_type.values]
    # proto3 enums are open: any int32 is a legal value on the wire.
    return st.one_of(st.sampled_from(known), st.sampled_from([max(known) + 1, -1]), edge_ints(*INT32))


def _weight(value: Any) -> int:
    if isinstance(value, Message):
        return value.ByteSize() + 3
    if isinstance(value, str | bytes):
        return len(value) * (4 if isinstance(value, str) else 1) + 3
    return 10


def _replicate(few: list[Any], n: int) -> list[Any]:
    # Never past MAX_REQUEST_BYTES: a thousand copies of a large element is a size test, not this one.
    n = min(n, MAX_REQUEST_BYTES // max(_weight(v) for v in few))
    return [few[i % len(few)] for i in range(n)]


def _many(element: st.SearchStrategy[Any], budget: int) -> st.SearchStrategy[list[Any]]:
    """Many elements for one draw each of a few distinct ones and a count (lists of
    thousands drawn element by element are too slow and too big for Hypothesis)."""
    counts = st.one_of(st.integers(20, 100), st.sampled_from([budget, budget + 1]))
    return st.builds(_replicate, st.lists(element, min_size=1, max_size=3), counts)


class MessageStrategies:
    """Strategies for any message type, from its descriptor. Values are drawn as plain
    Python (dicts for messages) and built into the message at the end."""

    def __init__(self, hints: Hints, repeated_budget: int = 1001) -> None:
        self.hints = hints
        self.repeated_budget = repeated_budget
        self._cache: dict[tuple[str, int], st.SearchStrategy[Message]] = {}

    def message(self, desc: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
        key = (desc.full_name, depth)
        if key not in self._cache:
            self._cache[key] = self._build(desc, depth)
        return self._cache[key]

    def _build(self, desc: Descriptor, depth: int) -> st.SearchStrategy[Message]:
        cls = GetMessageClass(desc)
        known = {"google.protobuf.Timestamp": timestamps(), "google.protobuf.Duration": durations()}
        if desc.full_name in known:
            return known[desc.full_name].map(lambda v: cls(**v))
        if desc.full_name == "google.protobuf.Struct":
            return struct_values(self.hints).map(_struct)
        if desc.full_name in ("google.protobuf.Value", "google.protobuf.ListValue"):
            return struct_values(self.hints).map(lambda v: _wkt_from_struct(cls, v))
        if depth > MAX_DEPTH:
            return st.just(cls())
        wild: dict[str, st.SearchStrategy[Any]] = {}
        oneofs: list[st.SearchStrategy[tuple[str, Any] | None]] = []
        for oneof in desc.oneofs:
            if len(oneof.fields) == 1:  # proto3 `optional`: a synthetic oneof, plain presence
                continue
            members = [st.tuples(st.just(fd.name), self.field_value(fd, depth)) for fd in oneof.fields]
            oneofs.append(st.one_of(st.none(), *members))
        for fd in desc.fields:
            if fd.containing_oneof is None or len(fd.containing_oneof.fields) == 1:
                wild[fd.name] = self.field_value(fd, depth)
        wild_message = st.builds(
            lambda values, chosen: _build_message(cls, values, chosen), _some_of(wild), st.tuples(*oneofs)
        )
        tame = {fd.name: t for fd in desc.fields if (t := self.tame_value(fd)) is not None}
        hostile = {fd.name: self.hostile_value(fd, depth) for fd in desc.fields}
        one_off = _one_off(cls, tame, hostile)
        # Wild: any field anything. One-off: tame fields but one, which is hostile, so each
        # check is reached with the others passed. Tame alone: requests that should succeed.
        modes = [(1, wild_message), (2, one_off)]
        if tame:
            modes.append((1, _some_of(tame, usually=True).map(lambda values: _build_message(cls, values, ()))))
        return weighted(*modes)

    def tame_value(self, fd: FieldDescriptor) -> st.SearchStrategy[Any] | None:
        tame = self.hints.tame(fd.name)
        if tame is None:
            return None
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            tame = tame.map(_to_message(GetMessageClass(_message_type(fd))))
        return st.lists(tame, min_size=1, max_size=3) if fd.is_repeated else tame

    def field_value(self, fd: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        """Usually tame, sometimes hostile."""
        hostile = self.hostile_value(fd, depth)
        tame = self.tame_value(fd)
        return hostile if tame is None else weighted((TAME_WEIGHT, tame), (1, hostile))

    def hostile_value(self, fd: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        single = self._hostile_value(fd, depth)
        if not fd.is_repeated:
            return single
        budget = self.repeated_budget if depth == 0 else 20
        return weighted((2, st.lists(single, max_size=4)), (1, _many(single, budget)))

    def _hostile_value(self, fd: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            single: st.SearchStrategy[Any] = self.message(_message_type(fd), depth + 1)
        elif fd.type == FieldDescriptor.TYPE_ENUM:
            single = _enum_values(fd)
        else:
            single = _SCALARS[fd.type]
            hinted = self.hints.for_field(fd.name) if fd.type == FieldDescriptor.TYPE_STRING else None
            if hinted is not None:
                single = weighted((2, hinted), (1, single))
        return single


def _to_message(cls: type[Message]) -> Callable[[dict[str, Any]], Message]:
    def build(value: dict[str, Any]) -> Message:
        return _struct(value) if cls is struct_pb2.Struct else cls(**value)

    return build


def _some_of(values: dict[str, st.SearchStrategy[Any]], *, usually: bool = False) -> st.SearchStrategy[dict[str, Any]]:
    """Any subset of the fields, with values: one draw for which are present (a bit mask)
    rather than one per field as `fixed_dictionaries(optional=...)` makes. `usually`: each
    field is present three times out of four."""
    names = sorted(values)
    masks = st.integers(0, 2 ** len(names) - 1)

    @st.composite
    def draw(draw: st.DrawFn) -> dict[str, Any]:
        mask = draw(masks) | (draw(masks) if usually else 0)
        return {name: draw(values[name]) for i, name in enumerate(names) if mask >> i & 1}

    return draw()


def _one_off(
    cls: type[Message], tame: dict[str, st.SearchStrategy[Any]], hostile: dict[str, st.SearchStrategy[Any]]
) -> st.SearchStrategy[Message]:
    """Tame fields (most of them present) and one hostile field."""
    names = sorted(hostile)
    tame_values = _some_of(tame, usually=True)

    @st.composite
    def draw(draw: st.DrawFn) -> Message:
        values = draw(tame_values)
        name = draw(st.sampled_from(names))
        values.pop(name, None)
        message = _build_message(cls, values, ())
        _set(message, name, draw(hostile[name]))
        return message

    return draw()


def _wkt_from_struct(cls: type[Message], value: dict[str, Any]) -> Message:
    message = cls()
    if isinstance(message, struct_pb2.ListValue):
        message.extend(list(value.values()))
    elif isinstance(message, struct_pb2.Value):
        message.struct_value.update(value)
    return message


def _build_message(cls: type[Message], values: dict[str, Any], chosen: tuple[tuple[str, Any] | None, ...]) -> Message:
    message = cls()
    for name, value in [*values.items(), *filter(None, chosen)]:
        _set(message, name, value)
    return message


def _set(message: Message, name: str, value: Any) -> None:
    target = getattr(message, name)
    if isinstance(value, Message):
        target.CopyFrom(value)
    elif isinstance(value, list):
        target.extend(value)
    else:
        setattr(message, name, value)


# --- RPCs ------------------------------------------------------------------------------

SERVICES: tuple[ServiceDescriptor, ...] = tuple(
    service
    for module in (queue_service_pb2, admin_service_pb2)
    for service in module.DESCRIPTOR.services_by_name.values()
)


@dataclass(frozen=True)
class Rpc:
    """One method as the client calls it: `/package.Service/Method` and its message classes."""

    path: str
    method: MethodDescriptor
    request_cls: type[Message]
    response_cls: type[Message]

    @property
    def server_streaming(self) -> bool:
        return bool(self.method.server_streaming)

    @property
    def name(self) -> str:
        return self.method.name


def all_rpcs(services: Sequence[ServiceDescriptor] = SERVICES) -> list[Rpc]:
    """Every method of every service, from the descriptors (a new RPC is in here by itself)."""
    rpcs = []
    for service in services:
        for method in service.methods:
            if method.client_streaming:
                raise NotImplementedError(f"{method.full_name}: client streaming is not fuzzed yet")
            rpcs.append(
                Rpc(
                    f"/{service.full_name}/{method.name}",
                    method,
                    GetMessageClass(method.input_type),
                    GetMessageClass(method.output_type),
                )
            )
    return rpcs


def rpc_calls(
    hints: Hints,
    rpcs: Sequence[Rpc] | None = None,
    max_bytes: int = MAX_REQUEST_BYTES,
    weights: Mapping[str, int] | None = None,
) -> st.SearchStrategy[tuple[Rpc, Message]]:
    """A method and a hostile request for it, at most `max_bytes` long. Methods are chosen
    in proportion to `weights` (by method name, default 1 each)."""
    strategies = MessageStrategies(hints)
    choices = []
    for rpc in rpcs if rpcs is not None else all_rpcs():
        requests = strategies.message(rpc.method.input_type).filter(lambda m: m.ByteSize() <= max_bytes)
        choices.append(((weights or {}).get(rpc.name, 1), st.tuples(st.just(rpc), requests)))
    return weighted(*choices)


def describe(message: Message, limit: int = 600) -> str:
    """A request, short enough to print: text format, long runs elided."""
    text = text_format.MessageToString(message, as_one_line=True, as_utf8=False) or "(an empty request)"
    return (
        text if len(text) <= limit else f"{text[: limit // 2]} ... {text[-limit // 2 :]} ({message.ByteSize()} bytes)"
    )


# --- minimising a failing request ------------------------------------------------------


def shrink_candidates(message: Message) -> Iterator[Message]:
    """Smaller variants of `message`, simplest first (lazily: each is a copy): a field cleared,
    a repeated field or map cut to one element or half, a string or number cut down, a nested
    message shrunk."""
    for fd, value in message.ListFields():
        cleared = _copy(message)
        cleared.ClearField(fd.name)
        yield cleared
        is_map = fd.type == FieldDescriptor.TYPE_MESSAGE and _message_type(fd).GetOptions().map_entry
        if is_map:
            keys = list(value)
            for keep in sorted({1, len(keys) // 2} - {0, len(keys)}):
                cut = _copy(message)
                for key in keys[keep:]:
                    del getattr(cut, fd.name)[key]
                yield cut
            if _message_type(fd).fields_by_name["value"].type == FieldDescriptor.TYPE_MESSAGE:
                for key in keys[:1]:
                    for smaller in shrink_candidates(value[key]):
                        changed = _copy(message)
                        getattr(changed, fd.name)[key].CopyFrom(smaller)
                        yield changed
        elif fd.is_repeated:
            n = len(value)
            # Halves and single ends first (a long list shrinks in a few steps), then one
            # element less, then smaller elements.
            cuts = [slice(1, None), slice(None, -1)] if n > 1 else []
            if n > 3:
                cuts = [slice(n // 2, None), slice(None, n // 2), slice(1, None), slice(None, n - 1)]
            for index in [*cuts, *(range(n) if n <= 16 else [])]:
                cut = _copy(message)
                del getattr(cut, fd.name)[index]
                yield cut
            if fd.type == FieldDescriptor.TYPE_MESSAGE:
                for i in range(n):
                    for smaller in shrink_candidates(value[i]):
                        changed = _copy(message)
                        getattr(changed, fd.name)[i].CopyFrom(smaller)
                        yield changed
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            for smaller in shrink_candidates(value):
                changed = _copy(message)
                getattr(changed, fd.name).CopyFrom(smaller)
                yield changed
        elif fd.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES) and len(value) > 1:
            for cut_value in (value[:1], value[: len(value) // 2], value[len(value) // 2 :]):
                changed = _copy(message)
                setattr(changed, fd.name, cut_value)
                yield changed
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > 1:
            for smaller_int in (int(math.copysign(1, value)), value // 2):
                changed = _copy(message)
                setattr(changed, fd.name, smaller_int)
                yield changed


def _copy(message: Message) -> Message:
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


def minimise(message: Message, still_fails: Callable[[Message], bool], max_tries: int = 300) -> Message:
    """Greedy delta debugging over the message's fields: keeps the first smaller variant that
    still fails, until none does or `max_tries` checks were spent."""
    tries = 0
    improved = True
    while improved and tries < max_tries:
        improved = False
        for candidate in shrink_candidates(message):
            tries += 1
            if still_fails(candidate):
                message, improved = candidate, True
                break
            if tries >= max_tries:
                break
    return message
