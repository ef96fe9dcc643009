"""A tamper-evident audit log: one JSON line per event, each carrying the SHA-256 of the line before.

Callers pass metadata only: who, which policy digest, the outcome, a violation's name, an admin
action. Never code, stdin, file data or environment values. The redaction here (keys that look like
tokens, secrets, passwords, HMACs, cookies, credentials; long strings cut) is a second line of
defence, not a licence to pass whole requests.

``AuditLog.record`` never blocks and never raises: it puts the event on a bounded queue that one
writer thread appends to the file (flushing each line, fsyncing once per batch). A full queue counts
the lost records (``dropped``) and, once there is room, an ``audit_dropped`` line with the count puts
the loss itself on the chain. The file rotates by size (``path`` -> ``path.1`` -> ...), and the chain,
like ``seq``, continues across files and across restarts of the writer.

``verify`` names the first line where the chain breaks: an edited line (the next line's ``prev`` no
longer matches), a deleted or reordered line (``prev`` mismatch, ``seq`` gap), a line that is not
JSON, a missing middle file. What a hash chain cannot show on its own: lines cut from the end of the
newest file, or the newest files removed (what is left is still a valid chain), and a chain rewritten
whole from the edited line on by someone with write access. Against those, ship the lines as they are
written to storage the daemon's host cannot rewrite, and compare the last hash ``verify`` reports.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import logging
import math
import os
import queue
import stat
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from .errors import ConfigError

log = logging.getLogger("stockade.audit")

GENESIS = "0" * 64
MAX_STRING = 2048
MAX_DEPTH = 16
# A run's egress in its record: the first requests, and texts the code chooses (a path, a method,
# a host that does not resolve) cut shorter than the log's own cut, so that one run's record
# stays tens of KiB and a tenant's loop of runs cannot age everyone else's history out as fast.
MAX_AUDITED_EGRESS = 64
MAX_AUDITED_TEXT = 256
BATCH = 1024
REDACTED = "[redacted]"
SECRET_WORDS = "token secret password passwd hmac authorization api_key apikey cookie credential private_key".split()

_Item = tuple[str, str, dict[str, Any]]


def _secret_key(key: str) -> bool:
    k = key.lower().replace("-", "_")
    return any(word in k for word in SECRET_WORDS)


def _clean(value: Any, depth: int = 0) -> Any:
    """A JSON-safe copy of ``value`` with secret-looking keys redacted and long strings cut."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth >= MAX_DEPTH:
        return "[too deep]"
    if isinstance(value, dict):
        return {str(k): REDACTED if _secret_key(str(k)) else _clean(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean(v, depth + 1) for v in value]
    return _cut(value if isinstance(value, str) else str(value), MAX_STRING)


def _cut(text: str, limit: int) -> str:
    """``text`` cut at ``limit`` characters, saying how many were cut."""
    return text if len(text) <= limit else f"{text[:limit]}...[cut {len(text) - limit} chars]"


def short_text(text: str | None) -> str | None:
    """``text`` cut at MAX_AUDITED_TEXT characters, saying how many were cut."""
    return None if text is None else _cut(text, MAX_AUDITED_TEXT)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _tail(fd: int, size: int) -> tuple[list[bytes], bool]:
    """The last (up to) two lines of a file without their newlines, and whether the last one is torn."""
    pos, buf = size, b""
    while pos > 0 and buf.count(b"\n") < 3:
        n = min(65536, pos)
        pos -= n
        buf = os.pread(fd, n, pos) + buf
    torn = bool(buf) and not buf.endswith(b"\n")
    lines = buf.split(b"\n")
    if not torn:
        lines.pop()
    if pos > 0:
        lines.pop(0)
    return lines[-2:], torn


def _seq_of(raw: bytes) -> int | None:
    try:
        seq = json.loads(raw).get("seq")
    except (ValueError, AttributeError, RecursionError):
        return None
    return seq if type(seq) is int else None


class AuditLogBusy(ConfigError):
    """Another writer holds the audit log: two on one file would break its chain."""


def lock_path(path: str) -> str:
    """The file a writer of ``path`` locks: hidden, and not named like a rotated file (``path.N``)."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.lock")


def _lock_for_one_writer(path: str) -> int | None:
    """An exclusive lock on ``lock_path(path)``, held while the log is open: one writer per file.
    None where the lock cannot be made (no directory yet): the log goes on, as it does when it
    cannot be written, and says so."""
    try:
        # Non-blocking: a FIFO put there would hold the open (and the daemon's start) until a reader came.
        fd = os.open(lock_path(path), os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(f"{lock_path(path)} is not a regular file")
    except OSError as exc:
        log.warning("audit log %s: cannot take its one-writer lock (%s); a second writer is not refused", path, exc)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AuditLogBusy(
            f"the audit log {path} is written by another process (it holds {lock_path(path)}): "
            "two writers on one file would break its chain"
        ) from None
    return fd


class AuditLog:
    """Appends audit records to ``path`` from one writer thread; see the module's docstring.
    One writer per file: a second ``AuditLog`` on it while this one is open raises ``AuditLogBusy``."""

    def __init__(
        self, path: str, *, max_bytes: int = 64 * 1024 * 1024, backups: int = 10, queue_size: int = 100_000
    ) -> None:
        if max_bytes < 1 or backups < 1 or queue_size < 1:
            raise ValueError("max_bytes, backups and queue_size must be at least 1")
        self._path, self._max_bytes, self._backups = path, max_bytes, backups
        self._writer_lock: int | None = _lock_for_one_writer(path)
        self._queue: queue.Queue[_Item | None] = queue.Queue(queue_size)
        self._lock = threading.Lock()  # guards _closed, _dropped, _pending_drops
        self._closed = False
        self._dropped = self._pending_drops = 0
        self._stop = threading.Event()
        # The writer's own state: touched only by its thread.
        self._fd: int | None = None
        self._size = self._seq = self._lost = 0
        self._prev = GENESIS
        self._before_write: Callable[[], None] | None = None  # tests: stands for a stalled disk
        # Started by the first record: a daemon that gives root up makes its log as root and records
        # once root is gone, so that its writer is no thread of root's (capabilities are per thread).
        self._thread = threading.Thread(target=self._run, name="stockade-audit", daemon=True)

    @property
    def dropped(self) -> int:
        """Records lost because the queue was full (each counted again in an ``audit_dropped`` line)."""
        with self._lock:
            return self._dropped

    def record(self, event: str, **fields: Any) -> None:
        """Queues one record; never blocks, never raises. ``seq``, ``ts``, ``event`` and ``prev`` are ours."""
        try:
            item = (str(_clean(event)), _now(), _clean(fields))
        except Exception:
            log.exception("audit record %r could not be made", event)
            return
        with self._lock:
            if self._closed:
                log.warning("audit log %s is closed: %s not recorded", self._path, item[0])
                return
            try:
                if self._pending_drops:  # there was no room before: the loss goes on the chain first
                    note = {"count": self._pending_drops, "reason": "queue full"}
                    self._queue.put_nowait(("audit_dropped", item[1], note))
                    self._pending_drops = 0
                self._queue.put_nowait(item)
            except queue.Full:
                self._dropped += 1
                self._pending_drops += 1
            if self._thread.ident is None:
                try:
                    self._thread.start()
                except RuntimeError as exc:  # no thread to be had now (a host out of them): the next record tries
                    self._thread = threading.Thread(target=self._run, name="stockade-audit", daemon=True)
                    log.error("audit log %s: its writer could not start (%s); records wait for it", self._path, exc)

    def close(self, timeout: float = 5.0) -> None:
        """Writes what is queued and stops the writer, waiting at most ``timeout`` seconds. Idempotent."""
        with self._lock:
            self._closed = True
            started = self._thread.ident is not None
        self._stop.set()
        try:
            self._queue.put_nowait(None)  # wakes the writer at once
        except queue.Full:
            pass
        if started:
            self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("audit writer still busy after %.1fs; %d records not yet written", timeout, self._queue.qsize())
        elif self._writer_lock is not None:
            os.close(self._writer_lock)  # the next writer may take the file
            self._writer_lock = None

    # The writer thread.

    def _run(self) -> None:
        while True:
            batch: list[_Item | None] = []
            try:
                batch.append(self._queue.get(timeout=0.5))
                while len(batch) < BATCH:
                    batch.append(self._queue.get_nowait())
            except queue.Empty:
                pass
            self._guarded(batch)
            if self._stop.is_set() and self._queue.empty():
                break
        self._guarded([])  # drops counted while the last batch was written
        with self._lock:
            unsaid = self._lost + self._pending_drops
        if unsaid:
            # No line of the chain could say it (a disk still full): the daemon's own log says it, the
            # one place it is kept (verify cannot see records that never reached the file).
            log.error("audit log %s closed with %d records lost and not counted in it", self._path, unsaid)
        self._drop_fd()

    def _guarded(self, batch: list[_Item | None]) -> None:
        try:
            self._write_batch(batch)
        except Exception:  # a bug here must not end the thread: the queue would only fill
            log.exception("audit writer")

    def _write_batch(self, batch: list[_Item | None]) -> None:
        wrote = False
        for item in batch:
            if item is not None:
                wrote = self._write(*item) or wrote
        dropped = 0
        if self._queue.empty():  # idle: no record came to carry the count in
            with self._lock:
                dropped, self._pending_drops = self._pending_drops, 0
        if dropped and not self._write("audit_dropped", _now(), {"count": dropped, "reason": "queue full"}):
            with self._lock:
                self._pending_drops += dropped
        if self._lost and self._fd is not None:
            lost, self._lost = self._lost, 0
            log.warning("audit log %s is written again; %d records were lost", self._path, lost)
            if not self._write("audit_dropped", _now(), {"count": lost, "reason": "write failed"}):
                self._lost += lost
        if wrote or dropped:
            self._sync()

    def _write(self, event: str, ts: str, fields: dict[str, Any]) -> bool:
        if self._before_write is not None:
            self._before_write()
        writing: tuple[int, int] | None = None  # (fd, its size) while a line is being written
        try:
            fd = self._fd if self._fd is not None else self._open()
            record = {**fields, "seq": self._seq, "ts": ts, "event": event, "prev": self._prev}
            line = json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
            if self._size and self._size + len(line) + 1 > self._max_bytes:
                fd = self._rotate()
            writing = (fd, os.fstat(fd).st_size)
            _write_all(fd, line + b"\n")
        except (OSError, ValueError) as e:
            if writing is not None:  # a line cut short (a full disk): no torn line left for the next to chain to
                try:
                    os.ftruncate(*writing)
                except OSError as cut:
                    log.error("audit log %s: a partial line could not be taken back: %s", self._path, cut)
            self._lost += 1
            if self._lost == 1:
                log.error("audit log %s cannot be written (%s); records are lost until it can", self._path, e)
            self._drop_fd()  # the next write reopens and continues from what is on disk
            return False
        self._prev, self._seq, self._size = hashlib.sha256(line).hexdigest(), self._seq + 1, self._size + len(line) + 1
        return True

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self._path, flags, 0o600)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(f"{self._path} is not a regular file")
            size = st.st_size
            if size:
                lines, torn = _tail(fd, size)
                if torn:  # a write cut short: end its line so that ours starts on one of its own
                    log.warning("audit log %s ends in a partial line; verify will name it", self._path)
                    _write_all(fd, b"\n")
                    size += 1
            else:
                lines = self._tail_of(self._path + ".1")
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._size = fd, size
        self._seq, self._prev = 0, GENESIS
        if lines:
            self._prev = hashlib.sha256(lines[-1]).hexdigest()
            for back, raw in enumerate(reversed(lines)):
                seq = _seq_of(raw)
                if seq is not None:
                    self._seq = seq + 1 + back
                    break
        return fd

    @staticmethod
    def _tail_of(path: str) -> list[bytes]:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO: no wait
        except FileNotFoundError:
            return []
        except OSError as exc:  # a link (ELOOP), unreadable: the log goes on all the same
            log.warning("audit log %s cannot be read (%s): the chain starts afresh", path, exc)
            return []
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                log.warning("audit log %s is not a regular file: the chain starts afresh", path)
                return []
            return _tail(fd, st.st_size)[0]
        finally:
            os.close(fd)

    def _rotate(self) -> int:
        self._sync()
        self._drop_fd()
        for n in range(self._backups - 1, 0, -1):
            if os.path.lexists(f"{self._path}.{n}"):
                os.replace(f"{self._path}.{n}", f"{self._path}.{n + 1}")
        os.replace(self._path, self._path + ".1")
        seq, prev = self._seq, self._prev
        fd = self._open()
        self._seq, self._prev = seq, prev  # what path.1 ends with, without reading it back
        dir_fd = os.open(os.path.dirname(self._path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return fd

    def _sync(self) -> None:
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError as e:
                log.error("audit log %s: fsync failed: %s", self._path, e)

    def _drop_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError as e:
                log.error("audit log %s: close failed: %s", self._path, e)


@dataclass
class VerifyReport:
    ok: bool
    lines: int  # lines that chain (all of them when ok; those before the break otherwise)
    first_break: str | None  # "FILE:LINE: what is wrong"
    first_seq: int | None = None  # > 0: the oldest lines were rotated out (their files not given)
    last_seq: int | None = None
    last_hash: str | None = None  # compare with a copy kept elsewhere: a chain cannot show a cut tail
    dropped: int = 0  # records the log says it lost (its audit_dropped lines' counts)


def verify(paths: Sequence[str]) -> VerifyReport:
    """Checks the chain through ``paths``, oldest file first; raises OSError when one cannot be read."""
    last: bytes | None = None
    first_seq: int | None = None
    last_seq = 0
    last_where = ""
    count = 0
    dropped = 0

    def broken(where: str, why: str) -> VerifyReport:
        return VerifyReport(False, count, f"{where}: {why}", first_seq, last_seq if last is not None else None, None)

    for path in paths:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{path}:{lineno}"
                if not raw.endswith(b"\n"):
                    return broken(where, "no newline at the end (a write cut short)")
                line = raw[:-1]
                try:
                    record = json.loads(line)
                except (ValueError, RecursionError):
                    return broken(where, "not JSON")
                seq = record.get("seq") if isinstance(record, dict) else None
                prev = record.get("prev") if isinstance(record, dict) else None
                if type(seq) is not int or not isinstance(prev, str):
                    return broken(where, "not an audit record (no seq or prev)")
                if record.get("event") == "audit_dropped" and type(record.get("count")) is int:
                    dropped += record["count"]
                if last is None:
                    if seq == 0 and prev != GENESIS:
                        return broken(where, "the first line (seq 0) must have prev = 64 zeros")
                    first_seq = seq
                else:
                    problems = []
                    if prev != hashlib.sha256(last).hexdigest():
                        before = "the line before" if lineno > 1 else f"the last line of {last_where}"
                        problems.append(f"prev does not match {before}")
                    if seq != last_seq + 1:
                        problems.append(f"seq {seq} follows {last_seq}")
                    if problems:
                        return broken(where, "; ".join(problems))
                last, last_seq, last_where = line, seq, path
                count += 1
    if last is None:
        return VerifyReport(True, 0, None)
    return VerifyReport(True, count, None, first_seq, last_seq, hashlib.sha256(last).hexdigest(), dropped)


def verify_main(paths: Sequence[str], out: TextIO | None = None) -> int:
    """``stockade audit verify FILE...``: one line on ``out``; 0 intact, 1 broken, 2 unreadable,
    3 intact but saying records were lost (``audit_dropped``: a full queue, a failed write)."""
    out = out if out is not None else sys.stdout
    if not paths:
        print("usage: stockade audit verify FILE... (oldest first: audit.log.2 audit.log.1 audit.log)", file=out)
        return 2
    try:
        report = verify(paths)
    except OSError as e:
        print(f"audit verify: cannot read {e.filename or ''}: {e.strerror or e}", file=out)
        return 2
    if not report.ok:
        print(f"audit chain BROKEN at {report.first_break} ({report.lines} lines chain before it)", file=out)
        return 1
    if report.last_hash is None:
        print(f"audit chain ok: no lines in {len(paths)} file(s)", file=out)
        return 0
    older = (
        f"; seq {report.first_seq} starts it, older lines missing (rotated out, not given, or removed)"
        if report.first_seq
        else ""
    )
    lost = (
        f"; but {report.dropped} records were lost before they could be written (its audit_dropped lines)"
        if report.dropped
        else ""
    )
    print(
        f"audit chain ok: {report.lines} lines, seq {report.first_seq}..{report.last_seq}{older}{lost}; "
        f"last line's sha256 {report.last_hash} (compare with a copy kept elsewhere: a chain cannot show a cut end)",
        file=out,
    )
    return 3 if report.dropped else 0
