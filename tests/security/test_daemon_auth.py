"""Attacks on the daemon's front door: signatures, replays, rate limits, other users."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from stockade import cli_daemon
from stockade.client import AsyncClient, Client, DaemonBusyError, NotFoundError
from stockade.errors import UNPROVEN, AuthenticationError, RateLimitError
from stockade.protocol import auth
from tests.daemon_harness import TOKEN, Daemon, execute_in_background, raw_exchange, running_execution, start_daemon
from tests.helpers import processes_with_arg

T = TypeVar("T")

NOBODY = 65534


@pytest.fixture
def signed_daemon(process_runtime: str) -> Iterator[Daemon]:
    d = start_daemon({"STOCKADE_AUTH_TOKEN": TOKEN})
    yield d
    assert d.stop() == 0
    assert TOKEN not in d.logs(), "the token leaked into the daemon's log"


def _line(request: dict[str, object]) -> bytes:
    return json.dumps(request).encode() + b"\n"


def test_good_signature_is_accepted(signed_daemon: Daemon) -> None:
    with Client(signed_daemon.socket_path, auth_token=TOKEN) as c:
        assert c.ping() == "pong"
        assert c.execute(["echo", "signed"]).stdout == "signed\n"


def test_wrong_token_is_refused(signed_daemon: Daemon) -> None:
    with Client(signed_daemon.socket_path, auth_token="0" * 64) as c, pytest.raises(AuthenticationError) as info:
        c.ping()
    assert str(info.value) == (
        "Authentication failed: the daemon refused this signature (another token than its own, or a request too old)"
    )


def test_missing_hmac_is_refused(signed_daemon: Daemon) -> None:
    (reply,) = raw_exchange(signed_daemon.socket_path, b'{"method": "ping", "params": {}, "id": 1}\n')
    assert json.loads(reply)["error"] == "Authentication failed"


def test_seed_style_signature_without_freshness_is_refused(signed_daemon: Daemon) -> None:
    request: dict[str, object] = {"method": "ping", "params": {}, "id": 1}
    request["hmac"] = auth.compute_hmac(request, TOKEN)  # right key, but no ts/nonce: replayable forever
    (reply,) = raw_exchange(signed_daemon.socket_path, _line(request))
    assert json.loads(reply)["error"] == "Authentication failed"


def test_replayed_request_is_refused(signed_daemon: Daemon) -> None:
    signed = _line(auth.sign({"method": "ping", "params": {}, "id": 1}, TOKEN))
    first, second = raw_exchange(signed_daemon.socket_path, signed, signed)
    assert json.loads(first)["result"] == "pong"
    assert json.loads(second)["error"] == "Authentication failed"
    (again,) = raw_exchange(signed_daemon.socket_path, signed)  # on a new connection too
    assert json.loads(again)["error"] == "Authentication failed"


@pytest.mark.parametrize("skew", [-60.0, 60.0])
def test_expired_or_future_request_is_refused(signed_daemon: Daemon, skew: float) -> None:
    signed = auth.sign({"method": "ping", "params": {}, "id": 1}, TOKEN, now=time.time() + skew)
    (reply,) = raw_exchange(signed_daemon.socket_path, _line(signed))
    assert json.loads(reply)["error"] == "Authentication failed"


def test_tampered_request_is_refused(signed_daemon: Daemon) -> None:
    signed = auth.sign({"method": "execute", "params": {"command": ["echo", "a"]}, "id": 1}, TOKEN)
    signed["params"] = {"command": ["sh", "-c", "echo evil"]}
    (reply,) = raw_exchange(signed_daemon.socket_path, _line(signed))
    assert json.loads(reply)["error"] == "Authentication failed"


def test_a_uid_that_failed_authentication_has_its_large_requests_refused_unread(signed_daemon: Daemon) -> None:
    # Checking a signature decodes and re-encodes the whole request in the loop every caller
    # shares: a caller without the token sent 16 MiB lines of numbers and held it a second each.
    big = {"method": "execute", "params": {"command": ["true"], "stdin": "x" * 100_000}}
    (refused,) = raw_exchange(signed_daemon.socket_path, _line({**big, "id": 1}))
    assert json.loads(refused)["error"] == "Authentication failed"  # read in full: no failure before it
    small, unread = raw_exchange(
        signed_daemon.socket_path, b'{"method": "ping", "id": 2}\n', _line({**big, "id": 3, "hmac": "0" * 64})
    )
    assert json.loads(small)["error"] == "Authentication failed"
    answer = json.loads(unread)
    assert answer["error_code"] == "unproven" and answer["id"] is None
    assert "over 65536 bytes are refused unread" in answer["error"]
    # Signed, it is refused as the first request of a connection, served on one that carried a signed one.
    (first,) = raw_exchange(signed_daemon.socket_path, _line(auth.sign({**big, "id": 4}, TOKEN)))
    assert json.loads(first)["error_code"] == "unproven"
    ping, served = raw_exchange(
        signed_daemon.socket_path,
        _line(auth.sign({"method": "ping", "params": {}, "id": 5}, TOKEN)),
        _line(auth.sign({**big, "id": 6}, TOKEN)),
    )
    assert json.loads(ping)["result"] == "pong"
    assert json.loads(served)["result"]["exit_code"] == 0
    # The flood is one warning in the log, not one per request.
    assert signed_daemon.logs().count("authentication failed: uid=") == 1


def test_what_no_signed_client_sends_counts_as_a_failed_authentication(process_runtime: str) -> None:
    # A line that is JSON but no object, or an id of the wrong kind, was decoded in full each time.
    for line in (b"[" + b"1," * 40_000 + b"1]\n", _line({"method": "ping", "id": [0] * 40_000})):
        d = start_daemon({"STOCKADE_AUTH_TOKEN": TOKEN})
        try:
            (refused,) = raw_exchange(d.socket_path, line)
            assert json.loads(refused)["error_code"] == "invalid_request"
            (again,) = raw_exchange(d.socket_path, line)
            assert json.loads(again)["error_code"] == "unproven"
        finally:
            assert d.stop() == 0


def test_a_signed_client_of_a_uid_that_failed_authentication_is_served_all_the_same(
    signed_daemon: Daemon, tmp_path: Path
) -> None:
    # Another process of the same uid with a stale token must not cost the right one its large calls:
    # a call refused unread is sent again on a connection a signed ping proved.
    with Client(signed_daemon.socket_path, auth_token="0" * 64) as stale, pytest.raises(AuthenticationError):
        stale.ping()
    with Client(signed_daemon.socket_path, auth_token=TOKEN) as right:
        assert right.execute(["wc", "-c"], stdin=b"x" * 100_000).stdout.strip() == "100000"

    async def awaited() -> str:
        async with AsyncClient(signed_daemon.socket_path, auth_token=TOKEN) as client:
            return (await client.execute(["wc", "-c"], stdin=b"y" * 100_000)).stdout.strip()

    assert asyncio.run(awaited()) == "100000"
    token = tmp_path / "token"
    token.write_text(TOKEN)
    cli = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "stockade"), "run", "--socket", signed_daemon.socket_path,
         "--token-file", str(token), "--require-daemon", "--", "sh", "-c", 'echo ${#1}', "sh", "z" * 70_000],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert (cli.returncode, cli.stdout) == (0, "70000\n"), cli.stderr
    assert cli_daemon.UNPROVEN == UNPROVEN
    # Each was refused unread first, and sent again (refusals are said a line a window per uid).
    deadline = time.monotonic() + 60
    while (unproven := _refused(signed_daemon, "unproven")) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert unproven == 3, signed_daemon.logs()


def _refused(daemon: Daemon, code: str) -> int:
    """How many of ``code``'s refusals the daemon's log has told (``uid=N refused 3 auth, 2 unproven``)."""
    import re

    return sum(int(n) for n in re.findall(rf"[ ,](\d+) {code}\b", daemon.logs()))


def test_a_request_signed_before_the_daemon_started_is_refused(process_runtime: str) -> None:
    """The nonces a daemon has seen die with it: a signed request caught before a restart (from a
    listener put in its place, a log) ran again on the next daemon, within the freshness window."""
    # Signed two seconds before the start (a whole second's slack is taken for a coarse ts), and
    # well within the freshness window.
    caught = auth.signed_line({"method": "execute", "params": {"command": ["true"]}, "id": 1}, TOKEN,
                              now=time.time() - 2) + b"\n"  # fmt: skip
    d = start_daemon({"STOCKADE_AUTH_TOKEN": TOKEN})
    try:
        (answer,) = raw_exchange(d.socket_path, caught)
        assert json.loads(answer)["error"] == "Authentication failed"
        fresh = auth.signed_line({"method": "ping", "params": {}, "id": 2}, TOKEN) + b"\n"
        assert json.loads(raw_exchange(d.socket_path, fresh)[0])["result"] == "pong"
    finally:
        assert d.stop() == 0


def test_a_token_file_every_user_may_read_is_warned_of(process_runtime: str, tmp_path: Path) -> None:
    import tempfile

    reachable = Path(tempfile.mkdtemp(prefix="stockade-token-"))
    try:
        reachable.chmod(0o755)
        open_token, own_token, hidden_token = reachable / "open", reachable / "own", tmp_path / "hidden"
        for path, mode in ((open_token, 0o644), (own_token, 0o600), (hidden_token, 0o644)):
            path.write_text(TOKEN + "\n")
            path.chmod(mode)
        os.chmod(tmp_path, 0o700)  # (its file's mode says nothing: nobody else reaches it)
        for path, warned in ((open_token, True), (own_token, False), (hidden_token, False)):
            d = start_daemon(args=("--token-file", str(path)))
            try:
                assert Client(d.socket_path, token_file=str(path)).ping() == "pong"
                said = f"--token-file {path} is readable by every user on this host, who could sign requests"
                assert (said in d.logs()) == warned, d.logs()
            finally:
                assert d.stop() == 0
    finally:
        shutil.rmtree(reachable)  # outside pytest's own temporary directories: removed here


def test_the_start_bound_holds_for_one_window_and_takes_a_coarse_ts(monkeypatch: pytest.MonkeyPatch) -> None:
    # A client that stamps whole seconds signed in the daemon's first second was refused (and its
    # uid held to the unproven penalty); a wall clock stepped back after the start refused all.
    now = time.time()
    coarse = json.loads(auth.signed_line({"method": "ping", "id": 1}, TOKEN, now=math.floor(now)))
    assert auth.verify(coarse, TOKEN, auth.NonceCache(since=now))
    stepped_back = json.loads(auth.signed_line({"method": "ping", "id": 2}, TOKEN, now=now))
    nonces = auth.NonceCache(since=now + 120)  # as if the clock went back two minutes since the start
    assert not auth.verify(stepped_back, TOKEN, nonces)  # within the first window: a replay's look
    monkeypatch.setattr(nonces, "since_until", time.monotonic())  # one window later
    assert auth.verify(stepped_back, TOKEN, nonces)


def test_a_signed_request_verifies_once_whatever_its_spacing() -> None:
    line = auth.signed_line({"method": "execute", "params": {"code": "print(1)"}, "id": 7}, TOKEN)
    request = json.loads(line)
    # The MAC covers the canonical form: the same request re-serialized any way passes; replays do not.
    assert auth.verify(json.loads(json.dumps(request, indent=1)), TOKEN, auth.NonceCache())
    nonces = auth.NonceCache()
    assert auth.verify(request, TOKEN, nonces)
    assert not auth.verify(request, TOKEN, nonces)
    assert not auth.verify(request, "0" * 64, auth.NonceCache())


@pytest.mark.parametrize("ts", [10**400, -(10**400), 2**53 + 1])
def test_a_signed_timestamp_past_a_floats_range_is_refused_not_raised(ts: int) -> None:
    # abs(now - 10**400) raised OverflowError: the daemon dropped the connection with a traceback.
    request = {"method": "ping", "params": {}, "id": 5, "ts": ts, "nonce": "abcdefgh12345678"}
    request["hmac"] = auth.compute_hmac(request, TOKEN)
    assert auth.verify(request, TOKEN, auth.NonceCache()) is False


@pytest.mark.parametrize("token", ["", "k", TOKEN, "t" * 64, "long" * 40, "clé-ünïcode"])
def test_the_mac_is_hmac_sha256_as_the_seed_computes_it(token: str) -> None:
    # Keyed once and copied per message, it must still be exactly the seed's
    # hmac.new(token, json.dumps(request, sort_keys=True), sha256), for short
    # tokens, a 64-byte one and ones longer than the hash's block.
    import hashlib
    import hmac

    request = {"method": "execute", "params": {"code": "print('é')", "policy": {"b": 1, "a": [2]}}, "id": 3}
    seed = hmac.new(token.encode(), json.dumps(request, sort_keys=True).encode(), hashlib.sha256).hexdigest()
    assert auth.compute_hmac(request, token) == seed
    signed = json.loads(auth.signed_line(request, token))
    assert signed["hmac"] == hmac.new(
        token.encode(), json.dumps({k: v for k, v in signed.items() if k != "hmac"}, sort_keys=True).encode(),
        hashlib.sha256,
    ).hexdigest()  # fmt: skip


def test_nonces_never_repeat_not_even_across_a_fork() -> None:
    mine = [json.loads(auth.signed_line({"method": "ping", "id": i}, TOKEN))["nonce"] for i in range(1000)]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child signs too, from the same state of the nonce source
        os.close(read)
        nonce = json.loads(auth.signed_line({"method": "ping", "id": 0}, TOKEN))["nonce"]
        os.write(write, nonce.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        child = pipe.read().decode()
    os.waitpid(pid, 0)
    parent_next = json.loads(auth.signed_line({"method": "ping", "id": 0}, TOKEN))["nonce"]
    everything = [*mine, child, parent_next]
    assert len(set(everything)) == len(everything)
    assert all(len(n) == 32 for n in everything)  # 16 random bytes, hex


def test_tampered_signed_line_is_refused(signed_daemon: Daemon) -> None:
    line = auth.signed_line({"method": "execute", "params": {"command": ["echo", "a"]}, "id": 1}, TOKEN)
    ping = auth.signed_line({"method": "ping", "params": {}, "id": 1}, TOKEN)
    tampered = [
        line.replace(b'"echo", "a"', b'"echo", "b"'),
        # A member slipped in before the hmac: the signed bytes are no longer the body.
        line.replace(b', "hmac":', b', "method": "selftest", "hmac":'),
        # A real signature, of another request, grafted on.
        line[: line.index(b', "hmac":')] + ping[ping.index(b', "hmac":') :],
    ]
    replies = raw_exchange(signed_daemon.socket_path, *[t + b"\n" for t in tampered])
    assert [json.loads(r)["error"] for r in replies] == ["Authentication failed"] * 3
    (good,) = raw_exchange(signed_daemon.socket_path, line + b"\n")
    assert json.loads(good)["result"]["stdout"] == "a\n"


def test_error_replies_never_contain_the_token(signed_daemon: Daemon) -> None:
    replies = raw_exchange(
        signed_daemon.socket_path,
        _line({"method": "ping", "params": {"token": "x"}, "id": 1, "hmac": "00"}),
        _line(auth.sign({"method": "execute", "params": {"command": 5}, "id": 2}, TOKEN)),
        b"{bad\n",
    )
    assert all(TOKEN.encode() not in r for r in replies)


def test_nonce_cache_is_bounded() -> None:
    cache = auth.NonceCache(window_s=30, max_entries=3)
    for i in range(10):
        assert cache.add(f"nonce-{i:04d}", now=1000.0)
    assert len(cache._seen) <= 3


def test_nonce_cache_forgets_only_what_its_window_no_longer_accepts() -> None:
    cache = auth.NonceCache(window_s=30)
    assert cache.add("a" * 16, now=1000.0)
    for later in (1000.5, 1030.0, 1059.9):  # refused for twice the window, across sweeps
        assert not cache.add("a" * 16, now=later)
    assert cache.add("b" * 16, now=1061.0)  # a sweep is due: "a" is 61 s old
    assert "a" * 16 not in cache._seen and not cache.add("b" * 16, now=1061.5)


def _in_one_window(burst: Callable[[], T]) -> T:
    """``burst``'s answers, once it took under a second: its requests all in one window of the
    limit's, which a loaded host spreading them over more would not show (then tried again)."""
    for _ in range(5):
        began = time.monotonic()
        answers = burst()
        if time.monotonic() - began < 1:
            return answers
        time.sleep(1.1)  # its window has passed
    raise AssertionError("no burst went out within a second in five tries")


