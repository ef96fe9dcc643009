"""The audit log: a hash chain that verify breaks at the right file:line, rotation and restarts that
keep it, redaction, and a writer that never makes ``record`` wait. Real files; no mocks."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import re
import stat
import threading
import time
from pathlib import Path

import pytest

from stockade.audit import GENESIS, AuditLog, AuditLogBusy, verify, verify_main


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def records(path: Path) -> list[dict[str, object]]:
    return [json.loads(raw) for raw in lines_of(path)]


def write_log(path: Path, n: int, **kw: int) -> None:
    log = AuditLog(str(path), **kw)
    for i in range(n):
        log.record("execute", uid=1000 + i, policy_digest=f"d{i}", outcome="ok")
    log.close()


def rewrite(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


class Stall:
    """Holds the writer before its next line, as a disk that does not answer would."""

    def __init__(self) -> None:
        self.parked = threading.Event()
        self.release = threading.Event()

    def __call__(self) -> None:
        self.parked.set()
        assert self.release.wait(30)


def test_each_line_chains_to_the_one_before(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 5)
    raw = lines_of(path)
    got = records(path)
    assert [r["seq"] for r in got] == list(range(5))
    assert got[0]["prev"] == GENESIS
    for before, record in zip(raw, got[1:], strict=False):
        assert record["prev"] == hashlib.sha256(before).hexdigest()
    first = got[0]
    assert first["event"] == "execute" and first["uid"] == 1000 and first["outcome"] == "ok"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", str(first["ts"]))
    assert raw[0] == json.dumps(first, sort_keys=True, separators=(",", ":")).encode()  # canonical form
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    report = verify([str(path)])
    assert report.ok and report.lines == 5 and report.first_break is None
    assert (report.first_seq, report.last_seq, report.last_hash) == (0, 4, hashlib.sha256(raw[-1]).hexdigest())


def test_an_edited_line_breaks_at_the_line_after_it(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 6)
    raw = lines_of(path)
    raw[2] = raw[2].replace(b'"outcome":"ok"', b'"outcome":"no"')  # line 3, still valid JSON
    rewrite(path, raw)
    report = verify([str(path)])
    assert not report.ok and report.lines == 3
    assert report.first_break == f"{path}:4: prev does not match the line before"


def test_a_deleted_line_breaks_where_it_was(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 6)
    raw = lines_of(path)
    del raw[3]  # line 4
    rewrite(path, raw)
    report = verify([str(path)])
    assert report.first_break == f"{path}:4: prev does not match the line before; seq 4 follows 2"


def test_reordered_lines_break_at_the_first_moved(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 6)
    raw = lines_of(path)
    raw[2], raw[3] = raw[3], raw[2]
    rewrite(path, raw)
    report = verify([str(path)])
    assert not report.ok and report.first_break is not None
    assert report.first_break.startswith(f"{path}:3: prev does not match the line before")


def test_a_line_that_is_not_json_is_named(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 4)
    raw = lines_of(path)
    raw[1] = raw[1][:-1]  # its closing brace
    rewrite(path, raw)
    assert verify([str(path)]).first_break == f"{path}:2: not JSON"
    rewrite(path, raw[:1])  # and a last line without its newline
    with path.open("ab") as f:
        f.write(b'{"seq":1')
    assert verify([str(path)]).first_break == f"{path}:2: no newline at the end (a write cut short)"


def test_a_fresh_chain_must_start_from_zeros(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 3)
    raw = lines_of(path)
    rewrite(path, raw[1:])  # the first line gone: seq 1 opens, its prev is not checkable
    assert verify([str(path)]).ok and verify([str(path)]).first_seq == 1
    forged = json.loads(raw[0])
    forged["prev"] = "f" * 64
    rewrite(path, [json.dumps(forged, sort_keys=True, separators=(",", ":")).encode(), *raw[1:]])
    assert verify([str(path)]).first_break == f"{path}:1: the first line (seq 0) must have prev = 64 zeros"


def rotated(tmp_path: Path, n: int, backups: int = 10) -> list[str]:
    """Writes n records into files of ~1 KB; returns the files present, oldest first."""
    path = tmp_path / "audit.log"
    write_log(path, n, max_bytes=1024, backups=backups)
    found = sorted((p for p in tmp_path.iterdir() if p.name.startswith("audit.log.")), key=lambda p: -int(p.suffix[1:]))
    return [str(p) for p in found] + [str(path)]


def test_rotation_keeps_the_chain_across_files(tmp_path: Path) -> None:
    files = rotated(tmp_path, 60, backups=20)
    assert len(files) >= 6
    assert all(os.path.getsize(f) <= 1024 for f in files)
    assert all(stat.S_IMODE(os.stat(f).st_mode) == 0o600 for f in files)
    seqs = [r["seq"] for f in files for r in records(Path(f))]
    assert seqs == list(range(60))
    for older, newer in itertools.pairwise(files):
        assert records(Path(newer))[0]["prev"] == hashlib.sha256(lines_of(Path(older))[-1]).hexdigest()
    report = verify(files)
    assert report.ok and report.lines == 60 and report.last_seq == 59


def test_rotation_drops_beyond_backups_and_the_rest_still_verifies(tmp_path: Path) -> None:
    files = rotated(tmp_path, 80, backups=2)
    assert [os.path.basename(f) for f in files] == ["audit.log.2", "audit.log.1", "audit.log"]
    report = verify(files)
    assert report.ok and report.first_seq is not None and report.first_seq > 0 and report.last_seq == 79
    out = io.StringIO()
    assert verify_main(files, out) == 0
    assert (
        f"seq {report.first_seq} starts it, older lines missing (rotated out, not given, or removed)" in out.getvalue()
    )


def test_a_missing_middle_file_breaks_at_the_next_files_first_line(tmp_path: Path) -> None:
    files = rotated(tmp_path, 60, backups=20)
    gone = files.pop(2)
    os.unlink(gone)
    report = verify(files)
    assert report.first_break is not None
    assert report.first_break.startswith(f"{files[2]}:1: prev does not match the last line of {files[1]}; seq ")


def test_a_restarted_writer_continues_seq_and_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 3)
    write_log(path, 2)
    assert [r["seq"] for r in records(path)] == list(range(5))
    assert verify([str(path)]).ok
    # Rotated away by someone else (logrotate's create): an empty file, the chain in path.1.
    os.rename(path, f"{path}.1")
    path.touch()
    write_log(path, 2)
    assert records(path)[0]["seq"] == 5
    assert verify([f"{path}.1", str(path)]).ok


def test_a_torn_last_line_is_ended_and_named_not_hidden(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 3)
    with path.open("ab") as f:
        f.write(b'{"event":"exec')  # a crash mid-write
    write_log(path, 2)
    assert lines_of(path)[3] == b'{"event":"exec'
    assert [r["seq"] for r in (json.loads(raw) for raw in lines_of(path)[4:])] == [4, 5]  # the torn line counts as one
    assert verify([str(path)]).first_break == f"{path}:4: not JSON"


def test_secrets_are_redacted_at_any_depth(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    secret = "s3cr3t-" + "x" * 20
    log = AuditLog(str(path))
    log.record(
        "admin",
        who=1000,
        auth_token=secret,
        request={"headers": {"Authorization": secret, "X-Api-Key": secret}, "items": [{"password": secret}]},
        deep=[[{"HMAC": secret, "private_key": secret, "Cookie": secret, "db_credentials": {"a": secret}}]],
        big="y" * 5000,
        odd=b"bytes",
        number=float("nan"),
        kinds={1, 2},
    )
    log.close()
    assert secret.encode() not in path.read_bytes()
    (r,) = records(path)
    assert r["auth_token"] == "[redacted]"
    assert r["request"] == {"headers": {"Authorization": "[redacted]", "X-Api-Key": "[redacted]"}, "items": [
        {"password": "[redacted]"}
    ]}  # fmt: skip
    assert r["deep"] == [[{k: "[redacted]" for k in ("HMAC", "private_key", "Cookie", "db_credentials")}]]
    big = str(r["big"])
    assert big.startswith("y" * 2048) and big.endswith("...[cut 2952 chars]") and len(big) < 2100
    assert (r["odd"], r["number"], sorted(r["kinds"])) == ("b'bytes'", "nan", [1, 2])
    assert r["who"] == 1000 and verify([str(path)]).ok


def test_records_from_many_threads_all_land_on_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(str(path), max_bytes=64 * 1024)
    start = threading.Barrier(8)

    def worker(t: int) -> None:
        start.wait()
        for i in range(500):
            log.record("execute", thread=t, i=i)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    log.close()
    files = [str(p) for p in sorted(tmp_path.glob("audit.log.*"), key=lambda p: -int(p.suffix[1:]))] + [str(path)]
    report = verify(files)
    assert report.ok and report.lines == 4000 and log.dropped == 0
    got = [(r["thread"], r["i"]) for f in files for r in records(Path(f))]
    assert sorted(got) == [(t, i) for t in range(8) for i in range(500)]


def test_record_does_not_wait_for_a_stuck_writer(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(str(path))
    stall = Stall()
    log._before_write = stall
    log.record("first")
    assert stall.parked.wait(10)
    for i in range(2000):  # had any of these waited for the writer, this test would hang
        log.record("execute", i=i)
    assert not path.exists()  # nothing written: the writer is still stuck on the first
    stall.release.set()
    log.close()
    assert log.dropped == 0 and len(lines_of(path)) == 2001 and verify([str(path)]).ok


def test_a_full_queue_counts_drops_and_puts_the_loss_on_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(str(path), queue_size=5)
    stall = Stall()
    log._before_write = stall
    log.record("first")
    assert stall.parked.wait(10)  # the writer holds "first"; the queue is empty
    for i in range(8):
        log.record("execute", i=i)
    assert log.dropped == 3
    stall.release.set()
    log.close()
    got = records(path)
    assert [r["event"] for r in got] == ["first"] + ["execute"] * 5 + ["audit_dropped"]
    assert [r["i"] for r in got[1:6]] == [0, 1, 2, 3, 4]
    assert (got[-1]["count"], got[-1]["reason"]) == (3, "queue full")
    assert verify([str(path)]).ok and log.dropped == 3
    # The chain holds, and says what it lost: verify says so too, and exits 3 (a loss is no pass).
    assert verify([str(path)]).dropped == 3
    out = io.StringIO()
    assert verify_main([str(path)], out) == 3
    assert "but 3 records were lost before they could be written" in out.getvalue()


# A write cut short by the disk (here the file size limit: part of the line written, then EFBIG), then
# the next records written: the partial line was left, and the chain read "not JSON" there for good.
_CUT_SHORT = """
import os, resource, signal, sys
from stockade.audit import AuditLog
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
path = sys.argv[1]
log = AuditLog(path)
log.record("before")
log.close()
writes = []
def before_write():  # the second write ("after") finds the disk with room again
    writes.append(None)
    if len(writes) == 2:
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
log = AuditLog(path)
log._before_write = before_write
resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) + 100, resource.RLIM_INFINITY))
log.record("evidence", filler="y" * 5000)  # 100 bytes of it fit
log.record("after")
log.close()
"""


def test_a_write_cut_short_leaves_no_torn_line_and_the_loss_is_on_the_chain(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "audit.log"
    subprocess.run([sys.executable, "-c", _CUT_SHORT, str(path)], check=True, timeout=60)
    got = records(path)
    assert [r["event"] for r in got] == ["before", "after", "audit_dropped"], got
    assert (got[-1]["count"], got[-1]["reason"]) == (1, "write failed")
    report = verify([str(path)])
    assert report.ok and report.dropped == 1, report


def test_write_failures_are_logged_not_raised_and_counted_on_the_chain(tmp_path: Path) -> None:
    where = tmp_path / "not-yet"
    path = where / "audit.log"
    log = AuditLog(str(path))
    calls: list[None] = []

    def before() -> None:  # the directory appears before the second record's write
        calls.append(None)
        if len(calls) == 2:
            where.mkdir()

    log._before_write = before
    log.record("lost")  # no directory: this one cannot be written
    log.record("kept")
    log.close()
    got = records(path)
    assert [r["event"] for r in got] == ["kept", "audit_dropped"]
    assert (got[1]["count"], got[1]["reason"]) == (1, "write failed")
    assert log.dropped == 0 and verify([str(path)]).ok


def test_losses_no_line_could_count_are_said_in_the_daemons_log_at_close(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A disk still full at close: the lost count lived in memory only, and verify said the chain was ok.
    where = tmp_path / "never"
    log = AuditLog(str(where / "audit.log"))  # its directory never appears: every write fails
    for i in range(3):
        log.record("lost", i=i)
    with caplog.at_level("ERROR", logger="stockade.audit"):
        log.close()
    assert f"audit log {where}/audit.log closed with 3 records lost and not counted in it" in caplog.text


def test_a_symlink_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    (tmp_path / "audit.log").symlink_to(target)
    log = AuditLog(str(tmp_path / "audit.log"))
    log.record("execute", uid=0)
    log.close()
    assert target.read_bytes() == b""


def test_a_fifo_put_beside_the_log_holds_up_neither_its_start_nor_its_writes(tmp_path: Path) -> None:
    # The one-writer lock was opened for writing, and the last backup for reading, each blocking on
    # a FIFO until another process opened its other end: the daemon's start, or its writer, hung.
    path = tmp_path / "audit.log"
    os.mkfifo(str(path) + ".lock")
    os.mkfifo(str(path) + ".1")
    made: list[AuditLog] = []
    start = threading.Thread(target=lambda: made.append(AuditLog(str(path))), daemon=True)
    start.start()
    start.join(10)
    assert made, "opening the log waited on the FIFO at its lock"
    made[0].record("a")
    closing = threading.Thread(target=made[0].close, daemon=True)
    closing.start()
    closing.join(10)
    assert not closing.is_alive(), "the writer waited on the FIFO at the last backup"
    assert [r["event"] for r in records(path)] == ["a"]


def test_a_link_put_at_the_last_backup_does_not_stop_the_log(tmp_path: Path) -> None:
    # Opened with O_NOFOLLOW, it raised ELOOP out of every open of the log: every record was lost.
    path = tmp_path / "audit.log"
    (tmp_path / "elsewhere").write_text('{"seq": 41}\n')
    os.symlink(tmp_path / "elsewhere", str(path) + ".1")
    log = AuditLog(str(path))
    log.record("a")
    log.close()
    assert [r["event"] for r in records(path)] == ["a"]


def test_close_is_idempotent_and_later_records_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(str(path))
    log.record("a")
    log.close()
    log.close()
    log.record("b")
    assert [r["event"] for r in records(path)] == ["a"]
    with pytest.raises(ValueError):
        AuditLog(str(path), backups=0)


def test_verify_main_says_what_it_found_and_exits_accordingly(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 3)
    out = io.StringIO()
    assert verify_main([str(path)], out) == 0
    last = hashlib.sha256(lines_of(path)[-1]).hexdigest()
    assert out.getvalue().startswith("audit chain ok: 3 lines, seq 0..2;") and last in out.getvalue()

    raw = lines_of(path)
    rewrite(path, [raw[0], raw[2]])
    out = io.StringIO()
    assert verify_main([str(path)], out) == 1
    broken = f"{path}:2: prev does not match the line before; seq 2 follows 0"
    assert out.getvalue() == f"audit chain BROKEN at {broken} (1 lines chain before it)\n"

    out = io.StringIO()
    assert verify_main([str(tmp_path / "audit.log.1"), str(path)], out) == 2
    assert out.getvalue().startswith(f"audit verify: cannot read {tmp_path / 'audit.log.1'}: ")
    out = io.StringIO()
    assert verify_main([], out) == 2 and out.getvalue().startswith("usage: stockade audit verify FILE...")


def test_an_mcp_calls_record_keeps_the_names_of_the_secrets_it_used(tmp_path: Path) -> None:
    """Found by a new user: each egress entry of an mcp.call record read "[redacted]" in the log
    (a field named ``secrets_used`` looks like a secret to the redaction), names and empty lists alike."""
    from stockade.mcp.records import call_record

    verdict = {"egress_requests": [
        {"host": "api.test", "port": 443, "method": "GET", "allowed": True, "secrets_used": ["APIKEY"]},
        {"host": "other.test", "port": 443, "method": "CONNECT", "allowed": False, "secrets_used": []},
    ]}  # fmt: skip
    log = AuditLog(str(tmp_path / "audit.log"))
    log.record("mcp.call", owner="uid:0", door="unix", **call_record("srv", "fetch", 12, "ok", verdict))
    log.close()
    (record,) = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert [e["substituted"] for e in record["egress"]] == [["APIKEY"], []]
    assert "[redacted]" not in json.dumps(record["egress"])


def test_an_mcp_calls_egress_is_bounded_as_a_runs_is() -> None:
    from stockade.audit import MAX_AUDITED_EGRESS
    from stockade.mcp.records import call_record

    long = "x" * 4000
    verdict = {"egress_requests": [{"host": long, "port": 443, "method": long, "allowed": True}] * 100}
    record = call_record("srv", "fetch", 12, "ok", verdict)
    assert len(record["egress"]) == MAX_AUDITED_EGRESS and record["egress_dropped"] == 100 - MAX_AUDITED_EGRESS
    assert all(len(e["host"]) < 300 and len(e["method"]) < 300 for e in record["egress"])


def test_one_writer_per_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    first = AuditLog(str(path))
    first.record("a")
    with pytest.raises(
        AuditLogBusy, match=r"audit.log is written by another process \(it holds .*\.audit\.log\.lock\)"
    ):
        AuditLog(str(path))  # a second writer would break the chain: refused before it writes
    first.close()
    second = AuditLog(str(path))  # the first is closed: its lock with it
    second.record("b")
    second.close()
    assert [r["event"] for r in records(path)] == ["a", "b"]
    assert verify([str(path)]).first_break is None
    assert sorted(os.listdir(tmp_path)) == [".audit.log.lock", "audit.log"]  # not named like a rotated file


def test_what_one_run_writes_to_the_log_is_bounded_whatever_its_code_did(tmp_path: Path) -> None:
    """A run's code chooses how many violations and requests it makes: listed one line (and one
    entry) each, a loop of refused syscalls wrote 2 MB a second and aged every other tenant's
    history out of the rotated files. The first are listed, the rest counted."""
    from stockade.daemon import observers
    from stockade.protocol.models import Caller
    from stockade.result import EgressRequest, ExecResult, SecurityViolation

    violations = [SecurityViolation(violation_type="syscall_blocked", detection_layer="SECCOMP", description="x")] * 40
    # Each as long as the code can make it: a path, a method, a name, and the reason it failed.
    long = "x" * 4000
    requests = [EgressRequest(host=long, port=443, method=long, path=long, allowed=True, reason=long)] * 100
    result = ExecResult(success=False, termination_reason="violation", runtime_used="process", policy_digest="d",
                        security_violations=violations, violation_counts={"syscall_blocked": 45},
                        violations_dropped=5, egress_requests=requests, egress_requests_dropped=7)  # fmt: skip
    log = AuditLog(str(tmp_path / "audit.log"))
    watching = observers.Observers(audit=log)
    watching._record(Caller(owner="uid 1000", door="unix"), None, result, False, False)
    log.close()
    records = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    events = [r["event"] for r in records]
    assert events == ["execution"] + ["violation"] * observers.MAX_AUDITED_VIOLATIONS + ["violations_uncounted"]
    (execution,) = [r for r in records if r["event"] == "execution"]
    assert len(execution["egress"]) == observers.MAX_AUDITED_EGRESS
    assert execution["egress_dropped"] == 7 + 100 - observers.MAX_AUDITED_EGRESS
    assert len(execution["egress"][0]["path"]) < 300
    assert (tmp_path / "audit.log").stat().st_size < 128 * 1024  # the whole run's records
    assert records[-1]["dropped"] == 5 + 40 - observers.MAX_AUDITED_VIOLATIONS
    assert records[-1]["counts"] == {"syscall_blocked": 45}


def test_a_rotation_that_fails_touches_no_other_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The log's descriptor is closed by the rotation before it fails: taking a partial line back then
    # truncated whatever file had just been given that descriptor's number (here, zero-padded it).
    victim = tmp_path / "victim.txt"
    victim.write_text("precious data\n")
    log = AuditLog(str(tmp_path / "audit.log"), max_bytes=300)
    log.record("one", x="a" * 100)
    deadline = time.monotonic() + 10
    while not (tmp_path / "audit.log").exists() or not (tmp_path / "audit.log").read_bytes().endswith(b"\n"):
        assert time.monotonic() < deadline, "the first record was never written"
        time.sleep(0.01)
    held: list[int] = []

    def failing_replace(src: str, dst: str) -> None:  # another thread opens a file meanwhile: it gets that number
        held.append(os.open(victim, os.O_RDWR))
        raise OSError(28, "No space left on device")

    stall = Stall()
    log._before_write = stall
    log.record("two", x="b" * 200)  # past max_bytes: a rotation
    assert stall.parked.wait(10)
    monkeypatch.setattr("stockade.audit.os.replace", failing_replace)
    stall.release.set()
    log.close()
    for fd in held:
        os.close(fd)
    assert held and victim.read_text() == "precious data\n"
