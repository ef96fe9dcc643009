"""What the zygote copies into each isolate: every module the agent imports there, and their bytecode."""

from __future__ import annotations

import importlib.util
import json
import marshal
import subprocess
import sys
import types
from pathlib import Path

from stockade.agent.zygote import AGENT_MODULES, _isolate_bytecode
from stockade.runtimes.process.zygote import AGENT_PARENT


def test_every_module_the_agent_imports_is_copied_into_the_isolate() -> None:
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); from agent import server;"
        "print(json.dumps(sorted(m.split('.', 1)[1] for m in sys.modules if m.startswith('agent.'))))"
    )
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code, AGENT_PARENT], capture_output=True, text=True,
                         check=True, timeout=60)  # fmt: skip
    imported = set(json.loads(out.stdout))
    assert imported and imported <= set(AGENT_MODULES), imported - set(AGENT_MODULES)


# ---- the isolate's bytecode, kept beside the host's ---------------------------------------

SOURCE = b"def f():\n    raise ValueError('x')\n"
INNER = "/.stockade/agent/demo.py"


def _load(pyc: bytes) -> types.CodeType:
    assert pyc[:4] == importlib.util.MAGIC_NUMBER
    assert int.from_bytes(pyc[4:8], "little") == 1  # hash-based, not checked against a source inside
    code = marshal.loads(pyc[16:])
    assert isinstance(code, types.CodeType)
    return code


def test_isolate_bytecode_names_the_inner_path_and_is_kept(tmp_path: Path) -> None:
    cached = tmp_path / "demo.isolate.pyc"
    made = _isolate_bytecode(SOURCE, INNER, str(cached))
    assert _load(made).co_filename == INNER
    assert cached.read_bytes() == made
    assert [p.name for p in tmp_path.iterdir()] == ["demo.isolate.pyc"]  # no partial file left
    # Used as it is: a copy with the same header and path is not compiled again.
    marker = made + b"\0"  # still loads (marshal ignores what follows), and tells the copies apart
    cached.write_bytes(marker)
    assert _isolate_bytecode(SOURCE, INNER, str(cached)) == marker


def test_isolate_bytecode_is_made_again_when_the_cache_does_not_match(tmp_path: Path) -> None:
    cached = tmp_path / "demo.isolate.pyc"
    _isolate_bytecode(b"x = 1\n", INNER, str(cached))  # another source's
    made = _isolate_bytecode(SOURCE, INNER, str(cached))
    assert "f" in _load(made).co_names
    assert cached.read_bytes() == made
    _isolate_bytecode(SOURCE, "/elsewhere/demo.py", str(cached))  # the same source, another inner path
    assert _load(_isolate_bytecode(SOURCE, INNER, str(cached))).co_filename == INNER
    header = made[:16]
    for broken in (b"", header, header + b"\xff\xfe garbage", b"not a pyc at all"):
        cached.write_bytes(broken)
        assert _isolate_bytecode(SOURCE, INNER, str(cached)) == made
        assert cached.read_bytes() == made


def test_isolate_bytecode_without_a_writable_cache_is_compiled_each_time(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "demo.isolate.pyc"
    made = _isolate_bytecode(SOURCE, INNER, str(missing))
    assert _load(made).co_filename == INNER
    assert not missing.parent.exists()