def test_rate_limit_is_exact_at_the_boundary(process_runtime: str) -> None:
    d = start_daemon({"STOCKADE_MAX_REQUESTS": "5"})
    try:
        ping = b'{"method": "ping", "params": {}, "id": 1}\n'
        replies = _in_one_window(lambda: [json.loads(r) for r in raw_exchange(d.socket_path, *[ping] * 6)])
        assert [r["result"] for r in replies[:5]] == ["pong"] * 5
        assert replies[5]["error"] == "Rate limit exceeded"
        time.sleep(1.1)  # the sliding window has moved on
        assert json.loads(raw_exchange(d.socket_path, ping)[0])["result"] == "pong"
    finally:
        assert d.stop() == 0


def test_lines_that_are_no_request_are_rate_limited_and_said_in_the_log_now_and_then(process_runtime: str) -> None:
    """A line that was not JSON (or no object) was refused before the rate limit, each parsed and
    each a line of the log: a peer without the token kept a core busy and wrote 110,000 log lines
    in 5 s. Now every line counts against its uid's rate first, and refusals are a log line a
    window per uid."""
    d = start_daemon({"STOCKADE_MAX_REQUESTS": "5"})
    try:
        garbage = [b"x\n", b"[0, 0, 0]\n", b'{"id": 1.5}\n'] * 20
        replies = _in_one_window(lambda: [json.loads(r) for r in raw_exchange(d.socket_path, *garbage)])
        assert [r["error_code"] for r in replies[:5]] == ["invalid_request"] * 5
        assert {(r["error"], r["id"]) for r in replies[5:]} == {("Rate limit exceeded", None)}
        assert replies[2]["error"] == "Invalid request: id must be an integer, a string or null"
        deadline = time.monotonic() + 30  # the answers' log lines are written a moment after them
        while not (said := [line for line in d.logs().splitlines() if "refused" in line]):
            assert time.monotonic() < deadline, d.logs()
            time.sleep(0.05)
        assert len(said) == 1 and f"uid={os.getuid()} refused 1 invalid_request" in said[0], said
    finally:
        assert d.stop() == 0


