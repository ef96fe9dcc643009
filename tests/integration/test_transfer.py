"""Directory upload and download (``stockade/transfer.py``) on real runtimes and through a daemon.

A nested tree (binary files over one call's size, empty directories, an
executable, odd names, a link inside the tree) goes in and comes back the
same; the caps refuse before anything is sent or written and leave no pieces
in the isolate; and archives from a hostile isolate (traversal, absolute
names, links, devices, FIFOs, sparse and over-declared members, a flood of
members) are refused with nothing written outside ``local_dir`` and no link
made on the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stockade import Policy, Sandbox
from stockade.agent.wire import MAX_FILE_PIECE
from stockade.client import AsyncClient, Client
from stockade.egress.redact import Redactor
from stockade.errors import PathNotFoundError, TransferError, TransferTooLargeError, UnsafeArchiveError
from stockade.result import ExecResult
from stockade.runtimes.manager import RuntimeManager
from stockade.sdk_async import AsyncSandbox
from stockade.transfer import DEFAULT_MAX_FILES, download
from stockade.transfer_scripts import PACK
from tests.conftest import availability, require
from tests.daemon_harness import Daemon, start_daemon

BIG = 12 << 20  # over one write_file call (7 MiB) and one read piece (5 MiB)


def make_tree(root: Path, big: int = BIG) -> Path:
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "empty" / "nested-empty").mkdir(parents=True)
    (root / "a" / "blob.bin").write_bytes(os.urandom(big))
    (root / "a" / "b" / "zeros").write_bytes(b"\0" * 1000)
    (root / "a" / "b" / "c" / "deep.txt").write_text("deep\n")
    (root / "empty-file").write_bytes(b"")
    (root / "name with spaces é.txt").write_text("unicode\n")
    tool = root / "tool.sh"
    tool.write_text("#!/bin/sh\necho tool\n")
    tool.chmod(0o755)
    return root


def snapshot(root: Path) -> dict[str, Any]:
    """Each entry below ``root``: a directory, or a file's digest and executable bit; links by target."""
    seen: dict[str, Any] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            seen[rel] = ("link", os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            seen[rel] = "dir"
        else:
            seen[rel] = (hashlib.sha256(path.read_bytes()).hexdigest(), bool(st.st_mode & 0o100))
    return seen


def no_links(root: Path) -> None:
    assert not [p for p in root.rglob("*") if p.is_symlink()]


def leftovers(sb: Any) -> list[str]:
    return [e["name"] for e in sb.list_dir("/tmp") if e["name"].startswith(".stockade-")]


@pytest.fixture(scope="module")
def mgr() -> Iterator[RuntimeManager]:
    m = RuntimeManager(pool_size=0)
    yield m
    m.close()


def round_trip(sb: Any, tmp_path: Path, big: int = BIG) -> None:
    src = make_tree(tmp_path / "src", big)
    files = [p for p in src.rglob("*") if p.is_file()]
    expected = (len(files), sum(1 for p in src.rglob("*") if p.is_dir()), sum(p.stat().st_size for p in files))
    sent = sb.upload(src, "/work/data")
    assert (sent.files, sent.directories, sent.bytes) == expected == (6, 5, big + 1000 + 5 + 8 + 20)
    listing = sb.exec(["sh", "-c", "cd /work/data && find . | sort && sha256sum a/blob.bin && test -x tool.sh"])
    assert listing.success, listing.summary()
    assert "./empty/nested-empty" in listing.stdout
    assert hashlib.sha256((src / "a" / "blob.bin").read_bytes()).hexdigest() in listing.stdout
    got = sb.download("/work/data", tmp_path / "back", executable=True)
    assert (got.files, got.directories, got.bytes) == expected
    assert snapshot(tmp_path / "back") == snapshot(src)
    # By default nothing comes back executable, and nothing already there is replaced.
    sb.download("/work/data", tmp_path / "plain")
    assert not os.access(tmp_path / "plain" / "tool.sh", os.X_OK)
    with pytest.raises(TransferError, match=r"exists .* pass overwrite=True"):
        sb.download("/work/data", tmp_path / "plain")
    assert sb.download("/work/data", tmp_path / "plain", overwrite=True).files == expected[0]
    one = sb.download("/work/data/a/b/c/deep.txt", tmp_path / "one")
    assert (one.files, one.bytes) == (1, 5) and (tmp_path / "one" / "deep.txt").read_text() == "deep\n"
    sb.upload(src / "tool.sh", "/work/single")
    assert sb.exec(["/work/single/tool.sh"]).stdout == "tool\n"
    assert leftovers(sb) == []


@pytest.mark.parametrize("runtime", ["process", "gvisor", "microvm"])
def test_a_nested_tree_goes_in_and_comes_back_the_same(runtime: str, tmp_path: Path, mgr: RuntimeManager) -> None:
    require(runtime)
    with Sandbox(Policy(runtime=runtime, timeout_seconds=120, disk_mb=256), manager=mgr) as sb:
        round_trip(sb, tmp_path, BIG if runtime != "microvm" else 1 << 20)


def test_links_inside_the_uploaded_tree_go_as_links_others_are_refused(tmp_path: Path, mgr: RuntimeManager) -> None:
    require("process")
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_text("x")
    (src / "inside").symlink_to("d/f")
    with Sandbox(runtime="process", manager=mgr) as sb:
        assert sb.upload(src, "/work/l").links == 1
        assert sb.exec(["cat", "/work/l/inside"]).stdout == "x"
        for target in ("/etc/passwd", "../../outside", "d/../../x"):
            (src / "bad").unlink(missing_ok=True)
            (src / "bad").symlink_to(target)
            with pytest.raises(TransferError, match="outside the uploaded tree"):
                sb.upload(src, "/work/refused")
        (src / "bad").unlink()
        os.mkfifo(src / "fifo")
        with pytest.raises(TransferError, match="not a regular file"):
            sb.upload(src, "/work/refused")
        assert sb.exec(["test", "-e", "/work/refused"]).exit_code == 1
        assert leftovers(sb) == []


def test_caps_refuse_before_anything_is_sent_or_written(tmp_path: Path, mgr: RuntimeManager) -> None:
    require("process")
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(1 << 20))
    with Sandbox(runtime="process", manager=mgr) as sb:
        with pytest.raises(TransferTooLargeError, match=r"at least \d+ bytes as an archive, and max_bytes is 524288"):
            sb.upload(src, "/work/capped", max_bytes=512 << 10)
        assert sb.exec(["test", "-e", "/work/capped"]).exit_code == 1
        sb.exec(["sh", "-c", "mkdir -p /work/big && head -c 2000000 /dev/urandom > /work/big/f"])
        with pytest.raises(TransferTooLargeError, match=r"over 1048576 bytes as an archive \(max_bytes\)"):
            sb.download("/work/big", tmp_path / "out", max_bytes=1 << 20)
        assert not (tmp_path / "out").exists()
        assert leftovers(sb) == []
        assert sb.download("/work/big", tmp_path / "out", max_bytes=3 << 20).bytes == 2000000


