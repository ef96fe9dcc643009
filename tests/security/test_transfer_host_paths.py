"""Transfers that a sandbox tries to turn against the host (transfer_paths.py, transfer_pack.py,
transfer_unpack.py).

An upload reads and a download writes below a host path the caller names, as the caller (root
here). When that path lies in a directory a sandbox writes (a shared mount), the sandbox can plant
a link on the way, or swap a directory of the uploaded tree for a link while the host walks it:
the host must then neither write the sandbox's files into a directory of its choosing nor read a
private tree into a sandbox. And an archive out of a sandbox must not make the host hold many
times its size in memory (tarfile's PAX records).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import stat
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stockade import Sandbox
from stockade.errors import TransferError, TransferTooLargeError, UnsafeArchiveError
from stockade.runtimes.manager import RuntimeManager
from stockade.transfer_pack import pack
from stockade.transfer_unpack import MAX_METADATA, unpack
from tests.conftest import require
from tests.helpers import shared_directory

SECRET = "HOST-SECRET-CANARY"


def private_tree(root: Path) -> Path:
    """A root-only directory holding a root-only file: what no sandbox may read."""
    root.mkdir(mode=0o700)
    (root / "canary.txt").write_text(SECRET + "\n")
    os.chmod(root / "canary.txt", 0o600)
    return root


def test_a_link_planted_in_a_share_steers_neither_a_download_nor_an_upload(
    tmp_path: Path, manager: RuntimeManager
) -> None:
    require("process")
    victim = private_tree(tmp_path / "root-only")  # stands in for /etc/cron.d, /root/.ssh
    with (
        shared_directory(0o777) as share,
        Sandbox(runtime="process", manager=manager, filesystem_access=[f"{share}:/share:rw"]) as sb,
    ):
        planted = sb.exec(
            ["sh", "-c", f"mkdir -p /work/out /share/real && echo evil > /work/out/evil "
             f"&& ln -s {victim} /share/results && ln -s {victim} /share/real/inner"]
        )  # fmt: skip
        assert planted.success, planted.summary()
        assert os.lstat(os.path.join(share, "results")).st_uid not in (0, os.geteuid())  # the sandbox's uid
        with pytest.raises(TransferError, match=r"'results' on the way is a symbolic link owned by uid \d+"):
            sb.download("/work/out", os.path.join(share, "results"))
        with pytest.raises(TransferError, match="'inner' on the way is a symbolic link"):
            sb.download("/work/out", os.path.join(share, "real", "inner", "deeper"))
        with pytest.raises(TransferError, match="'results' on the way is a symbolic link"):
            sb.upload(os.path.join(share, "results"), "/work/in")
        assert sorted(p.name for p in victim.iterdir()) == ["canary.txt"]
        assert sb.exec(["test", "-e", "/work/in"]).exit_code == 1
        # The share's real directories take both ways.
        assert sb.download("/work/out", os.path.join(share, "real", "here")).files == 1
        assert Path(share, "real", "here", "evil").read_text() == "evil\n"
        assert sb.upload(os.path.join(share, "real", "here"), "/work/back").files == 1


@contextlib.contextmanager
def root_only_directory() -> Iterator[Path]:
    """A directory where only root adds or moves entries, on a path of such directories (not below
    /tmp, whose sticky bit lets another uid move a link of root's in)."""
    base = Path(tempfile.mkdtemp(prefix="stockade-links-", dir="/run"))
    try:
        os.chmod(base, 0o755)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_links_root_owns_are_followed_others_are_not(manager: RuntimeManager) -> None:
    require("process")
    with root_only_directory() as base:
        real = base / "real"
        (real / "tree").mkdir(parents=True)
        (real / "tree" / "f").write_text("f")
        via = base / "via"
        via.symlink_to("real")  # the host's own link, as /var/run -> /run is
        with Sandbox(runtime="process", manager=manager) as sb:
            sb.exec(["sh", "-c", "mkdir /work/out && echo x > /work/out/x"])
            assert sb.download("/work/out", via / "down").files == 1
            assert (real / "down" / "x").read_text() == "x\n"
            assert sb.upload(via / "tree", "/work/in").files == 1
            os.lchown(via, 54321, 54321)  # the same link, now another user's
            with pytest.raises(TransferError, match="owned by uid 54321"):
                sb.download("/work/out", via / "again")
            with pytest.raises(TransferError, match="owned by uid 54321"):
                sb.upload(via / "tree", "/work/again")
        assert not (real / "again").exists()


def test_a_link_of_roots_that_a_sandbox_moved_onto_the_name_is_not_followed(
    tmp_path: Path, manager: RuntimeManager
) -> None:
    # The sandbox cannot make a link root owns, but it can move one that is already in a directory
    # it writes (or the root-owned directory that holds one) onto the name the host looks up.
    require("process")
    victim = private_tree(tmp_path / "root-only")
    with (
        shared_directory(0o777) as share,
        Sandbox(runtime="process", manager=manager, filesystem_access=[f"{share}:/share:rw"]) as sb,
    ):
        os.symlink(victim, os.path.join(share, "cache"))  # root's own link, for its own reasons
        os.mkdir(os.path.join(share, "kept"), 0o755)
        os.symlink(victim, os.path.join(share, "kept", "inner"))  # in a directory only root writes
        moved = sb.exec(["sh", "-c", "mkdir -p /work/out && echo evil > /work/out/evil "
                                     "&& mv /share/cache /share/results && mv /share/kept /share/moved"])  # fmt: skip
        assert moved.success, moved.summary()
        assert os.lstat(os.path.join(share, "results")).st_uid == 0
        for attempt in (
            lambda: sb.download("/work/out", os.path.join(share, "results")),
            lambda: sb.upload(os.path.join(share, "results"), "/work/in"),
            lambda: sb.download("/work/out", os.path.join(share, "moved", "inner", "deeper")),
            lambda: sb.upload(os.path.join(share, "moved", "inner"), "/work/in"),
        ):
            with pytest.raises(TransferError, match="whose entries a uid other than root may change"):
                attempt()
        assert sorted(p.name for p in victim.iterdir()) == ["canary.txt"]
        assert sb.exec(["test", "-e", "/work/in"]).exit_code == 1
    # A sticky directory (/tmp) keeps root's entries, but one of root's links can be moved in.
    with root_only_directory() as base:
        sticky = base / "sticky"
        sticky.mkdir()
        os.chmod(sticky, 0o1777)
        (base / "real").mkdir()
        (sticky / "via").symlink_to(base / "real")
        with Sandbox(runtime="process", manager=manager) as sb:
            sb.exec(["sh", "-c", "mkdir /work/out && echo x > /work/out/x"])
            with pytest.raises(TransferError, match="whose entries a uid other than root may change"):
                sb.download("/work/out", sticky / "via" / "down")
        assert not (base / "real" / "down").exists()


# In sandbox A: swap /share/d (a directory with a decoy) and /share/l (a link to a private
# directory) as fast as it can, for as long as the test runs.
FLIP = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
os.makedirs("/share/d")
with open("/share/d/canary.txt", "w") as f:
    f.write("decoy\n")
os.symlink(sys.argv[1], "/share/l")
print("ready", flush=True)
while True:
    libc.syscall(316, -100, b"/share/d", -100, b"/share/l", 2)  # renameat2(RENAME_EXCHANGE)
"""


def test_an_upload_of_a_tree_being_swapped_never_reads_outside_it(tmp_path: Path, manager: RuntimeManager) -> None:
    require("process")
    private = private_tree(tmp_path / "private")
    with (
        shared_directory(0o777) as share,
        Sandbox(runtime="process", manager=manager, filesystem_access=[f"{share}:/share:rw"], timeout_seconds=120) as a,
        Sandbox(runtime="process", manager=manager, disk_mb=64) as b,
    ):
        flipper = a.spawn(["python3", "-c", FLIP, str(private)])
        try:
            deadline = time.monotonic() + 30
            while b"ready" not in flipper.read()[0]:
                assert flipper.poll() is None and time.monotonic() < deadline, flipper.read()
                time.sleep(0.05)
            kinds = set()
            deadline = time.monotonic() + 30
            while len(kinds) < 2 and time.monotonic() < deadline:  # the swap is live: the host sees both
                kinds.add("link" if stat.S_ISLNK(os.lstat(os.path.join(share, "d")).st_mode) else "dir")
                time.sleep(0.0005)
            assert kinds == {"link", "dir"}
            refused = 0
            for i in range(100):
                try:
                    b.upload(share, f"/work/in{i}")
                except TransferError as exc:
                    assert "changed while it was packed" in str(exc) or "outside the uploaded tree" in str(exc)
                    refused += 1
            got = b.exec(["sh", "-c", "cat /work/in*/*/canary.txt 2>/dev/null; true"])
            assert SECRET not in got.stdout
            assert "decoy" in got.stdout or refused == 100
        finally:
            flipper.kill("SIGKILL")
            flipper.wait(10)


def pax_archive(records: int, headers: int = 1) -> bytes:
    """A tar whose members carry ``records`` PAX records each, as a subverted isolate could pack."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for n in range(headers):
            info = tarfile.TarInfo(f"f{n}")
            info.size = 1
            info.pax_headers = {f"k{i}": "" for i in range(records)}
            tar.addfile(info, io.BytesIO(b"x"))
    return buf.getvalue()


def header(name: str, kind: bytes, size: int, size_field: bytes | None = None) -> bytes:
    """One GNU header, its size field as given (else octal), with a right checksum."""
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    raw = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    if size_field is not None:
        raw[124:136] = size_field
        raw[148:156] = b" " * 8
        raw[148:156] = b"%06o\0 " % sum(raw[:512])
    return bytes(raw)


def refused(data: bytes, where: Path) -> str:
    with pytest.raises(UnsafeArchiveError) as caught:
        unpack(io.BytesIO(data), str(where), 256 << 20, 1000, "/work/x", False, False)
    assert not where.exists()
    return str(caught.value)


def test_pax_records_and_huge_long_names_are_refused_before_tarfile_reads_them(tmp_path: Path) -> None:
    bomb = pax_archive(records=200_000)  # 2 MB on the wire, a dict of 200,000 entries in tarfile
    assert "holds PAX records" in refused(bomb, tmp_path / "a")
    assert "holds PAX records" in refused(pax_archive(records=3), tmp_path / "b")  # GNU's format has none
    # Hidden from a walk that steps over data where tarfile does not: behind a directory that declares
    # the PAX member as its data, or after a size field a NUL cuts short for tarfile.
    behind_dir = header("d", tarfile.DIRTYPE, len(bomb)) + bomb
    assert "holds PAX records" in refused(behind_dir, tmp_path / "c")
    cut = header("e", tarfile.REGTYPE, 0, size_field=b"0\0zzzzzzzzzz") + bomb
    assert "holds PAX records" in refused(cut, tmp_path / "d")
    long = io.BytesIO()
    with tarfile.open(fileobj=long, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("n" * (MAX_METADATA + 1))
        tar.addfile(info, io.BytesIO(b""))
    assert f"long name of {MAX_METADATA + 2} bytes" in refused(long.getvalue(), tmp_path / "e")
    # GNU long names of real depth go through.
    fine = io.BytesIO()
    with tarfile.open(fileobj=fine, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("d" * 200 + "/" + "n" * 250)
        info.size = 2
        tar.addfile(info, io.BytesIO(b"ok"))
    fine.seek(0)
    assert unpack(fine, str(tmp_path / "f"), 1 << 20, 10, "/w", False, False)[0] == 1
    assert (tmp_path / "f" / ("d" * 200) / ("n" * 250)).read_bytes() == b"ok"


def test_headers_are_read_as_tarfile_reads_them_and_one_it_cannot_read_is_refused(tmp_path: Path) -> None:
    bomb = pax_archive(records=200_000)
    # tarfile's own parser strips \x1c-\x1f around a number, bytes.strip() does not: a walk of its own
    # that gave up on such a field let the PAX bomb behind it through (a GiB on the host).
    odd = header("d", tarfile.DIRTYPE, 0, size_field=b"\x1c0".ljust(12, b"\0")) + bomb
    assert "holds PAX records" in refused(odd, tmp_path / "a")
    # A header tarfile cannot read mid-archive would end it there, silently shorter: refused.
    good = header("f", tarfile.REGTYPE, 2) + b"ok".ljust(512, b"\0")
    assert "a header tar cannot read" in refused(good + b"\x01" * 512 + bomb, tmp_path / "b")
    # Sparse members are refused before tarfile reads their extension blocks into a list.
    sparse = bytearray(header("s", tarfile.GNUTYPE_SPARSE, 0))
    sparse[482] = 1  # "extended": blocks follow
    sparse[148:156] = b" " * 8
    sparse[148:156] = b"%06o\0 " % sum(sparse[:512])
    assert "a sparse file" in refused(bytes(sparse) + b"\xff" * 512 * 4, tmp_path / "c")
    # A chain of GNU long names: tarfile follows it by recursion (RecursionError past ~300).
    chain = b"".join(header("././@LongLink", tarfile.GNUTYPE_LONGNAME, 512) + b"n" * 511 + b"\0" for _ in range(400))
    assert "a chain of long names" in refused(chain + good, tmp_path / "d")
    # A size no file holds (base-256 lets it reach 2**88): refused, not a seek that fails.
    for size in (1 << 62, 1 << 63, 1 << 87):
        huge = header("h", tarfile.REGTYPE, 0, size_field=b"\x80" + size.to_bytes(11, "big"))
        assert "more than it holds" in refused(huge + b"\0" * 1024, tmp_path / f"h{size.bit_length()}")
    # One long name and one long link before their member is what GNU tar writes: let through.
    fine = io.BytesIO()
    with tarfile.open(fileobj=fine, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("l" * 150)
        info.type, info.linkname = tarfile.LNKTYPE, "t" * 150
        target = tarfile.TarInfo("t" * 150)
        target.size = 1
        tar.addfile(target, io.BytesIO(b"1"))
        tar.addfile(info)
    fine.seek(0)
    assert unpack(fine, str(tmp_path / "e"), 1 << 20, 10, "/w", False, False)[0] == 2


def test_an_upload_of_many_links_is_held_to_its_cap_before_the_spool_grows(tmp_path: Path) -> None:
    # A sandbox that writes a share can fill it with links or empty directories, which have no data
    # to weigh: each entry is held to max_bytes before it is written, not the archive after.
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(3000):
        (tree / f"l{i}").symlink_to("t" * 200)  # a GNU long link each: headers only
    with tempfile.TemporaryFile() as spool:
        with pytest.raises(TransferTooLargeError, match=r"at least \d+ bytes as an archive, and max_bytes is 65536"):
            pack(str(tree), spool, 64 << 10)
        assert spool.seek(0, os.SEEK_END) <= 64 << 10


def test_an_existing_file_deep_below_local_dir_is_not_replaced_unasked(tmp_path: Path) -> None:
    parts = ["d" * 250] * 20  # past PATH_MAX as one path: walked one directory at a time
    deep = tmp_path / "out"
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        os.mkdir("out", dir_fd=fd)
        for part in ["out", *parts]:
            if part != "out":
                os.mkdir(part, dir_fd=fd)
            inner = os.open(part, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
        with open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "w") as f:
            f.write("mine")
    finally:
        os.close(fd)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("/".join([*parts, "f"]))
        info.size = 5
        tar.addfile(info, io.BytesIO(b"EVIL!"))
    archive.seek(0)
    with pytest.raises(TransferError, match=r"exists \(1 file\(s\) would be replaced\)"):
        unpack(archive, str(deep), 1 << 20, 100, "/w", False, False)


def test_a_file_that_shrinks_while_it_is_packed_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A sandbox writing a shared file can cut it short between the size read and the copy: tarfile
    # then raised a bare OSError naming no file.
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "data").write_bytes(b"x" * 100_000)
    real = os.fstat

    def cut_short(fd: int) -> os.stat_result:  # the size read before the copy, larger than what is there
        st = real(fd)
        if not stat.S_ISREG(st.st_mode):
            return st
        fields = list(st)
        fields[stat.ST_SIZE] = st.st_size + 65536
        return os.stat_result(fields)

    monkeypatch.setattr(os, "fstat", cut_short)
    with tempfile.TemporaryFile() as spool, pytest.raises(TransferError, match="data shrank while it was packed"):
        pack(str(tmp_path / "tree"), spool, 64 << 20)


def test_a_transfer_scripts_answer_is_read_as_ascii_counts_only() -> None:
    # The sandbox writes the file one of these numbers is read from: "²" passed isdigit, then int().
    from types import SimpleNamespace

    from stockade.transfer import _numbers

    def said(text: str) -> tuple[int, ...] | None:
        return _numbers(SimpleNamespace(stdout=text), 2)  # type: ignore[arg-type]

    assert said("12 34\n") == (12, 34)
    assert said("² 3") is None and said("1" * 5000 + " 3") is None and said("١٢ 3") is None


def _tar_of(entries: dict[str, bytes | None]) -> io.BytesIO:
    """A GNU tar of ``entries``: a file's bytes, or None for a directory."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    out.seek(0)
    return out


@pytest.mark.parametrize("first", ["store", "head"])
def test_a_bare_repository_laid_out_over_two_downloads_is_refused(tmp_path: Path, first: str) -> None:
    # Each archive alone is no repository; the second one's names with what the first left are.
    store = {"evil/": None, "evil/objects/": None, "evil/refs/": None}
    head = {"evil/HEAD": b"ref: refs/heads/main\n", "evil/config": b"[core]\n\tfsmonitor = touch /tmp/pwned\n"}
    one, two = (store, head) if first == "store" else (head, store)
    assert unpack(_tar_of(one), str(tmp_path / "results"), 1 << 20, 100, "/work/x", False, False)[0] >= 0
    with pytest.raises(UnsafeArchiveError, match=r"laid out as a git repository .* with what is there already"):
        unpack(_tar_of(two), str(tmp_path / "results"), 1 << 20, 100, "/work/x", False, False)
    written = sorted(p.name for p in (tmp_path / "results" / "evil").iterdir())
    assert written == sorted(Path(n).name for n in one if n != "evil/"), written  # nothing of the second
    # Asked for (vcs=True), it is written; and names elsewhere are nobody's business.
    unpack(_tar_of(two), str(tmp_path / "results"), 1 << 20, 100, "/work/x", False, False, vcs=True)
    unpack(_tar_of({"other/HEAD": b"x"}), str(tmp_path / "results"), 1 << 20, 100, "/work/x", False, False)
