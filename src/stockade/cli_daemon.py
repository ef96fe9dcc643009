"""``stockade run`` and ``exec-code`` at the least cost: their flags, and the run through a daemon.

Why this module exists: the CLI's start-up cost. The full command line builds
the Policy's flags with argparse from the Policy's fields, and the daemon's
``Client`` builds each request as a pydantic model, ~100 ms of imports before
anything runs. A run through a daemon needs neither: the daemon validates the
request itself.
So ``run`` and ``exec-code`` read their flags from ``FLAGS`` (the same flags,
checked against the model by tests/integration/test_cli_daemon.py), and
``via_daemon`` builds the ``execute`` request with the standard library, sends
it with the Client's framing (one JSON line; signed by ``protocol.auth`` when
there is a token), writes the output as it streams in and takes the exit status
from the answer's JSON. pydantic is imported only where an ``ExecResult`` must
be built: ``--json``, the summary line of a run that did not just complete, and
the CLI's wording of a policy the daemon refused. Everything here is the
standard library's: the JSON goes through ``agent.jsoncodec`` (``json``'s C
accelerator, as the agent uses it) and the socket is ``_socket`` (``socket.py``
builds its enums at import, ~1.5 ms).

Where the run goes: ``--socket PATH`` names the daemon to use, and a run that
cannot reach it fails (exit 125), as an explicit request should. ``$STOCKADE_SOCKET``
is a preference: when nothing answers there, one line on stderr says so and the
run stays in this process, unless ``--require-daemon`` forbids that.
``--require-daemon`` alone uses the daemon's default socket (``stockade serve``'s).
A run that reached its daemon never falls back: once the request is sent, the
command may have run.
"""

from __future__ import annotations

import _socket
import binascii
import errno
import math
import os
import sys
import time

from .agent import jsoncodec
from .cli import MAX_STDIN, _daemon_token
from .cli_outcome import exit_status, fail, stream
from .daemon_peer import connect, impostor

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

# The Policy's flags as (field, flag, type, choices, repeated): what cli._policy_flags
# reads off the model (tests/integration/test_cli_daemon.py checks that the two agree).
# A flag missing here still works, more slowly: parse() leaves it to argparse, whose
# namespace names the model's fields (``policy_fields``), so no value is dropped.
FLAGS: tuple[tuple[str, str, type, tuple[str, ...] | None, bool], ...] = (
    ("runtime", "--runtime", str, None, False),
    ("isolation", "--isolation", str, ("none", "process", "gvisor", "microvm"), False),
    ("trust", "--trust", str, ("trusted", "verified", "untrusted"), False),
    ("timeout_seconds", "--timeout", float, None, False),
    ("memory_mb", "--memory", int, None, False),
    ("cpu_limit", "--cpu", float, None, False),
    ("pids_limit", "--pids", int, None, False),
    ("max_output_bytes", "--max-output", int, None, False),
    ("max_file_size_bytes", "--max-file-size", int, None, False),
    ("cpu_time_seconds", "--cpu-time", int, None, False),
    ("address_space_mb", "--address-space", int, None, False),
    ("max_open_files", "--max-open-files", int, None, False),
    ("disk_mb", "--disk", int, None, False),
    ("network_policy", "--network", str, ("none", "loopback", "allowlist"), False),
    ("allowed_hosts", "--allow-host", str, None, True),
    ("allowed_cidrs", "--allow-cidr", str, None, True),
    ("secrets", "--secret", str, None, True),
    ("filesystem_access", "--mount", str, None, True),
    ("environment", "--env", str, None, True),
    ("on_violation", "--on-violation", str, ("deny", "kill"), False),
    ("max_violations", "--max-violations", int, None, False),
    ("environment_name", "--python-env", str, None, False),
    ("packages", "--package", str, None, True),
    ("environment_id", "--python-env-id", str, None, False),
)
POLICY_FIELDS = tuple(f[0] for f in FLAGS)
DEFAULT_TIMEOUT_S = 30.0  # Policy.timeout_seconds's default: bounds the wait for an answer
CLIENT_TIMEOUT_S = 30.0  # what the Client adds to the run's timeout (its own default timeout)
UNAVAILABLE = "unavailable"  # --json's code where the daemon could not be reached or answer (errors.py's)
# A connect's errors that say no daemon is there (no socket, a dead one's, one not ours to use): the
# run goes on in-process. Any other (a full backlog past the wait) says one is, and ends the command.
NO_DAEMON = frozenset({errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR, errno.ENOTSOCK, errno.EACCES, errno.EPERM})
LINE_LIMIT = 64 << 20  # the longest line of an answer: the SDK client's (client/answers.py; a test holds them equal)
_MSG_ID = 1
UNPROVEN = "unproven"  # errors.UNPROVEN (not imported: errors is not needed on the lean path)