def test_errors_name_the_cause_and_leave_nothing_behind(tmp_path: Path, mgr: RuntimeManager) -> None:
    require("process")
    src = make_tree(tmp_path / "src", 10)
    with Sandbox(runtime="process", manager=mgr) as sb:
        with pytest.raises(TransferError, match=r"Read-only file system|Permission denied"):
            sb.upload(src, "/usr/lib/stockade-upload")
        with pytest.raises(FileNotFoundError) as missing:
            sb.download("/work/missing", tmp_path / "out")
        assert isinstance(missing.value, PathNotFoundError) and missing.value.filename == "/work/missing"
        with pytest.raises(FileNotFoundError):
            sb.upload(tmp_path / "no-such-dir", "/work/x")
        with pytest.raises(ValueError, match="max_bytes"):
            sb.upload(src, "/work/x", max_bytes=0)
        assert leftovers(sb) == []
    assert not (tmp_path / "out").exists()


def test_what_a_download_refuses_from_the_isolates_own_files(tmp_path: Path, mgr: RuntimeManager) -> None:
    """Real archives of the isolate's links and FIFOs: the host writes regular files and directories only."""
    require("process")
    with Sandbox(runtime="process", manager=mgr) as sb:
        made = sb.exec(
            [
                "sh",
                "-c",
                "ln -s /etc/passwd /work/pw && mkdir /work/d && echo x > /work/d/f && "
                "ln -s /etc /work/d/etc && mkdir /work/p && mkfifo /work/p/fifo",
            ]
        )
        assert made.success, made.summary()
        for remote, what in (
            (
                "/work/pw",
                r"/work/pw is a symbolic link \(to '/etc/passwd'\) in the sandbox: a download does not follow",
            ),
            ("/work/d", "symbolic link"),
            ("/work/p", "FIFO"),
        ):
            out = tmp_path / remote.rsplit("/", 1)[1]
            with pytest.raises(UnsafeArchiveError, match=what):
                sb.download(remote, out)
            assert not out.exists()
        # Asked to, a download leaves symbolic links out; a hard link comes as a copy of its file.
        linked = sb.exec(["sh", "-c", "ln /work/d/f /work/d/again && ln -s f /work/d/latest"])
        assert linked.success, linked.summary()
        assert sb.exec(["ln", "-s", "/work/d", "/work/dl"]).success
        for links, remote in (("refuse", "/work/dl"), ("skip", "/work/dl"), ("refuse", "/work/dl/")):
            # A remote path that is a link is never followed, to a directory either, slash or not.
            with pytest.raises(UnsafeArchiveError, match=r"/work/dl is a symbolic link \(to '/work/d'\)"):
                sb.download(remote, tmp_path / "dl", links=links)  # type: ignore[arg-type]
            assert not (tmp_path / "dl").exists()
        kept = sb.download("/work/d", tmp_path / "kept", links="skip")
        assert (kept.files, kept.skipped) == (2, 2)  # f and again; etc and latest left out
        assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["again", "f"]
        assert (tmp_path / "kept" / "again").read_text() == "x\n"
        with pytest.raises(UnsafeArchiveError, match="FIFO"):
            sb.download("/work/p", tmp_path / "fifo", links="skip")  # only links are left out
        assert leftovers(sb) == []
    no_links(tmp_path)


