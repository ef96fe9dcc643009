"""What one call to a sandbox may carry: 7 MiB of file data, of stdin, of code; a command as a list.

That is the data one agent frame carries, base64-encoded (docs/sdk.md). The
frame itself would take a little more, up to its 10 MiB, so the limit is a
check of its own, and every door makes it before anything is sent: the SDK's
sandboxes (``runtimes/sandbox.py``), the daemon, and the daemon's client. A call
over it is refused the same way wherever it comes in, naming the field.
Light on purpose: the daemon's client imports it.
"""

from __future__ import annotations

from typing import Any

from .agent.wire import MAX_DATA_BYTES
from .errors import CallTooLargeError

MAX_CALL_BYTES = MAX_DATA_BYTES
_CHARS_UNDER = MAX_CALL_BYTES // 4  # no text this long is over the limit: UTF-8 takes at most 4 bytes a character


def check_call_size(field: str, data: bytes | str | None) -> None:
    """Refuse ``field`` (``write_file data``, ``stdin``, ``code``) when it holds more than
    ``MAX_CALL_BYTES`` bytes (a text: its UTF-8), before anything is sent."""
    if data is None or len(data) <= _CHARS_UNDER:
        return
    size = len(data.encode(errors="surrogatepass")) if isinstance(data, str) else len(data)
    if size > MAX_CALL_BYTES:
        raise CallTooLargeError(
            f"{field} is too large: {size} bytes, and a call takes at most {MAX_CALL_BYTES} (7 MiB); nothing was sent"
        )


def argv_list(argv: Any) -> list[str]:
    """``argv`` as a list, refusing a string: ``run("ls -l")`` would run a program named "l"."""
    if isinstance(argv, (str, bytes)):
        raise TypeError(f"argv must be a list of strings, not a string: pass {argv.split()!r} (or ['sh', '-c', ...])")
    return list(argv)
