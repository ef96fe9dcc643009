"""What one call to a sandbox may carry: 7 MiB of file data, of stdin, of code; a command as a list.

That is the data one agent frame carries, base64-encoded (docs/sdk.md). The
frame itself would take a little more, up to its 10 MiB, so the limit is a
check of its own, and every door makes it before anything is sent: the SDK's
sandboxes (``runtimes/sandbox.py``), the daemon, and the daemon's client. A call
over it is refused the same way wherever it comes in, naming the field.
Light on purpose: the daemon's client imports it.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any

from .agent.wire import MAX_DATA_BYTES
from .errors import CallTooLargeError, InvalidRequestError

MAX_CALL_BYTES = MAX_DATA_BYTES
# Items of a list a request may hold: a command's arguments; a policy's hosts, networks, mounts, secrets,
# packages; an environment's variables. Each bounds what a wrong request makes the check go through
# (and say) before it is refused: two million wrong items took seconds and gigabytes.
MAX_ARGV_ITEMS = 16384
MAX_LIST_ITEMS = 256
MAX_ENV_ITEMS = 4096
_CHARS_UNDER = MAX_CALL_BYTES // 4  # no text this long is over the limit: UTF-8 takes at most 4 bytes a character


LANGUAGES = ("python", "bash")  # what run_code runs (agent/server.py)


def check_call_size(field: str, data: bytes | bytearray | memoryview | str | None) -> None:
    """Refuse ``field`` (``write_file data``, ``stdin``, ``code``) when it is not bytes or text
    (``TypeError``), or holds more than ``MAX_CALL_BYTES`` bytes (a text: its UTF-8), before
    anything is sent."""
    if data is None:
        return
    if isinstance(data, memoryview):
        size = data.nbytes
    elif not isinstance(data, (bytes, bytearray, str)):
        raise TypeError(f"{field} must be bytes or str, not {type(data).__name__}")
    elif len(data) <= _CHARS_UNDER:
        return
    else:
        size = len(data.encode(errors="surrogatepass")) if isinstance(data, str) else len(data)
    if size > MAX_CALL_BYTES:
        raise CallTooLargeError(
            f"{field} is too large: {size} bytes, and a call takes at most {MAX_CALL_BYTES} (7 MiB); nothing was sent"
        )


def publish_specs(publish: Any) -> list[int | str]:
    """A ``publish=`` keyword's specs: a list of them, or one (``publish=8000``, ``"9000:8000"``;
    a string is one spec, never its characters)."""
    if isinstance(publish, (int, str)) and not isinstance(publish, bool):
        return [publish]
    if not isinstance(publish, (bytes, bytearray, dict)) and hasattr(publish, "__iter__"):
        return list(publish)
    raise TypeError(f"publish takes a port spec or a list of them (8000, '9000:8000'), not {publish!r}")


def argv_list(argv: Any) -> list[str]:
    """``argv`` as a list of strings (a path object as its string, as ``subprocess`` takes one),
    refusing a string: ``run("ls -l")`` would run a program named "l"."""
    if isinstance(argv, (str, bytes)):
        raise TypeError(f"argv must be a list of strings, not a string: pass {argv.split()!r} (or ['sh', '-c', ...])")
    if argv is None or not hasattr(argv, "__iter__"):
        raise TypeError(f"argv must be a list of strings, not {type(argv).__name__}")
    command = [os.fspath(a) if isinstance(a, os.PathLike) else a for a in argv]
    for i, word in enumerate(command):
        if not isinstance(word, str):
            raise TypeError(f"argv[{i}] must be a string, not {type(word).__name__}: {word!r}")
        if "\0" in word:
            raise InvalidRequestError(f"argv[{i}] holds a NUL byte, which no program's argument can: {word[:64]!r}")
    if not command:
        raise InvalidRequestError("argv is empty: give the command to run")
    return command


def check_code(code: Any, language: Any) -> None:
    """Refuse code that is not text, or a language run_code does not run, before anything is taken."""
    if not isinstance(code, str):
        hint = ": decode it first" if isinstance(code, (bytes, bytearray)) else ""
        raise TypeError(f"code must be a str, not {type(code).__name__}{hint}")
    if language not in LANGUAGES:
        raise InvalidRequestError(f"language {language!r} is not one run_code runs: {', '.join(LANGUAGES)}")


def check_timeout(timeout: Any) -> None:
    """A call's ``timeout``: None (the policy's) or seconds above 0, a number (not a string)."""
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}: {timeout!r}")
    if math.isnan(timeout) or timeout <= 0:
        raise InvalidRequestError(f"timeout={timeout!r}: give seconds above 0 (or leave it out for the policy's)")


SIGNALS = ("SIGTERM", "SIGKILL", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2")  # agent/processes.py's


def signal_name(sig: Any) -> str:
    """A background process's signal by name: given as ``"SIGKILL"``, ``signal.SIGKILL`` or 9."""
    import signal

    name = sig
    if isinstance(sig, int) and not isinstance(sig, bool):  # a signal.Signals is an int too
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = sig
    if name not in SIGNALS:
        said = f"signal must be one of {', '.join(SIGNALS)} (a name, a signal.Signals, a number)"
        raise ValueError(f"{said}, not {sig!r}")
    return str(name)


def stdin_bytes(stdin: bytes | str) -> bytes:
    """A call's stdin as bytes: text as UTF-8, a lone surrogate as its UTF-8 form, as every door
    takes text stdin (the daemon's JSON can hold one; bytes come as bytes)."""
    return stdin.encode("utf-8", "surrogatepass") if isinstance(stdin, str) else stdin


def check_env(env: object) -> None:
    """A run's ``env``: None, or names mapped to text; else TypeError naming the first that is not,
    or InvalidRequestError naming one exec cannot pass, on the host, before anything is sent (the
    agent would refuse it less clearly)."""
    if env is None:
        return
    if not isinstance(env, dict):
        raise TypeError(f"env must map names to text (str to str), not {type(env).__name__}")
    for name, value in env.items():
        if type(name) is not str or type(value) is not str:
            raise TypeError(f"env must map names to text (str to str), not {name!r}: {value!r}")
        if (problem := env_entry_problem(name, value)) is not None:
            raise InvalidRequestError(problem)


def env_entry_problem(name: str, value: str) -> str | None:
    """What makes ``name=value`` no environment entry exec can pass, or None."""
    if not name or "=" in name or "\0" in name:
        return f"environment variable {name[:64]!r} has an invalid name: a name is not empty and holds no '=' or NUL"
    if "\0" in value:
        return f"environment variable {name[:64]!r} has a NUL byte in its value: exec cannot pass one"
    return None
