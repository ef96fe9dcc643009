"""The in-isolate half of a component: a relay that runs one command and talks through files.

Stdlib-only: its source is sent into the isolate with the agent's ``run_code``
and ends with a call to ``launch``. It never runs on the host.

The guest agent runs one call at a time and waits for it, so a component's
main command cannot be one long ``exec``: nothing else (``stockade exec``)
could reach the isolate while it runs. Instead ``launch`` starts a detached
relay process (``setsid``, double fork: the agent's call returns at once) that
runs the command with its standard streams on pipes, and the supervisor on the
host talks to the relay through files in ``DIRECTORY``, with the agent's
short ``list_dir``/``read_file``/``write_file`` calls. Each job (the main
command, each ``stockade exec``) has an id ``J``; names are atomic messages:

- ``J.o.N`` (relay to host): the command's output, N = 1, 2, ...: records of
  a tag (``o`` stdout, ``e`` stderr, ``x`` the end, JSON), a 4-byte big-endian
  length and the data. Written as ``J.t.N`` and renamed, so a listed file is whole;
- ``J.a.N`` (host): every output file up to N was read: the relay deletes
  them. Past ``MAX_UNACKED`` unread files it stops reading the command's
  pipes, and the command blocks on a full pipe: the isolate's disk never
  holds more than that;
- ``J.i.N.LEN`` (host): LEN bytes for the command's standard input, taken in
  the order of N once the file has all LEN bytes (``write_file`` is not
  atomic); ``J.i.N.eof`` closes it;
- ``J.k.M.SIG`` (host): send signal SIG to the command's process group.

Once the host has read the end record, the relay deletes the job's files and exits.
"""

from __future__ import annotations

import json
import os
import select
import struct
import subprocess
import sys
import time

READ_CHUNK = 65536
FILE_CAP = 1024 * 1024  # bytes of output in one file
MAX_UNACKED = 8  # output files written and not yet read by the host
MAX_STDIN_BUFFER = 1024 * 1024  # stdin taken from files and not yet read by the command
FLUSH_S = 0.02  # at most one output file this often: what comes sooner is gathered
DRAIN_S = 0.2  # after the command exits: how long a background process may keep its pipes
POLL_MIN_S, POLL_MAX_S = 0.01, 0.05  # looking for the host's files, when some are expected
IDLE_S = 1.0  # when none are (no stdin, output flowing)
FINAL_ACK_S = 3600.0  # how long the end record waits for the host