# ---- a hostile isolate's archives -----------------------------------------------------------

# Run inside the isolate in place of the packing step: the archive the case names, cut into
# the pieces the host asked for, and the packing step's answer ("status size") for it.
HOSTILE = r"""
import io, os, sys, tarfile
case, out, piece, seam, outside = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
if case == "loud":  # a failure whose words would steer the terminal that shows the error
    sys.stderr.write("\x1b[2J\x1b]0;owned\x07\x1b[32mdownload OK\x1b[0m\n")
    sys.exit(2)
buf = io.BytesIO()
tar = tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT)

def add(name, data=b"", **fields):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in fields.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data) if info.isreg() else None)

add("fine.txt", b"fine")
if case == "dotdot":
    add("../escape.txt", b"out")
elif case == "dotdot-deep":
    add("a/../../escape.txt", b"out")
elif case == "absolute":
    add(outside + "/abs.txt", b"out")
elif case == "symlink":
    add("pw", type=tarfile.SYMTYPE, linkname="/etc/passwd")
elif case == "symlink-then-file":
    add("ln", type=tarfile.SYMTYPE, linkname=outside)
    add("ln/pwned.txt", b"out")
elif case == "hardlink":
    add("hl", type=tarfile.LNKTYPE, linkname="/etc/passwd")
elif case == "hardlink-later":
    add("hl", type=tarfile.LNKTYPE, linkname="later.txt")
    add("later.txt", b"later")
elif case == "hardlink-copies":
    add("dir/again.txt", type=tarfile.LNKTYPE, linkname="fine.txt")
    add("pw", type=tarfile.SYMTYPE, linkname="/etc/passwd")
    add("ln", type=tarfile.SYMTYPE, linkname=outside)
    add("ln/pwned.txt", b"inside")
elif case == "hardlink-flood":
    add("big.bin", b"x" * 4096)
    for i in range(int(sys.argv[6])):
        add(f"hl{i}", type=tarfile.LNKTYPE, linkname="big.bin")
elif case == "device":
    add("null", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
elif case == "fifo":
    add("fifo", type=tarfile.FIFOTYPE)
elif case == "sparse":
    add("sparse", type=tarfile.GNUTYPE_SPARSE)
elif case == "many":
    for i in range(int(sys.argv[6])):
        add(f"m{i}")
elif case == "deep":  # names of 100 components: each member makes 99 directories
    for i in range(int(sys.argv[6])):
        add(f"d{i}/" + "x/" * 98 + "f")
elif case == "git":  # git runs core.fsmonitor in any directory below it, unasked
    add(".git/config", b"[core]\n\tfsmonitor = touch /tmp/pwned\n")
elif case == "bare":  # no .git anywhere: a bare repository's layout is one to git all the same
    add("project/evil/HEAD", b"ref: refs/heads/main\n")
    add("project/evil/config", b"[core]\n\tworktree = ..\n\tfsmonitor = touch /tmp/pwned\n")
    add("project/evil/objects/", type=tarfile.DIRTYPE)
    add("project/evil/refs/", type=tarfile.DIRTYPE)
elif case == "commondir":  # HEAD here, objects and refs where its commondir says: a repository to git
    add("a/HEAD", b"ref: refs/heads/main\n")
    add("a/commondir", b"../b\n")
    add("b/config", b"[core]\n\tfsmonitor = touch /tmp/pwned\n")
elif case == "hg":
    add("sub/.hg/hgrc", b"[hooks]\npre-status = touch /tmp/pwned\n")
elif case == "garbage":
    buf = io.BytesIO(os.urandom(4096)); tar = None
elif case == "file-then-dir":  # each member fine alone: together, one would stop the writes half-way
    add("x", b"file")
    add("x/y", b"below a file")
elif case == "dir-then-file":
    add("d/", type=tarfile.DIRTYPE)
    add("d", b"a file where a directory is")
elif case == "terminal":  # names that would steer the terminal showing the error they end in
    add("\x1b[2Jz", b"file")
    add("\x1b[2Jz/\x1b]0;owned\x07", b"below it")
if case in ("bomb", "truncated", "negative"):
    info = tarfile.TarInfo("bomb.bin")
    info.size = {"bomb": 10 << 30, "truncated": 100000, "negative": -(1 << 20)}[case]
    tar.fileobj.write(info.tobuf(tarfile.GNU_FORMAT))
    tar.fileobj.write(b"\0" * 4096)
    data = buf.getvalue() + b"\0" * 1024
else:
    if tar is not None:
        tar.close()
    data = buf.getvalue()
for i in range(0, len(data), piece):
    with open(f"{out}.{i // piece:06d}", "wb") as f:
        f.write(data[i:i + piece])
    if i:  # the seam between this piece and the one before, as the packing step writes it
        with open(f"{out}.s{i // piece - 1:06d}", "wb") as f:
            f.write(data[i - seam:i] + data[i:i + seam])
if case == "shrank":  # as GNU tar says it, exiting 1
    sys.stderr.write("tar: ./fine.txt: File shrank by 4 bytes; padding with zeros\n")
print(1 if case == "shrank" else 0, len(data), piece, seam)
"""


