"""Request payloads to plain data, and new job ids: the fast paths agree with the slow, obvious ones."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, struct_pb2
from hypothesis import given
from hypothesis import strategies as st

from queueservice_server.api.convert import struct_to_dict
from queueservice_server.core.jobs import new_local_ids, split_job_id

json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=25,
)


@given(st.dictionaries(st.text(), json_values, max_size=6))
def test_struct_to_dict_matches_json_format(payload: dict[str, Any]) -> None:
    struct = struct_pb2.Struct()
    struct.update(payload)
    assert struct_to_dict(struct) == json_format.MessageToDict(struct)


def test_new_local_ids_are_distinct_job_ids() -> None:
    ids = new_local_ids(1000)
    assert len(set(ids)) == 1000
    assert all(split_job_id(f"default:{local}") == ("default", local) for local in ids)