def launch(directory: str, job: str, argv: list[str], keep_stdin: bool) -> None:
    """Start the relay for ``argv`` and print ``{"pid": ...}`` or ``{"error": ...}`` (in the agent's runner)."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    # Two report pipes. In a microVM guest each fork closes, in the child, whatever descriptor
    # has the number the agent's seccomp listener had (guest.py's at-fork hook, which runners
    # inherit), and a new pipe may have that number: at most one of these four is it.
    pipes = [os.pipe(), os.pipe()]
    first = os.fork()
    if first == 0:
        report: list[int] = []
        try:
            report = [w for _, w in pipes if _open_fd(w)]  # before anything opened could take its number
            for r, _ in pipes:
                _close(r)
            os.setsid()
            if os.fork() != 0:
                os._exit(0)  # the relay is an orphan: the agent (pid 1) reaps it, and waits for none of it
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.close(null)
            try:
                child = subprocess.Popen(
                    argv,
                    stdin=subprocess.PIPE if keep_stdin else subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,  # its own process group, for the host's signals
                )
            except OSError as exc:
                _report(report, {"error": f"cannot execute {argv[0]!r}: {exc.strerror}"})
                os._exit(0)
            _report(report, {"pid": child.pid, "relay": os.getpid()})
            report = []
            Relay(directory, job, child).run()
        except BaseException as exc:  # noqa: BLE001 - said once, where the host reads it
            _report(report, {"lost": f"the relay failed: {type(exc).__name__}: {exc}"})
        finally:
            os._exit(0)
    for _, w in pipes:
        os.close(w)
    os.waitpid(first, 0)
    said = b""
    for r, _ in pipes:
        while True:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            said += chunk
        os.close(r)
    sys.stdout.write((said.decode() or '{"lost": "its relay process is gone before it reported"}') + "\n")
    sys.stdout.flush()


def _report(fds: list[int], message: dict[str, object]) -> None:
    """Say ``message`` on the first report pipe that takes it, and close them all."""
    data = json.dumps(message).encode()
    for fd in fds:
        try:
            if data:
                os.write(fd, data)
                data = b""
        except OSError:
            pass
        _close(fd)


def _open_fd(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class Relay:
    def __init__(self, directory: str, job: str, child: subprocess.Popen[bytes]) -> None:
        self.directory = directory
        self.job = job
        self.child = child
        self.pipes: dict[int, bytes] = {}
        for stream, tag in ((child.stdout, b"o"), (child.stderr, b"e")):
            if stream is not None:
                os.set_blocking(stream.fileno(), False)
                self.pipes[stream.fileno()] = tag
        self.stdin_fd: int | None = None
        if child.stdin is not None:
            self.stdin_fd = child.stdin.fileno()
            os.set_blocking(self.stdin_fd, False)
        self.stdin_buffer = bytearray()
        self.stdin_closing = False
        self.next_in = 1
        self.out = bytearray()
        self.written = 0  # output files written
        self.acked = 0
        self.flushed_at = 0.0
        self.poll = POLL_MIN_S
        self.scanned_at = 0.0

    def run(self) -> None:
        status: int | None = None
        drain_until: float | None = None
        while True:
            now = time.monotonic()
            if status is None:
                status = self.child.poll()
                if status is not None:
                    drain_until = now + DRAIN_S
            if status is not None and (not self.pipes or (drain_until is not None and now >= drain_until)):
                break
            activity = self._step(now, drain_until)
            if time.monotonic() - self.scanned_at >= POLL_MIN_S:  # not at every read of a chatty command
                self.scanned_at = time.monotonic()
                activity = self._take_host_files() or activity
            if self.out and (len(self.out) >= FILE_CAP or time.monotonic() - self.flushed_at >= FLUSH_S):
                self._flush()
            self.poll = POLL_MIN_S if activity else min(self.poll * 2, POLL_MAX_S)
        for fd in list(self.pipes):
            for _ in range(FILE_CAP // READ_CHUNK):  # what is left in the pipe (a background process may go on)
                if fd not in self.pipes or not self._read(fd):
                    break
                if len(self.out) >= FILE_CAP:
                    self._flush()
            if fd in self.pipes:
                os.close(fd)
        self.pipes.clear()
        self._close_stdin()
        self._record(b"x", json.dumps({"exit_code": status}).encode())
        self._flush()
        self._wait_for_host()

    def _step(self, now: float, drain_until: float | None) -> bool:
        """Wait for output, room in the command's stdin, or the time to look for the host's files."""
        paused = self.written - self.acked >= MAX_UNACKED
        reading = [] if paused else list(self.pipes)
        writing = [self.stdin_fd] if self.stdin_fd is not None and self.stdin_buffer else []
        expecting = paused or self.stdin_fd is not None
        timeout = self.poll if expecting else IDLE_S
        if self.out:
            timeout = min(timeout, max(0.0, self.flushed_at + FLUSH_S - now))
        if drain_until is not None:
            timeout = min(timeout, max(0.0, drain_until - now))
        elif self.child.returncode is None and not reading:
            timeout = min(timeout, POLL_MAX_S)  # nothing to wake on when the command exits
        try:
            readable, writable, _ = select.select(reading, writing, [], timeout)
        except InterruptedError:
            return True
        for fd in readable:
            self._read(fd)
        if writable:
            self._feed()
        return bool(readable or writable)

    def _read(self, fd: int) -> bool:
        """Read what ``fd`` has (closing it at its end); whether there was anything."""
        tag = self.pipes.get(fd)
        if tag is None:
            return False
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            os.close(fd)
            del self.pipes[fd]
            return False
        self._record(tag, data)
        return True

    def _record(self, tag: bytes, data: bytes) -> None:
        self.out += tag + struct.pack(">I", len(data)) + data

    def _flush(self) -> None:
        if not self.out:
            return
        self.written += 1
        name = f"{self.job}.o.{self.written}"
        tmp = os.path.join(self.directory, f"{self.job}.t.{self.written}")
        with open(tmp, "wb") as f:
            f.write(self.out)
        os.rename(tmp, os.path.join(self.directory, name))
        self.out.clear()
        self.flushed_at = time.monotonic()

    def _feed(self) -> None:
        if self.stdin_fd is None:
            return
        try:
            sent = os.write(self.stdin_fd, self.stdin_buffer)
        except BlockingIOError:
            return
        except OSError:  # it closed its stdin (EPIPE): what is left has nowhere to go
            self.stdin_buffer.clear()
            self._close_stdin()
            return
        del self.stdin_buffer[:sent]
        if not self.stdin_buffer and self.stdin_closing:
            self._close_stdin()

    def _close_stdin(self) -> None:
        if self.stdin_fd is not None:
            try:
                os.close(self.stdin_fd)
            except OSError:
                pass
            self.stdin_fd = None

    def _take_host_files(self) -> bool:
        """The host's acknowledgements, standard input and signals; True when there was any."""
        prefix = self.job + "."
        try:
            names = [n for n in os.listdir(self.directory) if n.startswith(prefix)]
        except OSError:
            return False
        took = False
        stdin: dict[int, str] = {}
        for name in names:
            parts = name[len(prefix) :].split(".")
            kind = parts[0]
            if kind == "a" and len(parts) == 2 and parts[1].isdigit():
                self._acknowledged(int(parts[1]))
                _unlink(self.directory, name)
                took = True
            elif kind == "k" and len(parts) == 3 and parts[2].isdigit():
                try:
                    os.killpg(self.child.pid, int(parts[2]))
                except (OSError, ValueError):
                    pass  # it has ended, or no such signal
                _unlink(self.directory, name)
                took = True
            elif kind == "i" and len(parts) == 3 and parts[1].isdigit():
                stdin[int(parts[1])] = name
        while self.next_in in stdin and len(self.stdin_buffer) < MAX_STDIN_BUFFER:
            name = stdin.pop(self.next_in)
            size = name.rsplit(".", 1)[1]
            path = os.path.join(self.directory, name)
            if size == "eof":
                self.stdin_closing = True
            else:
                try:
                    with open(path, "rb") as f:
                        data = f.read()
                except OSError:
                    break
                if not size.isdigit() or len(data) < int(size):
                    break  # still being written
                if self.stdin_fd is not None and not self.stdin_closing:
                    self.stdin_buffer += data
            _unlink(self.directory, name)
            self.next_in += 1
            took = True
        if took:
            self._feed()
            if self.stdin_closing and not self.stdin_buffer:
                self._close_stdin()
        return took

    def _acknowledged(self, upto: int) -> None:
        for n in range(self.acked + 1, min(upto, self.written) + 1):
            _unlink(self.directory, f"{self.job}.o.{n}")
        self.acked = max(self.acked, min(upto, self.written))

    def _wait_for_host(self) -> None:
        deadline = time.monotonic() + FINAL_ACK_S
        poll = POLL_MIN_S
        while self.acked < self.written and time.monotonic() < deadline:
            time.sleep(poll)
            poll = POLL_MIN_S if self._take_host_files() else min(poll * 2, 0.5)
        prefix = self.job + "."
        try:
            for name in os.listdir(self.directory):
                if name.startswith(prefix):
                    _unlink(self.directory, name)
        except OSError:
            pass


def _unlink(directory: str, name: str) -> None:
    try:
        os.unlink(os.path.join(directory, name))
    except OSError:
        pass


def source() -> str:
    """This module's source, for ``run_code``: the caller appends the call to ``launch``."""
    with open(__file__) as f:
        return f.read()
