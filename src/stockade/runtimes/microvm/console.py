"""What QEMU writes for one VM, kept bounded: the guest's serial console and QEMU's own stderr.

The guest kernel's console is where the host learns of OOM kills inside the
guest (the host's cgroup holds only the emulator), and, with QEMU's stderr,
what a VM that failed said last. Both were files in the run directory:
the console grew with whatever the guest made its kernel print (code that
gets itself OOM-killed in a loop prints a line for each kill, for as long as
the sandbox lives), and the host read the whole file at every run. Now the
console is a FIFO that QEMU opens as its serial file, and its stderr a pipe;
the host's drain (runtimes/drain.py) reads both as they fill and keeps only
the last words of each and a count of the OOM kills. A guest whose kernel
prints faster than the host reads waits for it; nothing grows on the host.
"""

from __future__ import annotations

import contextlib
import os
import re

from ...errors import printable
from ..drain import Lines, Tail, drain

CONSOLE = "console.log"  # the FIFO in the run directory that QEMU's -serial file: writes to
LAST_WORDS = 400  # bytes of the console, and of QEMU's stderr, kept: the last ones
MAX_LINE = 4096  # a longer console line is dropped whole: no OOM report is that long
OUTPUT_PER_S = 256 << 10  # the console's, and QEMU's stderr's, bytes read a second (a boot writes a few KiB)
# One line per kill, at KERN_ERR (shown under `quiet`), matched from the line's start: the killed
# process's name comes after, so a program named "oom-kill:" or "Killed process" counts no kill.
_OOM = re.compile(
    rb"(?:\[[ 0-9.]*\] )?(?:Out of memory(?: \([a-z_]+\))?|Memory cgroup out of memory): Killed process \d+ "
)


class QemuOutput:
    """The read ends of one QEMU's console FIFO and stderr pipe, owned until ``close``."""

    def __init__(self, rundir: str, owner: int | None = None) -> None:
        path = os.path.join(rundir, CONSOLE)
        os.mkfifo(path, 0o600)
        if owner is not None:  # the host uid QEMU runs as (jail.py)
            os.chown(path, owner, owner)
        # Opened before QEMU starts, and without waiting for a writer, so that QEMU's
        # open of it does not wait for a reader.
        self.console_fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.stderr_fd, self.stderr_w = os.pipe2(os.O_CLOEXEC)
        except OSError:
            os.close(self.console_fd)
            raise
        self.oom_kills = 0  # seen on the console so far (cumulative, like a cgroup's counter)
        self._lines = Lines(MAX_LINE)
        self._console = Tail(LAST_WORDS)
        self._stderr = Tail(LAST_WORDS)
        self._closed = False
        # Each read at a rate, as gVisor's log is (drain.py): a guest's kernel taken over could
        # write the console without end, and every line read is parsed in the host's one drain
        # thread, which serves every isolate. Past the rate the guest waits; a judgement's
        # ``flush`` still reads all that was written before it.
        drain().watch(self.console_fd, self._read_console, per_s=OUTPUT_PER_S)
        drain().watch(self.stderr_fd, self._stderr.feed, per_s=OUTPUT_PER_S)

    def spawned(self) -> None:
        """QEMU has its copy of the stderr pipe: drop ours, so the pipe ends when QEMU does."""
        if self.stderr_w >= 0:
            os.close(self.stderr_w)
            self.stderr_w = -1

    def count_oom_kills(self) -> int:
        """The OOM kills the guest's kernel has reported so far, every line QEMU wrote before this call read."""
        if not self._closed:
            drain().flush(self.console_fd)
        return self.oom_kills

    def last_words(self) -> str:
        """The ends of QEMU's stderr and of the guest console ("" when both are empty)."""
        parts = []
        for name, fd, tail in (("QEMU", self.stderr_fd, self._stderr), ("console", self.console_fd, self._console)):
            if not self._closed:
                drain().flush(fd)
            # The guest writes the console (its root, any escape sequence): quoted as its words.
            text = printable(tail.text().replace("\r\n", "\n").strip())
            if text:
                parts.append(f"{name}: {text}")
        return " | ".join(parts)

    def close(self) -> None:
        """Stop reading and close every descriptor (after QEMU has exited). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.spawned()
        for fd in (self.console_fd, self.stderr_fd):
            with contextlib.suppress(OSError):
                drain().forget(fd)

    def _read_console(self, chunk: bytes) -> None:
        self._console.feed(chunk)
        for line in self._lines.feed(chunk):
            self.oom_kills += _OOM.match(line) is not None
