"""The environment build's bytecode step (environment_build._COMPILE), run as a build runs it: by
the isolates' interpreter, within a room of bytes, each .pyc no larger than it."""

from __future__ import annotations

import marshal
import os
import subprocess
from pathlib import Path

from stockade.environment_build import _COMPILE, COMPILE_MEMORY_BYTES
from stockade.runtimes.process.zygote import system_python


def _compile(root: Path, room: int) -> int:
    argv = [system_python(), "-I", "-c", _COMPILE, str(COMPILE_MEMORY_BYTES), str(room), "/opt/stockade/env/python"]
    return subprocess.run([*argv, str(root)], timeout=120, check=False).returncode


def test_a_pyc_past_the_room_is_no_pyc_kept_as_if_whole(tmp_path: Path) -> None:
    # A write that crosses RLIMIT_FSIZE is cut short, not refused: a .pyc of exactly the room's size
    # was kept, the step said all was well, and every import of it failed (marshal data too short).
    (tmp_path / "folded.py").write_text("".join(f"a{i} = 'k{i:05}' * 585\n" for i in range(100)))  # ~360 KB
    assert _compile(tmp_path, 100_000) == 3
    assert _compile(tmp_path, 10 << 20) == 0
    (made,) = (tmp_path / "__pycache__").iterdir()
    code = marshal.loads(made.read_bytes()[16:])
    assert code.co_filename == "/opt/stockade/env/python/folded.py"


def test_only_regular_files_outside_pycache_are_compiled(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "waits.py")  # opened, it would wait for a writer until the build's time ran out
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "stray.py").write_text("x = 1\n")
    (tmp_path / "plain.py").write_text("x = 1\n")
    assert _compile(tmp_path, 1 << 20) == 0
    assert sorted(p.name.split(".")[0] for p in (tmp_path / "__pycache__").iterdir()) == ["plain", "stray"]