# The other options of run and exec-code: flag -> (dest, type; None for a switch).
_COMMON: dict[str, tuple[str, type | None]] = {
    "--policy-file": ("policy_file", str),
    "--json": ("json", None),
    "--socket": ("socket", str),
    "--token-file": ("token_file", str),
    "--require-daemon": ("require_daemon", None),
}
_EXEC_CODE: dict[str, tuple[str, type | None]] = {"--language": ("language", str), "--file": ("file", str)}
_CHOICES = {f[1]: f[3] for f in FLAGS if f[3]} | {"--language": ("python", "bash")}


class Args:
    """What the command line says, with the attributes argparse's namespace has."""

    factory: Any = None

    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)


def parse(argv: list[str]) -> Args | None:
    """``run``/``exec-code`` arguments as the full parser reads them, without building it
    (argparse and the Policy); None for anything unusual (``--help``, an error, an abbreviation,
    a value that starts with ``-``), which the full parser then reads, with its messages."""
    command, words = argv[0], argv[1:]
    options: dict[str, tuple[str, type | None]] = dict(_COMMON)
    if command == "exec-code":
        options.update(_EXEC_CODE)
    flags = {f[1]: f for f in FLAGS}
    values: dict[str, Any] = {name: None for name in POLICY_FIELDS}
    values["policy_fields"] = POLICY_FIELDS
    values.update({"environment": [], "filesystem_access": [], "packages": [], "json": False, "require_daemon": False})
    values.update({"allowed_hosts": [], "allowed_cidrs": [], "secrets": []})
    values.update({"policy_file": None, "socket": None, "token_file": None})
    if command == "run":
        values["command"] = []
    else:
        values.update({"language": "python", "file": None, "code": None})
    i = 0
    while i < len(words):
        word = words[i]
        if command == "run" and (word == "--" or not word.startswith("-")):
            values["command"] = words[i:]  # argparse's REMAINDER: the rest, "--" included
            break
        if word == "-f":
            word = "--file"
        elif not word.startswith("--") or word == "--":
            if (word.startswith("-") and word != "-") or values.get("code") is not None:
                return None
            values["code"] = word  # exec-code's one positional
            i += 1
            continue
        name, eq, value = word.partition("=")
        field = flags.get(name)
        dest, kind = (field[0], field[2]) if field else options.get(name, ("", None))
        if not dest:
            return None
        if kind is None:  # a switch
            if eq:
                return None
            values[dest] = True
            i += 1
            continue
        if not eq:
            if i + 1 >= len(words) or words[i + 1].startswith("-"):
                return None
            value = words[i + 1]
        i += 1 if eq else 2
        try:
            converted = kind(value)
        except ValueError:
            return None
        if name in _CHOICES and converted not in _CHOICES[name]:
            return None
        if field is not None and field[4]:
            values[dest].append(converted)
        else:
            values[dest] = converted
    return Args(**values)


