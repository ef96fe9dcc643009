"""The drain reads what an isolate's host program writes into pipes, keeping only bounded amounts."""

from __future__ import annotations

import os
import threading

from stockade.runtimes.drain import CUT, Drain, Lines, Tail


def test_lines_are_whole_across_chunks() -> None:
    lines = Lines(limit=100)
    assert lines.feed(b"one\ntw") == [b"one"]
    assert lines.feed(b"o") == []
    assert lines.feed(b"\nthree\n\nfour") == [b"two", b"three", b""]
    assert lines.feed(b"\n") == [b"four"]


def test_a_line_too_long_is_dropped_whole_and_the_next_ones_kept() -> None:
    lines = Lines(limit=10)
    assert lines.feed(b"short\n" + b"x" * 8) == [b"short"]
    # The long line goes on over several chunks: what is kept of it never grows past the limit.
    for _ in range(1000):
        assert lines.feed(b"y" * 1000) == []
        assert len(lines._partial) <= 10
    # Its end is dropped with it, even when it looks like a line of its own.
    assert lines.feed(b"fake X ptrace(\nafter\n") == [b"after"]
    assert lines.feed(b"z" * 11 + b"\nok\n") == [b"ok"]  # too long within one chunk


def test_a_line_too_long_can_be_kept_by_its_ends() -> None:
    # The Sentry's log: a record's call is named at its start, its return at its end.
    lines = Lines(limit=10, ends=3)
    assert lines.feed(b"short\nabc" + b"x" * 8) == [b"short"]
    for _ in range(1000):
        assert lines.feed(b"y" * 1000) == []
        assert len(lines._partial) <= 10
    assert lines.feed(b"yyXYZ\nnext\n") == [b"abc" + CUT + b"XYZ", b"next"]
    assert lines.feed(b"0123456789A\n") == [b"012" + CUT + b"89A"]  # too long within one chunk
    assert lines.feed(b"0123456789\n") == [b"0123456789"]  # at the limit: whole


def test_the_tail_keeps_the_last_bytes_only() -> None:
    tail = Tail(limit=8)
    for _ in range(1000):
        tail.feed(b"0123456789")
    tail.feed(b"END")
    assert tail.text() == "56789END"


def test_a_flood_through_the_drain_is_read_as_it_comes_and_kept_by_no_one() -> None:
    drain = Drain()
    r, w = os.pipe()
    seen = 0

    def consume(chunk: bytes) -> None:
        nonlocal seen
        seen += len(chunk)  # a consumer that keeps nothing: counts only

    drain.watch(r, consume)
    total = 64 << 20  # a thousand pipes' worth: the writer finishes only if the drain keeps reading
    block = b"x" * 65536
    for _ in range(total // len(block)):
        os.write(w, block)
    os.close(w)
    drain.flush(r)
    assert seen == total
    drain.forget(r)
    drain.forget(r)  # twice: nothing to do


def test_flush_consumes_what_was_written_before_it() -> None:
    drain = Drain()
    r, w = os.pipe()
    chunks: list[bytes] = []
    lock = threading.Lock()

    def consume(chunk: bytes) -> None:
        with lock:
            chunks.append(chunk)

    drain.watch(r, consume)
    for i in range(100):
        os.write(w, f"line {i}\n".encode())
        drain.flush(r)
        with lock:
            assert b"".join(chunks).endswith(f"line {i}\n".encode())  # in order, and all of it
    os.close(w)
    drain.forget(r)
    with lock:
        assert b"".join(chunks) == b"".join(f"line {i}\n".encode() for i in range(100))


def test_a_consumer_that_fails_does_not_stop_the_others() -> None:
    drain = Drain()
    bad_r, bad_w = os.pipe()
    good_r, good_w = os.pipe()
    failed, got = threading.Event(), threading.Event()

    def bad(chunk: bytes) -> None:
        failed.set()
        raise ValueError("a bug in one isolate's parser")

    drain.watch(bad_r, bad)
    drain.watch(good_r, lambda chunk: got.set())
    os.write(bad_w, b"first")
    assert failed.wait(30)
    os.write(good_w, b"second")  # only after the failure: the thread that read it must live on
    assert got.wait(30), "the drain's thread stopped with the failing consumer"
    for fd in (bad_w, good_w):
        os.close(fd)
    drain.forget(bad_r)
    drain.forget(good_r)


def test_a_pipe_read_at_a_rate_is_left_unread_past_it_and_its_writer_waits() -> None:
    # The Sentry's log: a flood of traced calls cost the drain's one thread a third of the CPU the
    # flood took. Read at a rate, the pipe fills, and its writer (the Sentry, the code with it) waits.
    import time

    drain = Drain()
    r, w = os.pipe()
    read = 0
    lock = threading.Lock()

    def consume(chunk: bytes) -> None:
        nonlocal read
        with lock:
            read += len(chunk)

    rate = 64 << 10
    started = time.monotonic()
    drain.watch(r, consume, per_s=rate)
    os.set_blocking(w, False)
    written = 0
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # a writer as fast as it can go for a second
        try:
            written += os.write(w, b"x" * 65536)
        except BlockingIOError:
            time.sleep(0.01)
    with lock:
        taken = read
    elapsed = time.monotonic() - started
    # At most a second's worth at once and the rate since (and the one read that went past it).
    assert taken <= rate + rate * elapsed + 65536, (taken, elapsed)
    assert written <= taken + (1 << 20), "the writer did not wait for the reader"  # what the pipe holds
    for _ in range(100):  # what is there is read when asked, past the rate
        drain.flush(r)
        with lock:
            if read == written:
                break
    assert read == written
    os.close(w)
    drain.forget(r)
