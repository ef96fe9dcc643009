"""The host JSON shortcuts must give what the json module gives: the same text, value and error."""

from __future__ import annotations

import json
from typing import Any

import pytest

from stockade.protocol import hostjson

VALUES: list[Any] = [
    {"method": "execute", "params": {"policy": {}, "code": "print('é\\n')", "language": "python"}, "id": 7},
    {"b": 1, "a": [1, 2.5, -0.0, 1e-7, 10**30, None, True, False], "c": {"z": {}, "y": []}},
    {"unicode": '\u2603\U0001f600\x00\x1f"\\', "nan": float("nan"), "inf": float("-inf")},
    {2: "int keys", 1: "become strings"},
    "a bare string \u00e9",
    42,
    None,
    [],
    3.141592653589793,
]


@pytest.mark.parametrize("value", VALUES)
def test_dumps_and_canonical_match_json(value: Any) -> None:
    assert hostjson.dumps(value) == json.dumps(value)
    assert hostjson.canonical(value) == json.dumps(value, sort_keys=True)


def test_canonical_sorts_nested_keys() -> None:
    assert hostjson.canonical({"b": {"y": 1, "x": 2}, "a": 0}) == '{"a": 0, "b": {"x": 2, "y": 1}}'


def test_unserializable_values_fail_as_in_json() -> None:
    for encode in (hostjson.dumps, hostjson.canonical):
        with pytest.raises(TypeError, match="not JSON serializable"):
            encode({"a": object()})
        # A failure part way through leaves nothing behind for the next call.
        assert encode({"a": [1]}) == json.dumps({"a": [1]})


LINES = [
    b'{"method": "ping", "params": {}, "id": 1}',
    b'{"a": [1, 2.5, "\\u00e9", null, true], "b": {}}',
    '{"s": "\u2603 \U0001f600"}'.encode(),
    b'{"a": 1}  \t',
    b"[NaN, Infinity, -Infinity]",
    b'"x"',
    b"12345678901234567890123",
    b"\xef\xbb\xbf" + b'{"bom": 1}',  # json.loads accepts a UTF-8 BOM on bytes
    '{"utf16": 1}'.encode("utf-16"),
    b'  {"leading": "space"}',
]


@pytest.mark.parametrize("line", LINES)
def test_loads_matches_json(line: bytes) -> None:
    assert hostjson.loads(line) == json.loads(line) or json.dumps(hostjson.loads(line)) == json.dumps(json.loads(line))


BAD_LINES = [b"", b"{", b"{not json", b'{"a": }', b"[1,]", b"1 2", b'{"a": 1} x', b"{'a': 1}", b"\xff\xfe\xfd", b"tru"]


@pytest.mark.parametrize("line", BAD_LINES)
def test_loads_fails_as_json_does(line: bytes) -> None:
    with pytest.raises(ValueError) as expected:
        json.loads(line)
    with pytest.raises(ValueError) as got:
        hostjson.loads(line)
    assert type(got.value) is type(expected.value)
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("msg_id", [0, 7, -3, 10**20, None, "req-1", "é", 1.5, True])
def test_id_json_matches_json(msg_id: Any) -> None:
    assert hostjson.id_json(msg_id) == json.dumps(msg_id)