def _policy_file(path: str) -> dict[str, Any]:
    """``--policy-file``'s fields; an unreadable or malformed file ends the CLI, naming the flag."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            loaded = json.load(f)
    except OSError as exc:
        raise SystemExit(fail(f"--policy-file {path}: {exc.strerror or exc}")) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise SystemExit(fail(f"--policy-file {path}: not JSON: {exc}")) from None
    if not isinstance(loaded, dict):
        raise SystemExit(fail(f"--policy-file {path}: expected a JSON object of Policy fields"))
    return loaded


def policy_fields(args: Any) -> dict[str, Any]:
    """The Policy's fields as the flags and ``--policy-file`` give them, not validated
    (``cli._build_policy`` validates them here; the daemon, when it runs the command).
    ``args.policy_fields`` names the Policy's fields among the parser's destinations."""
    fields: dict[str, Any] = {}
    if args.policy_file == "":
        raise SystemExit(fail("--policy-file: give the path of a JSON file of Policy fields (it was empty)"))
    if args.policy_file:
        fields.update(_policy_file(args.policy_file))
    env = dict(fields.get("environment") or {})
    for item in args.environment:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(fail(f"--env {item!r}: expected K=V"))
        env[key] = value
    for name in args.policy_fields:
        value = getattr(args, name, None)  # start has no --timeout, no --max-output
        if value is not None and value != [] and name not in ("environment", "filesystem_access"):
            fields[name] = value
    if env:
        fields["environment"] = env
    if args.filesystem_access:
        fields["filesystem_access"] = list(fields.get("filesystem_access") or []) + args.filesystem_access
    return fields


def daemon_socket(args: Any) -> tuple[str | None, str | None]:
    """Where to send the run, and the flag that makes the daemon required (None: it may
    run in-process instead): ``--socket``, else ``$STOCKADE_SOCKET``, else with
    ``--require-daemon`` the daemon's default socket, else nowhere."""
    if args.socket == "":
        raise SystemExit(fail("--socket: give the daemon's socket path (it was empty)"))
    if args.socket:
        return args.socket, "--socket"
    required = "--require-daemon" if args.require_daemon else None
    path = os.environ.get("STOCKADE_SOCKET")
    if not path and required:
        from .paths import default_socket_path

        path = default_socket_path()
    return path or None, required


def via_daemon(args: Any, call: str, produce: Callable[[], tuple[Any, bytes]]) -> int | None:
    """Run through the daemon: the exit status, or None to run in-process (no daemon
    given, or none answers and none is required). ``produce`` gives the payload and
    standard input, and is called only once a daemon answered the connection."""
    path, required = daemon_socket(args)
    if path is None:
        return None
    try:
        token = _daemon_token(args)
        fields = policy_fields(args)
    except (OSError, ValueError) as exc:
        return fail(str(exc))
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        try:
            connect(sock, path, CLIENT_TIMEOUT_S)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if required:
                return fail(
                    f"cannot reach the stockade daemon at {path}: {reason} ({required}: not running in-process)",
                    UNAVAILABLE,
                )
            if exc.errno not in NO_DAEMON:  # one is there, and did not take the connection in time
                return fail(f"the stockade daemon at {path} did not take the connection: {reason} (not running "
                            "in-process: a daemon is there)", UNAVAILABLE)  # fmt: skip
            print(f"stockade: no daemon answers on {path} ({reason}); running in-process", file=sys.stderr)
            return None
        sock.settimeout(CLIENT_TIMEOUT_S)
        try:
            why = impostor(sock, path, os.environ.get("STOCKADE_DAEMON_USER"))
        except OSError as exc:
            return fail(f"the stockade daemon at {path} did not take the connection: {exc.strerror}", UNAVAILABLE)
        if why is not None:
            return fail(f"refused to talk to {why}", UNAVAILABLE)
        payload, stdin = produce()
        return _exchange(args, sock, _request(call, payload, stdin, fields, streamed=not args.json), token, fields)
    finally:
        sock.close()


