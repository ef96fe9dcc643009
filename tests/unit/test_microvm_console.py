"""What QEMU writes for a microVM (the guest console, its stderr), read as it comes and kept bounded.

No VM is needed: the test writes where QEMU writes, into the console's FIFO
and the stderr pipe. tests/conformance/test_microvm.py floods a live VM's.
"""

from __future__ import annotations

import os
import stat

from stockade.runtimes.microvm.console import CONSOLE, LAST_WORDS, MAX_LINE, QemuOutput

OOM = b"[   12.345678] Out of memory: Killed process 321 (python3) total-vm:1024kB, anon-rss:512kB\r\n"


def test_oom_reports_are_counted_once_however_the_console_is_cut(tmp_path: os.PathLike[str]) -> None:
    output = QemuOutput(str(tmp_path))
    try:
        assert stat.S_ISFIFO(os.stat(os.path.join(str(tmp_path), CONSOLE)).st_mode)
        with open(os.path.join(str(tmp_path), CONSOLE), "ab", buffering=0) as console:  # as QEMU opens it
            console.write(OOM[:20])
            assert output.count_oom_kills() == 0  # half a line is no report yet
            console.write(OOM[20:] + b"noise\r\n" * 1000 + OOM)
            assert output.count_oom_kills() == 2
            # One inside a line longer than any report is dropped with it, and what
            # is kept of that line never grows past the bound.
            console.write(b"x" * (MAX_LINE * 4) + OOM)
            assert output.count_oom_kills() == 2 and len(output._lines._partial) <= MAX_LINE
            console.write(OOM)
            assert output.count_oom_kills() == 3
    finally:
        output.close()
    output.close()  # again: nothing to do
    assert output.count_oom_kills() == 3


def test_a_process_named_like_a_report_counts_no_kill(tmp_path: os.PathLike[str]) -> None:
    # Matched anywhere in a line, a process named "oom-kill:" made one kill count as three.
    output = QemuOutput(str(tmp_path))
    try:
        with open(os.path.join(str(tmp_path), CONSOLE), "ab", buffering=0) as console:
            console.write(
                b"[   12.3] oom-kill:constraint=CONSTRAINT_NONE,nodemask=(null),task=oom-kill:,pid=321,uid=1000\r\n"
                b"[   12.4] Out of memory: Killed process 321 (oom-kill:) total-vm:1024kB, anon-rss:512kB\r\n"
                b"[   12.5] Memory cgroup out of memory: Killed process 322 (Killed process) total-vm:1kB\r\n"
                b"[   12.6] a line that says Out of memory: Killed process 1 (x) in its middle\r\n"
                b"[   12.7] Out of memory (oom_kill_allocating_task): Killed process 323 (python3)\r\n"
            )
            assert output.count_oom_kills() == 3
    finally:
        output.close()


def test_last_words_are_the_ends_of_both(tmp_path: os.PathLike[str]) -> None:
    output = QemuOutput(str(tmp_path))
    try:
        assert output.last_words() == ""
        os.write(output.stderr_w, b"qemu-system-x86_64: " + b"e" * 5000 + b" could not open it\n")
        output.spawned()  # the parent's copy goes once QEMU has its own
        assert output.stderr_w == -1
        with open(os.path.join(str(tmp_path), CONSOLE), "ab", buffering=0) as console:
            for _ in range(100):
                console.write(b"k" * 10000)
            console.write(b"Kernel panic - not syncing\r\n")
        words = output.last_words()
        qemu, guest = words.split(" | ")
        assert qemu.startswith("QEMU: ") and qemu.endswith("could not open it") and len(qemu) <= LAST_WORDS + 6
        assert guest.startswith("console: ") and guest.endswith("not syncing") and len(guest) <= LAST_WORDS + 9
    finally:
        output.close()
    assert os.listdir(str(tmp_path)) == [CONSOLE]  # the FIFO: it holds nothing on the disk


def test_a_console_flood_is_read_at_a_rate_and_a_judgement_still_reads_it_all(tmp_path: os.PathLike[str]) -> None:
    # A guest's kernel taken over could write the console without end: every line is parsed in the
    # host's one drain thread, which serves every isolate's pipes. It is read at a rate, as gVisor's
    # log is; the count a run's judgement takes still reads everything written before it.
    import time

    from stockade.runtimes.microvm.console import OUTPUT_PER_S

    output = QemuOutput(str(tmp_path))
    try:
        fd = os.open(os.path.join(str(tmp_path), CONSOLE), os.O_WRONLY | os.O_NONBLOCK)
        try:
            written, deadline = 0, time.monotonic() + 1.0
            while time.monotonic() < deadline:  # a second of writing as fast as the pipe takes it
                try:
                    written += os.write(fd, b"\n" * 65536)
                except BlockingIOError:
                    time.sleep(0.01)
            assert written < 3 * OUTPUT_PER_S, written  # the drain held it to its rate (and a pipe's worth)
            assert output.count_oom_kills() == 0  # a judgement reads what the pipe holds, whatever the rate
            os.write(fd, b"\n" * 4096 + OOM)
            assert output.count_oom_kills() == 1
        finally:
            os.close(fd)
    finally:
        output.close()