def test_lines_over_the_size_limit_count_against_the_rate_too(process_runtime: str) -> None:
    # Refused unread, they skipped the limiter: a peer could have the daemon read them without end.
    d = start_daemon({"STOCKADE_MAX_REQUESTS": "5", "STOCKADE_MAX_REQUEST_BYTES": "4096"})
    try:
        oversized = [b"x" * 5000 + b"\n"] * 8
        replies = _in_one_window(lambda: [json.loads(r) for r in raw_exchange(d.socket_path, *oversized)])
        assert [r["error"] for r in replies[:5]] == ["Request too large: over 4096 bytes"] * 5
        assert {(r["error"], r["error_code"]) for r in replies[5:]} == {("Rate limit exceeded", "rate_limit")}
    finally:
        assert d.stop() == 0


def test_rate_limit_counts_per_uid_across_connections(process_runtime: str) -> None:
    d = start_daemon({"STOCKADE_MAX_REQUESTS": "4"})
    try:
        a, b = Client(d.socket_path), Client(d.socket_path)

        def burst() -> list[object]:
            answers: list[object] = []
            for client in (a, b, a, b, a):
                try:
                    answers.append(client.ping())
                except RateLimitError as exc:
                    answers.append(exc)
            return answers

        answers = _in_one_window(burst)
        assert answers[:4] == ["pong"] * 4 and isinstance(answers[4], RateLimitError), answers
        a.close()
        b.close()
    finally:
        assert d.stop() == 0