def _request(call: str, payload: Any, stdin: bytes, fields: dict[str, Any], streamed: bool) -> dict[str, Any]:
    """The ``execute`` request the Client sends for the same run (its params validate to
    the same ``ExecuteRequest``; defaults are left to the daemon)."""
    params: dict[str, Any] = {"command": list(payload)} if call == "exec" else {"code": payload[1]}
    if call != "exec":
        params["language"] = payload[0]
        if len(payload[1]) > MAX_STDIN // 4:  # maybe over a call's limit: refused before it is sent, as by the Client
            from .errors import StockadeError
            from .limits import check_call_size

            try:
                check_call_size("code", payload[1])
            except StockadeError as exc:
                raise SystemExit(fail(str(exc))) from None
    if fields:
        params["policy"] = fields
    if stdin:
        params["stdin_b64"] = binascii.b2a_base64(stdin, newline=False).decode()
    if streamed:
        params["stream"] = True
    return {"method": "execute", "params": params, "id": _MSG_ID}


def _exchange(args: Any, sock: Any, request: dict[str, Any], token: str | None, fields: dict[str, Any]) -> int:
    """Send the request, stream the output to this process's own, and report the answer."""
    timeout = fields.get("timeout_seconds", DEFAULT_TIMEOUT_S)
    if not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or not 0 < timeout <= 1e6:
        # The daemon would refuse it too (at most 600 s); refused here, as the in-process run words it,
        # before a wait that is not a number of seconds is set.
        said = _policy_error(args) or f"invalid policy: --timeout {timeout!r} is not a number of seconds"
        return fail(said, "policy")
    wait = timeout + CLIENT_TIMEOUT_S
    if token:
        from .protocol import auth

        line = auth.signed_line(request, token) + b"\n"
    else:
        line = jsoncodec.dumps(request).encode() + b"\n"
    reader = _Lines(sock, wait)
    try:
        sock.settimeout(wait)
        try:
            sock.sendall(line)
        except (BrokenPipeError, ConnectionResetError) as exc:
            # Refused and hung up on before the request went out: the reason may be waiting.
            try:
                refusal = _answer(reader.next())
            except (OSError, EOFError, _InvalidAnswer):
                refusal = None
            if refusal is None or refusal.get("error") is None:
                return fail(f"lost the connection to the stockade daemon: {exc}", UNAVAILABLE)
            return _report(args, refusal, signed=bool(token))
        stream_error: Exception | None = None
        while True:
            answer = _answer(reader.next())
            if answer.get("error_code") == UNPROVEN and token and line:
                # Refused unread (a process of this uid failed authentication lately): a signed
                # ping proves the connection, and the request goes again, signed afresh, once.
                sock.sendall(auth.signed_line({"method": "ping", "params": {}, "id": _MSG_ID + 1}, token) + b"\n")
                ping = _answer(reader.next())
                if ping.get("error") is not None:
                    return _report(args, {**ping, "id": _MSG_ID}, signed=True)  # its own refusal, as the run's
                if ping.get("id") != _MSG_ID + 1 or ping.get("result") != "pong":
                    return fail("the daemon sent an invalid response to a ping")
                sock.sendall(auth.signed_line(request, token) + b"\n")
                line = b""
                continue
            output = answer.get("output")
            if isinstance(output, dict) and "result" not in answer:
                # A write that fails is not tried again, and its exception waits for the answer.
                if answer.get("id") == _MSG_ID and stream_error is None:
                    try:
                        data = binascii.a2b_base64(str(output.get("data", "")))
                    except binascii.Error:
                        raise _InvalidAnswer(": an output chunk that is not base64") from None
                    try:
                        stream(str(output.get("stream")), data)
                    except Exception as exc:  # noqa: BLE001 - raised once the answer is read
                        stream_error = exc
                continue
            break
    except TimeoutError:
        return fail(f"the stockade daemon did not answer within {wait:g} s", UNAVAILABLE)
    except (OSError, EOFError) as exc:
        return fail(f"lost the connection to the stockade daemon: {exc}", UNAVAILABLE)
    except _InvalidAnswer as exc:
        return fail(f"the daemon sent an invalid response{exc}")
    if stream_error is not None:
        raise stream_error
    return _report(args, answer, signed=bool(token))


