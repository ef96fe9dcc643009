"""The agent's JSON codec must agree with the json module, without importing it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from stockade.agent import jsoncodec

SAMPLES = [
    {"a": [1, 2.5, 'x\u00e9\n\t"', None, True, False, {"b": {}}], "c": -3},
    [],
    "plain",
    10**30,
    1e-7,
    {"nested": [[[]]], "unicode": "\u2603\U0001f600"},
]


@pytest.mark.parametrize("value", SAMPLES)
def test_matches_json(value: object) -> None:
    assert jsoncodec.dumps(value) == json.dumps(value, separators=(",", ":"))
    assert jsoncodec.loads(json.dumps(value)) == value


@pytest.mark.parametrize("bad", ["", " ", "{", "{not json", '{"a": }', "[1,]", "1 2", "{'a': 1}", "tru", '"\x01"'])
def test_rejects_what_json_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        json.loads(bad)
    with pytest.raises(ValueError):
        jsoncodec.loads(bad)


def test_refuses_unserialisable() -> None:
    with pytest.raises(TypeError, match="set"):
        jsoncodec.dumps({1, 2})


def test_errors_without_the_json_module_loaded() -> None:
    # Inside isolates the agent never imports json on its normal path, and a bad
    # frame is still a ValueError. (CPython 3.12+ imports json.decoder itself
    # to build the error, so only the normal path is checked for the import.)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from agent import jsoncodec\n"
        "assert jsoncodec.loads(jsoncodec.dumps({'a': [1, 2.5, None, 'x']})) == {'a': [1, 2.5, None, 'x']}\n"
        "print('json' in sys.modules)\n"
        "for bad in ('{not json', '[1,]', '\"abc'):\n"
        "    try:\n        jsoncodec.loads(bad); print('accepted')\n"
        "    except ValueError:\n        print('refused')\n"
    )
    from stockade.runtimes.process.zygote import AGENT_PARENT

    out = subprocess.run([sys.executable, "-I", "-S", "-c", code, AGENT_PARENT], capture_output=True, text=True)
    assert out.stdout.split() == ["False", "refused", "refused", "refused"], out.stderr