PEER_PROBE = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(json.dumps({"connect": e.strerror})); raise SystemExit
s.settimeout(5)
f = s.makefile("rb")
first = f.readline()
sent = b""
try:
    s.sendall(json.dumps({"method": sys.argv[2], "params": json.loads(sys.argv[3]), "id": 1}).encode() + b"\n")
    sent = f.readline()
except OSError:
    pass
print(json.dumps({"first": first.decode(), "reply": sent.decode()}))
"""


def _as_nobody(socket_path: str, method: str = "ping", params: str = "{}", unsolicited: bool = True) -> dict[str, str]:
    probe = PEER_PROBE if unsolicited else PEER_PROBE.replace("first = f.readline()", 'first = b""')
    out = subprocess.run(
        ["/usr/bin/python3", "-c", probe, socket_path, method, params],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, str] = json.loads(out.stdout)
    return result


@pytest.fixture
def needs_root() -> None:
    if os.getuid() != 0:
        pytest.skip("switching to another uid needs root")


def _open_socket_dir(d: Daemon) -> None:
    os.chmod(os.path.dirname(d.socket_path), 0o755)


def test_peer_with_another_uid_is_refused_before_any_request(process_runtime: str, needs_root: None) -> None:
    d = start_daemon({"STOCKADE_ALLOWED_UIDS": "0", "STOCKADE_SOCKET_PERMS": "0666"})
    try:
        _open_socket_dir(d)
        seen = _as_nobody(d.socket_path)
        assert "Permission denied: uid 65534" in seen["first"]
        assert seen["reply"] == ""  # the connection was closed: no request was ever read
        assert re.search(r"uid=65534 refused 1 peer \(not allowed\) \(lately pid \d+\)", d.logs()), d.logs()
        assert Client(d.socket_path).ping() == "pong"  # root is still served
        assert "lets every user" not in d.logs()  # its peers are held to a list: nothing to warn of
    finally:
        assert d.stop() == 0


def test_an_isolates_uid_is_never_served(process_runtime: str, needs_root: None) -> None:
    """Code in an isolate that reached the daemon's socket (a shared path that holds it) was a caller
    of its own: each isolate its own uid, its own sandbox quota, rate and connections."""
    d = start_daemon({"STOCKADE_SOCKET_PERMS": "0666", "STOCKADE_AUTH_TOKEN": ""})
    try:
        _open_socket_dir(d)
        isolate_uid = 1879048192 + 77  # in STOCKADE_SANDBOX_UIDS's default range
        out = subprocess.run(
            ["/usr/bin/python3", "-c", PEER_PROBE, d.socket_path, "ping", "{}"],
            user=isolate_uid, group=isolate_uid, extra_groups=[], capture_output=True, text=True, timeout=30, cwd="/",
        )  # fmt: skip
        seen = json.loads(out.stdout)
        assert f"Permission denied: uid {isolate_uid}" in seen["first"] and seen["reply"] == "", seen
        assert '"pong"' in _as_nobody(d.socket_path, unsolicited=False)["reply"]  # another user is served as before
    finally:
        assert d.stop() == 0


def test_socket_mode_keeps_other_users_out(process_runtime: str, needs_root: None) -> None:
    d = start_daemon()  # default 0600
    try:
        _open_socket_dir(d)
        assert _as_nobody(d.socket_path)["connect"] == "Permission denied"
    finally:
        assert d.stop() == 0


def test_another_users_sandbox_is_invisible(process_runtime: str, needs_root: None) -> None:
    d = start_daemon({"STOCKADE_SOCKET_PERMS": "0666"})
    try:
        _open_socket_dir(d)
        with Client(d.socket_path) as root_client:
            sid = root_client.create_sandbox(keep=True)
            seen = _as_nobody(d.socket_path, "sandbox.exec", json.dumps({"sandbox_id": sid, "command": ["id"]}), False)
            reply = json.loads(seen["reply"])
            assert reply["error_code"] == "not_found" and reply["result"] is None
            # Nor does status show it to another uid: only how many run, not whose or what.
            status = json.loads(_as_nobody(d.socket_path, "status", "{}", False)["reply"])["result"]
            assert status["active_sandboxes"] == [] and status["total_count"] == 1
            assert [s["sandbox_id"] for s in root_client.status()["active_sandboxes"]] == [sid]
            # Its own it sees, and root sees everyone's.
            made = json.loads(_as_nobody(d.socket_path, "sandbox.create", '{"keep": true}', False)["reply"])
            theirs = made["result"]["sandbox_id"]
            mine = json.loads(_as_nobody(d.socket_path, "status", "{}", False)["reply"])["result"]
            assert [s["sandbox_id"] for s in mine["active_sandboxes"]] == [theirs] and mine["total_count"] == 2
            assert {s["sandbox_id"] for s in root_client.status()["active_sandboxes"]} == {sid, theirs}
            root_client.close_sandbox(theirs)
            root_client.close_sandbox(sid)
            with pytest.raises(NotFoundError):
                root_client.close_sandbox(sid)
        # Allowed, for a daemon every local user shares; said at the start, as it may be a mistake.
        assert "lets every user of this host run code through it" in d.logs()
    finally:
        assert d.stop() == 0


def test_a_signed_request_carries_the_current_time_in_milliseconds() -> None:
    import time

    before = time.time()
    ts = json.loads(auth.signed_line({"method": "ping", "id": 1}, TOKEN))["ts"]
    assert isinstance(ts, float) and round(ts, 3) == ts
    assert before - 0.001 <= ts <= time.time()


def test_daemon_command_signs_with_the_token_file_and_fails_without_it(signed_daemon: Daemon, tmp_path: Path) -> None:
    good, wrong = tmp_path / "token", tmp_path / "wrong"
    good.write_text(TOKEN + "\n")
    wrong.write_text("0" * 64 + "\n")
    env = {k: v for k, v in os.environ.items() if k != "STOCKADE_AUTH_TOKEN"}

    def ping(*extra: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "stockade.cli", "daemon", "ping", "--socket", signed_daemon.socket_path, *extra]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)

    assert ping("--token-file", str(good)).returncode == 0
    for refused in (ping("--token-file", str(wrong)), ping()):
        assert refused.returncode == 125 and "Authentication failed" in refused.stderr, refused
    missing = ping("--token-file", str(tmp_path / "none"))
    assert missing.returncode == 125 and "--token-file" in missing.stderr


def test_one_uid_cannot_take_every_slot(process_runtime: str, needs_root: None) -> None:
    d = start_daemon(
        {
            "STOCKADE_MAX_SANDBOXES": "3",
            "STOCKADE_MAX_SANDBOXES_PER_UID": "2",
            "STOCKADE_QUEUE_LIMIT": "4",
            "STOCKADE_SOCKET_PERMS": "0666",
        }
    )
    try:
        _open_socket_dir(d)
        with Client(d.socket_path) as c:
            held = [c.create_sandbox(), c.create_sandbox()]
            with pytest.raises(DaemonBusyError, match=r"uid 0 already has 2 sandboxes .*MAX_SANDBOXES_PER_UID"):
                c.create_sandbox()
            with pytest.raises(DaemonBusyError, match="MAX_SANDBOXES_PER_UID"):
                c.execute(["true"])  # refused at once, not queued behind its own sandboxes
            # Another uid still gets the slot that is left.
            seen = _as_nobody(d.socket_path, "execute", '{"command": ["echo", "mine"]}', unsolicited=False)
            reply = json.loads(seen["reply"])
            assert reply["error"] is None and reply["result"]["stdout"] == "mine\n", reply
            c.close_sandbox(held[0])
            assert c.execute(["true"]).success  # a slot of its share is free again
            status = c.status()
            assert status["max_sandboxes_per_uid"] == 2 and status["total_count"] == 1
    finally:
        assert d.stop() == 0


def test_another_uid_cannot_cancel_a_run(process_runtime: str, needs_root: None) -> None:
    d = start_daemon({"STOCKADE_SOCKET_PERMS": "0666"})
    try:
        _open_socket_dir(d)
        # Listed in status before its isolate has started; cancelled then, it would be
        # refused ("before it started") rather than killed: wait for the command itself.
        marker = "4246.125"
        runner, results = execute_in_background(d.socket_path, ["sh", "-c", f"sleep {marker}"])
        execution_id = running_execution(d.socket_path, ready=lambda: bool(processes_with_arg(marker)))
        with Client(d.socket_path) as c:
            seen = _as_nobody(d.socket_path, "execute.cancel", json.dumps({"execution_id": execution_id}), False)
            reply = json.loads(seen["reply"])
            assert reply["error_code"] == "not_found" and execution_id in reply["error"], reply  # as if missing
            assert [s["execution_id"] for s in c.status()["active_sandboxes"]] == [execution_id]  # still running
            c.cancel_execution(execution_id)  # its owner can
        runner.join(30)
        assert len(results) == 1 and getattr(results[0], "termination_reason", None) == "killed"
    finally:
        assert d.stop() == 0


def test_token_files_on_both_sides_may_end_in_a_newline(process_runtime: str, tmp_path: object) -> None:
    from stockade.client import Client
    from stockade.errors import AuthenticationError

    path = os.path.join(str(tmp_path), "token")
    with open(path, "w") as f:
        f.write(TOKEN + "\n")  # as `stockade token new --file` writes it
    d = start_daemon(args=("--token-file", path))
    with Client(d.socket_path, token_file=path) as c:
        assert c.execute(["echo", "signed"]).stdout == "signed\n"
    with Client(d.socket_path) as unsigned, pytest.raises(AuthenticationError):
        unsigned.ping()
    with pytest.raises(AuthenticationError, match="cannot read the token file"):
        Client(d.socket_path, token_file=os.path.join(str(tmp_path), "missing"))
    assert d.stop() == 0
    assert TOKEN not in d.logs()


def test_a_token_file_stands_over_an_env_files_placeholder(process_runtime: str, tmp_path: Path) -> None:
    # An env file kept from before (its placeholder in place) beside the unit's --token-file: the
    # flag's token is the daemon's, and the placeholder is never read.
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    placeholder = {"STOCKADE_AUTH_TOKEN": "<token-from-/etc/stockade/token>"}
    d = start_daemon(placeholder, args=("--token-file", str(token_file)))
    try:
        with Client(d.socket_path, auth_token=TOKEN) as c:
            assert c.ping() == "pong"
    finally:
        assert d.stop() == 0, d.logs()