def _report(args: Any, answer: dict[str, Any], signed: bool) -> int:
    """The answer as the CLI reports a run: a clean completed run from its JSON alone,
    anything else (``--json``, a summary to print) through its ``ExecResult``."""
    if answer.get("id", _MSG_ID) != _MSG_ID and not (answer.get("id") is None and answer.get("error_code")):
        return fail(f"the daemon answered request {answer['id']!r}, not {_MSG_ID}")
    if answer.get("error") is not None:
        if answer.get("error_code") == "policy":
            return fail(_policy_error(args) or str(answer["error"]), "policy")
        if answer.get("error_code") == "auth":
            from .errors import refused_signature

            return fail(refused_signature(str(answer["error"]), signed), "auth")
        return fail(str(answer["error"]), str(answer.get("error_code") or "error"))
    result = answer.get("result")
    if not isinstance(result, dict):
        return fail("the daemon's answer to execute has no result")
    reason, exit_code = result.get("termination_reason"), result.get("exit_code")
    if exit_code is not None and not (type(exit_code) is int and -64 <= exit_code <= 255):
        # An exit status is 0-255, or minus a signal's number: 256 would be exit status 0 here.
        return fail("the daemon sent an invalid response: an exit code out of range")
    egress = result.get("egress_requests")
    clean = (
        reason == "completed"
        and not any(result.get(name) for name in ("security_violations", "unenforced_limits", "limits_reached"))
        and not (
            isinstance(egress, list)
            and any(isinstance(r, dict) and r.get("allowed") and r.get("reason") for r in egress)
        )  # ExecResult.failed_egress, on its JSON
    )  # else through the ExecResult: its summary line says what failed
    if clean and not args.json and (exit_code is None or type(exit_code) is int):
        return exit_status("completed", exit_code)
    from pydantic import ValidationError

    from .cli_outcome import report
    from .result import ExecResult, validate

    try:
        parsed = validate(ExecResult, jsoncodec.dumps(result), json_text=True, extra="ignore")
    except ValidationError:
        return fail("the daemon sent an invalid response")
    return report(args, parsed)


def _policy_error(args: Any) -> str | None:
    """The daemon refused the policy: say so as the in-process run would, naming the flags."""
    from .cli import _build_policy
    from .errors import StockadeError

    try:
        _build_policy(args)
    except (StockadeError, OSError, ValueError) as exc:
        return str(exc)
    return None


class _InvalidAnswer(Exception):
    """A line from the daemon that is not a JSON object (``str``: what more to say, or nothing)."""


def _answer(line: bytes) -> dict[str, Any]:
    try:
        answer = jsoncodec.loads(line)
    except (ValueError, RecursionError):  # not JSON; nested past the parser's depth
        answer = None
    if not isinstance(answer, dict):
        raise _InvalidAnswer
    return answer


class _Lines:
    """The answer's lines, as they come: each at most ``LINE_LIMIT`` bytes, all within ``wait``
    seconds of the first (output lines ahead of the answer restart no clock: a daemon that
    trickles bytes cannot hold the CLI past its wait)."""

    def __init__(self, sock: Any, wait: float) -> None:
        self.sock = sock
        self.buffer = b""
        self.deadline = time.monotonic() + wait

    def next(self) -> bytes:
        end = self.buffer.find(b"\n")
        if end < 0:
            # Each chunk searched once and kept in a list: a line's cost is its length.
            chunks, size = [self.buffer], len(self.buffer)
            while end < 0:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self.sock.settimeout(left)
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    raise EOFError("the daemon closed the connection")
                found = chunk.find(b"\n")
                end = size + found if found >= 0 else -1
                chunks.append(chunk)
                size += len(chunk)
                if end < 0 and size > LINE_LIMIT:
                    raise _InvalidAnswer(f": a line longer than {LINE_LIMIT} bytes")
            self.buffer = b"".join(chunks)
        line, self.buffer = self.buffer[:end], self.buffer[end + 1 :]
        return line