class Hostile:
    """A sandbox whose packing step answers with a crafted archive, as a subverted isolate could."""

    def __init__(self, sb: Sandbox, case: str, outside: Path, *extra: str) -> None:
        self.sb, self.case, self.outside, self.extra = sb, case, outside, extra

    def write_file(self, path: str, data: bytes, mode: int, /) -> None:
        self.sb.write_file(path, data, mode)

    def read_file(self, path: str, max_bytes: int | None = None, /) -> bytes:
        return self.sb.read_file(path, max_bytes)

    def exec(self, argv: list[str], /) -> ExecResult:
        if argv[:3] == ["sh", "-c", PACK]:
            out, piece, seam = argv[7], argv[9], str(min(int(argv[12]), int(argv[9]) // 2))
            argv = ["python3", "/work/hostile.py", self.case, out, piece, seam, str(self.outside), *self.extra]
        return self.sb.exec(argv)


@pytest.fixture(scope="module")
def hostile_box(mgr: RuntimeManager) -> Iterator[Sandbox]:
    require("process")
    with Sandbox(runtime="process", manager=mgr, disk_mb=256, timeout_seconds=120) as sb:
        sb.write_file("/work/hostile.py", HOSTILE)
        sb.exec(["mkdir", "/work/src"])
        yield sb


CASES = {
    "dotdot": (UnsafeArchiveError, "outside the download's directory"),
    "dotdot-deep": (UnsafeArchiveError, "outside the download's directory"),
    "absolute": (UnsafeArchiveError, "outside the download's directory"),
    "symlink": (UnsafeArchiveError, "symbolic link to '/etc/passwd'"),
    "symlink-then-file": (UnsafeArchiveError, "symbolic link"),
    "hardlink": (UnsafeArchiveError, "hard link to '/etc/passwd', which is no file before it"),
    "hardlink-later": (UnsafeArchiveError, "hard link to 'later.txt', which is no file before it"),
    "device": (UnsafeArchiveError, "device node"),
    "fifo": (UnsafeArchiveError, "FIFO"),
    "sparse": (UnsafeArchiveError, "sparse file"),
    "bomb": (TransferError, r"declare over|more than it holds"),
    "truncated": (UnsafeArchiveError, r"more than it holds|ends before"),
    "garbage": (UnsafeArchiveError, "not a tar"),
    "negative": (UnsafeArchiveError, r"negative size|malformed"),  # base-256 sizes can be negative
    "loud": (TransferError, r"packing /work/src in the sandbox failed: \\x1b\[2J\\x1b\]0;owned\\x07"),
    "git": (UnsafeArchiveError, r"'.git/config': a .git directory's configuration names commands git runs"),
    "bare": (UnsafeArchiveError, r"holds project/evil, laid out as a git repository \(HEAD, objects and refs\)"),
    "commondir": (UnsafeArchiveError, r"holds a, laid out as a git repository \(HEAD, commondir\)"),
    "hg": (UnsafeArchiveError, r"'sub/.hg/hgrc': a .hg directory's configuration names commands hg runs"),
    "file-then-dir": (UnsafeArchiveError, r"holds 'x/y', which needs x to be a directory: it holds a file there"),
    "dir-then-file": (UnsafeArchiveError, r"holds 'd', a file where it makes a directory"),
    "terminal": (UnsafeArchiveError, r"which needs \\x1b\[2Jz to be a directory"),
    "shrank": (TransferError, r"a file shrank in the sandbox while it was packed, and tar padded its copy"),
}


class TinyPieces(Hostile):
    """A packing step that cuts 512-byte pieces, under a policy whose files may be far larger."""

    @property
    def policy(self) -> object:
        return self.sb.policy

    def exec(self, argv: list[str], /) -> ExecResult:
        if argv[:3] == ["sh", "-c", PACK]:
            argv = [*argv[:9], "512", *argv[10:12], "256", *argv[13:]]
        return super().exec(argv)


def test_an_async_sandbox_knows_the_least_piece_of_its_policy_too() -> None:
    # Its calls go through a bridge that carried its memory, not its policy: the floor was 512.
    import asyncio

    from stockade.transfer import _Blocking, _least_piece

    class Held:
        policy = Policy(max_file_size_bytes=1 << 20)
        memory_mb = 256

    async def bridged() -> int:
        return _least_piece(_Blocking(Held(), asyncio.get_running_loop()))  # type: ignore[arg-type]

    assert asyncio.run(bridged()) == _least_piece(Held()) == 64 << 10


def test_a_download_cut_in_pieces_smaller_than_the_policy_needs_is_refused(
    hostile_box: Sandbox, tmp_path: Path
) -> None:
    # The isolate says what it cut: 512-byte pieces would make a GiB's download two million reads.
    with pytest.raises(TransferError, match="it cut pieces of 512 bytes"):
        download(TinyPieces(hostile_box, "dotdot", tmp_path / "o"), "/work/src", tmp_path / "out")  # type: ignore[arg-type]


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_hostile_archive_is_refused_and_nothing_lands_outside(
    case: str, hostile_box: Sandbox, tmp_path: Path
) -> None:
    error, message = CASES[case]
    outside = tmp_path / "outside"
    outside.mkdir()
    local = tmp_path / "nest" / "out"
    with pytest.raises(error, match=message):
        download(Hostile(hostile_box, case, outside), "/work/src", local)  # type: ignore[arg-type]
    assert not local.exists()  # every member is checked before the first is written
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside"]
    no_links(tmp_path)
    assert leftovers(hostile_box) == []


def test_hard_links_come_as_copies_and_symbolic_ones_are_left_out_when_asked(
    hostile_box: Sandbox, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    crafted = Hostile(hostile_box, "hardlink-copies", outside)
    with pytest.raises(UnsafeArchiveError, match=r"symbolic link to '/etc/passwd': .*links='skip' leaves"):
        download(crafted, "/work/src", tmp_path / "refused")  # type: ignore[arg-type]
    assert not (tmp_path / "refused").exists()
    summary = download(crafted, "/work/src", tmp_path / "out", links="skip")  # type: ignore[arg-type]
    assert (summary.files, summary.bytes, summary.skipped) == (3, 4 + 4 + 6, 2)
    out = tmp_path / "out"
    assert (out / "dir" / "again.txt").read_bytes() == b"fine" and (out / "fine.txt").read_bytes() == b"fine"
    assert (out / "ln").is_dir() and (out / "ln" / "pwned.txt").read_bytes() == b"inside"  # a real directory
    assert list(outside.iterdir()) == [] and not (out / "pw").exists()
    no_links(tmp_path)
    # Each copy counts against the cap: a flood of links to one file is refused before a write.
    flood = Hostile(hostile_box, "hardlink-flood", outside, "300")
    with pytest.raises(TransferTooLargeError, match="declare over"):
        download(flood, "/work/src", tmp_path / "flood", max_bytes=1 << 20)  # type: ignore[arg-type]
    assert not (tmp_path / "flood").exists()
    with pytest.raises(ValueError, match="links must be one of 'refuse', 'skip'"):
        download(crafted, "/work/src", tmp_path / "x", links="follow")  # type: ignore[arg-type]
    assert leftovers(hostile_box) == []


def test_a_flood_of_members_is_refused(hostile_box: Sandbox, tmp_path: Path) -> None:
    sandbox = Hostile(hostile_box, "many", tmp_path, str(DEFAULT_MAX_FILES + 1))
    with pytest.raises(TransferTooLargeError, match=f"over {DEFAULT_MAX_FILES} members"):
        download(sandbox, "/work/src", tmp_path / "out")  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()
    small = Hostile(hostile_box, "many", tmp_path, "10")
    assert download(small, "/work/src", tmp_path / "ok", max_files=11).files == 11  # type: ignore[arg-type]
    with pytest.raises(TransferTooLargeError, match="over 10 members"):
        download(small, "/work/src", tmp_path / "refused", max_files=10)  # type: ignore[arg-type]
    # Few members, each named 100 components deep: the directories they make are what is counted.
    deep = Hostile(hostile_box, "deep", tmp_path, "30")
    with pytest.raises(TransferTooLargeError, match="makes over 1000 files and directories"):
        download(deep, "/work/src", tmp_path / "deep", max_files=1000)  # type: ignore[arg-type]
    assert not (tmp_path / "deep").exists()
    summary = download(deep, "/work/src", tmp_path / "deep", max_files=31 + 2970)  # type: ignore[arg-type]
    assert (summary.files, summary.directories) == (31, 30 * 99)  # every directory made is told
    # A directory takes a block of the host's disk whatever it holds: 2970 of them are over 1 MiB.
    with pytest.raises(TransferTooLargeError, match=r"the \d+ directories it makes \(4096 bytes each\) come to"):
        download(deep, "/work/src", tmp_path / "deep-capped", max_bytes=1 << 20)  # type: ignore[arg-type]
    assert not (tmp_path / "deep-capped").exists()
    assert leftovers(hostile_box) == []


def test_a_version_control_directory_is_written_only_when_asked(hostile_box: Sandbox, tmp_path: Path) -> None:
    summary = download(Hostile(hostile_box, "git", tmp_path), "/work/src", tmp_path / "out", vcs=True)  # type: ignore[arg-type]
    assert (summary.files, summary.directories) == (2, 1)
    assert (tmp_path / "out" / ".git" / "config").read_bytes().startswith(b"[core]")
    assert leftovers(hostile_box) == []


def test_a_download_never_writes_through_a_link_already_in_local_dir(hostile_box: Sandbox, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    local = tmp_path / "out"
    local.mkdir()
    (local / "fine.txt").symlink_to(outside / "target")  # a file link: replaced, not followed
    (local / "a").symlink_to(outside)  # a directory link: not entered
    hostile_box.exec(["sh", "-c", "mkdir -p /work/w/a && echo fine > /work/w/fine.txt && echo in > /work/w/a/in"])
    with pytest.raises(TransferError, match="exists"):
        hostile_box.download("/work/w/fine.txt", local)  # a file already there is not replaced unless asked
    assert hostile_box.download("/work/w/fine.txt", local, overwrite=True).files == 1
    assert (local / "fine.txt").read_text() == "fine\n" and not (local / "fine.txt").is_symlink()
    with pytest.raises(TransferError, match="links are not followed"):
        hostile_box.download("/work/w", local, overwrite=True)
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in local.iterdir()) == ["a", "fine.txt"]  # no temporary file left


# The scratch disk is the sandbox's memory (a tmpfs): a download that would stage an archive the
# sandbox has no room for is refused before it is packed, and the sandbox lives on.
BIG_FILE = "head -c 80000000 /dev/zero > /work/big.bin && echo kept > /work/note.txt"


def test_a_download_the_sandbox_has_no_room_to_stage_is_refused_and_the_sandbox_lives(
    tmp_path: Path, mgr: RuntimeManager
) -> None:
    require("process")
    with Sandbox(runtime="process", manager=mgr, memory_mb=160, disk_mb=256, max_file_size_bytes=1 << 27) as sb:
        made = sb.exec(["sh", "-c", BIG_FILE])
        assert made.success, made.summary()
        with pytest.raises(
            TransferError, match=r"staged in the sandbox's scratch space .*memory_mb=160.* does\s+not fit"
        ):
            sb.download("/work/big.bin", tmp_path / "out")
        with pytest.raises(TransferTooLargeError, match="nothing was packed"):
            sb.download("/work/big.bin", tmp_path / "out", max_bytes=1 << 20)  # measured, not staged
        assert sb.read_file("/work/note.txt") == b"kept\n"  # the sandbox and its files live on
        assert leftovers(sb) == [] and not (tmp_path / "out").exists()
        assert sb.download("/work/note.txt", tmp_path / "out").files == 1  # what fits still comes
    with Sandbox(runtime="process", manager=mgr, memory_mb=512, disk_mb=64) as small:
        assert small.exec(["sh", "-c", "head -c 40000000 /dev/zero > /work/big.bin"]).success
        with pytest.raises(TransferError, match=r"does\s+not fit"):  # the scratch space, not the memory, is short
            small.download("/work/big.bin", tmp_path / "small")


def test_an_upload_the_sandbox_has_no_room_for_is_refused_before_it_is_sent(
    tmp_path: Path, mgr: RuntimeManager
) -> None:
    require("process")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(40 << 20))
    with Sandbox(runtime="process", manager=mgr, disk_mb=64, max_file_size_bytes=1 << 27) as sb:
        # 40 MiB staged in /tmp, and 40 more unpacked into /work: the same 64 MB tmpfs.
        with pytest.raises(TransferError, match=r"needs \d+ bytes of the sandbox's scratch space .* nothing was sent"):
            sb.upload(big, "/work/up")
        assert sb.exec(["test", "-e", "/work/up"]).exit_code == 1 and leftovers(sb) == []
    # Over 2 GiB free (mawk would print that as a float): the memory, not the disk, is short.
    with Sandbox(runtime="process", manager=mgr, memory_mb=128, disk_mb=4096, max_file_size_bytes=1 << 27) as sb:
        with pytest.raises(TransferError, match="memory_mb=128"):
            sb.upload(big, "/work/up")
        assert sb.exec(["true"]).success
    with Sandbox(runtime="process", manager=mgr, disk_mb=128, max_file_size_bytes=1 << 27) as sb:
        assert sb.upload(big, "/work/up").bytes == 40 << 20  # what fits goes
        assert leftovers(sb) == []
    if availability("gvisor").available:  # gVisor's /tmp and /work are two tmpfs of disk_mb each
        with Sandbox(runtime="gvisor", manager=mgr, disk_mb=32, max_file_size_bytes=1 << 27) as sb:
            with pytest.raises(TransferError, match="does not fit; nothing was sent"):
                sb.upload(big, "/work/up")


@pytest.mark.parametrize("runtime", ["process", "gvisor"])
def test_an_upload_into_a_writable_mount_counts_the_mount_not_the_memory(
    runtime: str, tmp_path: Path, mgr: RuntimeManager
) -> None:
    """A host directory mounted rw is the host's disk: its used space is not the sandbox's memory
    (gVisor names every filesystem's device "none", a tmpfs's and a host mount's alike)."""
    require(runtime)
    shared = Path(tempfile.mkdtemp(prefix="stockade-mount-"))  # pytest's own is not searchable by others
    try:
        shared.chmod(0o777)  # the sandbox's uid writes there
        src = make_tree(tmp_path / "src", 1 << 20)
        policy = Policy(runtime=runtime, memory_mb=128, filesystem_access=[f"{shared}:/mnt/out:rw"])
        with Sandbox(policy, manager=mgr) as sb:
            sent = sb.upload(src, "/mnt/out/data")
            assert sent.files == 6 and leftovers(sb) == []
        assert snapshot(shared / "data") == snapshot(src)
    finally:
        shutil.rmtree(shared)


# ---- through the daemon, and async ----------------------------------------------------------


@pytest.fixture
def daemon(process_runtime: str) -> Iterator[Daemon]:
    d = start_daemon()
    yield d
    assert d.stop() == 0, d.logs()


def test_a_round_trip_through_the_daemon(daemon: Daemon, tmp_path: Path) -> None:
    with Client(daemon.socket_path, timeout=120) as client, client.sandbox({"disk_mb": 256}) as sb:
        round_trip(sb, tmp_path)
        with pytest.raises(FileNotFoundError):
            sb.download("/work/missing", tmp_path / "missing")
        with pytest.raises(TransferTooLargeError):
            sb.upload(tmp_path / "src", "/work/capped", max_bytes=1 << 20)
        with pytest.raises(TransferTooLargeError):
            sb.download("/work/data", tmp_path / "capped", max_bytes=1 << 20)
        sb.exec(["ln", "-s", "/etc/passwd", "/work/pw"])
        with pytest.raises(UnsafeArchiveError):
            sb.download("/work/pw", tmp_path / "pw")
        assert leftovers(sb) == []
    no_links(tmp_path)
    # The daemon says the sandbox's memory limit, which a download through it checks as well.
    with (
        Client(daemon.socket_path, timeout=120) as client,
        client.sandbox({"memory_mb": 160, "disk_mb": 256, "max_file_size_bytes": 1 << 27}) as sb,
    ):
        assert sb.memory_mb == 160
        assert sb.exec(["sh", "-c", BIG_FILE]).success
        with pytest.raises(TransferError, match=r"memory_mb=160.* does\s+not fit"):
            sb.download("/work/big.bin", tmp_path / "big")
        assert sb.read_file("/work/note.txt") == b"kept\n"


def test_async_twins(daemon: Daemon, tmp_path: Path, mgr: RuntimeManager) -> None:
    src = make_tree(tmp_path / "src", 1 << 20)

    async def through(sb: Any, name: str, listing: Callable[[], Any]) -> None:
        assert (await sb.upload(src, "/work/data")).files == 6
        assert (await sb.download("/work/data", tmp_path / name, executable=True)).files == 6
        assert snapshot(tmp_path / name) == snapshot(src)
        with pytest.raises(FileNotFoundError):
            await sb.download("/work/missing", tmp_path / "missing")
        assert [e["name"] for e in await listing() if e["name"].startswith(".stockade-")] == []

    async def main() -> None:
        async with AsyncClient(daemon.socket_path, timeout=120) as client, client.sandbox() as remote:
            await through(remote, "remote", lambda: remote.list_dir("/tmp"))
        async with AsyncSandbox(runtime="process", manager=mgr) as local:
            await through(local, "local", lambda: local.list_dir("/tmp"))

    asyncio.run(main())


def test_transfer_summary_counts_a_single_file_upload(tmp_path: Path, mgr: RuntimeManager) -> None:
    require("process")
    f = tmp_path / "model.bin"
    f.write_bytes(b"m" * 100)
    with Sandbox(runtime="process", manager=mgr) as sb:
        summary = sb.upload(f, "/work/models")
        assert (summary.files, summary.directories, summary.bytes) == (1, 0, 100)
        assert sb.read_file("/work/models/model.bin") == b"m" * 100


def test_pieces_fit_a_small_max_file_size(tmp_path: Path, mgr: RuntimeManager) -> None:
    """A policy's max_file_size_bytes under one piece: the pieces shrink, each file still fits."""
    require("process")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"f{i}").write_bytes(os.urandom(300_000))
    with Sandbox(runtime="process", manager=mgr, max_file_size_bytes=1 << 20) as sb:
        assert sb.exec(["sh", "-c", "ulimit -f"]).stdout == "2048\n"  # the limit holds from here on
        assert sb.upload(src, "/work/many").bytes == 3_600_000
        assert sb.download("/work/many", tmp_path / "back").files == 12
        assert snapshot(tmp_path / "back") == snapshot(src)
        assert leftovers(sb) == []


def test_a_download_of_tmp_itself_stands_though_its_pieces_are_written_there(
    tmp_path: Path, mgr: RuntimeManager
) -> None:
    # The pieces go to /tmp as tar reads it: tar then says /tmp changed (status 1), which is no file's
    # bytes gone wrong.
    require("process")
    with Sandbox(runtime="process", manager=mgr) as sb:
        assert sb.exec(["sh", "-c", "head -c 200000 /dev/urandom > /tmp/data.bin"]).success
        got = sb.download("/tmp", tmp_path / "tmp")
        assert got.files == 1 and (tmp_path / "tmp" / "data.bin").stat().st_size == 200000
        assert leftovers(sb) == []


def test_what_the_host_holds_in_the_way_is_refused_before_a_write(tmp_path: Path, mgr: RuntimeManager) -> None:
    """A file, or a link, where the archive makes a directory, and a directory where it writes a file:
    none could be written over, so the download is refused before its first write, overwrite or not."""
    require("process")
    with Sandbox(runtime="process", manager=mgr) as sb:
        made = sb.exec(["sh", "-c", "mkdir -p /work/t/x && echo 1 > /work/t/a.txt && echo 2 > /work/t/x/y"])
        assert made.success, made.summary()
        local, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
        local.mkdir()
        elsewhere.mkdir()
        (local / "x").write_text("a host file\n")
        for overwrite in (False, True):
            with pytest.raises(TransferError, match=r"out/x is not a directory here .*where the archive makes x;"):
                sb.download("/work/t", local, overwrite=overwrite)
            assert sorted(p.name for p in local.iterdir()) == ["x"]  # a.txt, before it in order, not written
        (local / "x").unlink()
        (local / "x").symlink_to(elsewhere)
        with pytest.raises(TransferError, match=r"out/x is not a directory here \(links are not followed\)"):
            sb.download("/work/t", local, overwrite=True)
        assert list(elsewhere.iterdir()) == [] and sorted(p.name for p in local.iterdir()) == ["x"]
        (local / "x").unlink()
        (local / "x").mkdir()
        (local / "x" / "y").mkdir()
        with pytest.raises(TransferError, match=r"out/x/y is a directory here, where the archive writes a file"):
            sb.download("/work/t", local, overwrite=True)
        assert not (local / "a.txt").exists()
        (local / "x" / "y").rmdir()
        assert sb.download("/work/t", local).files == 2  # nothing in the way: both written
        assert (local / "x" / "y").read_text() == "2\n"
        assert leftovers(sb) == []


class Redacting:
    """A sandbox whose file reads take a secret's value out, each read alone, as a sandbox with a
    secret bound does (``Redactor``, the one it uses)."""

    def __init__(self, sb: Sandbox, value: str) -> None:
        self.sb, self.redactor = sb, Redactor.markers({"API_KEY": value})

    def write_file(self, path: str, data: bytes, mode: int, /) -> None:
        self.sb.write_file(path, data, mode)

    def read_file(self, path: str, max_bytes: int | None = None, /) -> bytes:
        return self.redactor.bytes(self.sb.read_file(path, max_bytes))

    def exec(self, argv: list[str], /) -> ExecResult:
        return self.sb.exec(argv)


def test_a_secret_written_across_two_pieces_of_a_download_is_not_brought_out(
    tmp_path: Path, mgr: RuntimeManager
) -> None:
    require("process")
    value = "sk-live-0123456789abcdefghijklmnopqrstuv"
    # The file's bytes start after the archive's 512-byte header: the value sits across the first cut.
    before = MAX_FILE_PIECE - 512 - len(value) // 2
    write = f"import sys; open(sys.argv[1], 'wb').write(b'a' * {before} + sys.argv[2].encode() + b'b' * 4096)"
    with Sandbox(runtime="process", manager=mgr, disk_mb=64) as sb:
        assert sb.exec(["python3", "-c", write, "/work/across.bin", value]).success
        assert sb.exec(["python3", "-c", write, "/work/clean.bin", "x" * len(value)]).success
        redacting = Redacting(sb, value)
        with pytest.raises(TransferError, match=r"do not meet as they were read: .*a secret.s value"):
            download(redacting, "/work/across.bin", tmp_path / "across")  # type: ignore[arg-type]
        assert not (tmp_path / "across").exists() and redacting.redactor.count >= 1
        got = download(redacting, "/work/clean.bin", tmp_path / "clean")  # type: ignore[arg-type]
        assert got.bytes == before + len(value) + 4096  # two pieces and their seam, as they were
        assert leftovers(sb) == []


def test_a_cancelled_async_download_writes_nothing_after_its_cancel(tmp_path: Path, mgr: RuntimeManager) -> None:
    require("process")
    many = "import os\nfor i in range(20000):\n    open(f'/work/many/f{i:05d}', 'w').write('x')\n"
    local = tmp_path / "out"

    async def main() -> None:
        async with AsyncSandbox(runtime="process", manager=mgr, disk_mb=256, memory_mb=512) as sb:
            assert (await sb.exec(["sh", "-c", f'mkdir /work/many && python3 -c "{many}"'])).success
            task = asyncio.ensure_future(sb.download("/work/many", local))
            while not (local.exists() and any(local.iterdir())):  # the host has begun to write
                assert not task.done(), "the download ended before it could be cancelled"
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            written = sorted(p.name for p in local.iterdir())
            await asyncio.sleep(1)
            assert sorted(p.name for p in local.iterdir()) == written  # nothing after the cancel
            assert 0 < len(written) < 20000 and not [n for n in written if n.startswith(".stockade-")]
            assert [e["name"] for e in await sb.list_dir("/tmp") if e["name"].startswith(".stockade-")] == []
            # Cancelled while it packs or reads its pieces (or, on a fast host, just after): none is left.
            assert (await sb.exec(["sh", "-c", "head -c 40000000 /dev/zero > /work/big.bin"])).success
            task = asyncio.ensure_future(sb.download("/work/big.bin", tmp_path / "big"))
            await asyncio.sleep(0.3)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert [e["name"] for e in await sb.list_dir("/tmp") if e["name"].startswith(".stockade-")] == []

    asyncio.run(main())
