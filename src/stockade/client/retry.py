"""What a call does when the daemon cannot be reached, or its connection breaks.

Both clients take a ``Retry`` (``Client(retry=Retry(...))``; ``retry=None``:
one attempt). A call is tried again, after a wait that doubles each time, when:

- the daemon could not be reached (no socket: it is restarting; connection
  refused), or its connection broke before any of the request went out:
  the request certainly never reached it, whatever its method;
- the daemon refused it unrun: ``unavailable`` (it is stopping), and with
  ``retry_busy`` also ``busy`` (no free slot);
- the connection broke after the request went out, before its answer, and
  the method is safe to send twice (``SAFE_TO_RESEND``: reading, listing,
  status, closing...). A request that may have run and is not safe to send
  twice (``execute``, ``sandbox.exec``/``run_code``/``write_file``/``create``)
  is not sent again: the call raises ``AnswerLostError``. A client's ``Retry``
  with ``resend_unsafe=True`` sends a run (``RESENT_WHEN_ASKED``: code, a
  command, a file's whole bytes) again, the caller having said that its runs
  may run twice; what makes something that a second request would make twice
  (a sandbox, a published port, a background process, stdin written) is
  never sent again.

An answer that does not come within the client's ``timeout`` (30 s) ends the
call at once (``DaemonUnavailableError``): the daemon is there but slow, and
a second request would only queue behind the first. Apart from all this, a
connection that the daemon hung up since its last answer (a restart between
two calls) is replaced at once, without a wait or an attempt counted: nothing
of the request went out on it.
"""

from __future__ import annotations

import contextvars
import errno
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import AnswerLostError, DaemonUnavailableError, error_from_code

T = TypeVar("T")

# Methods whose request may go twice to the daemon with the effect of once: what they
# change, a second time changes nothing more. (A second ``sandbox.close`` of a sandbox the
# first one closed is answered ``not_found``, which a handle's ``close`` takes as done.)
SAFE_TO_RESEND = frozenset(
    {
        "ping",
        "status",
        "runtimes",
        "selftest",
        "sandbox.get",
        "sandbox.read_file",
        "sandbox.list_dir",
        "sandbox.close",
        "execute.cancel",
    }
)


# Methods ``Retry(resend_unsafe=True)`` sends again after a lost answer: runs, which the caller
# who asked knows are safe to run twice, and a whole file's bytes (written twice, the same file).
# Any other method outside SAFE_TO_RESEND would make a second sandbox, forward, process or stdin
# write, which nothing undoes: it is never sent again.
RESENT_WHEN_ASKED = frozenset({"execute", "sandbox.exec", "sandbox.run_code", "sandbox.write_file"})


@dataclass(frozen=True)
class Retry:
    """How a client tries a call again (the module's docstring says when).

    ``attempts``: tries in all, the first included (1: none again).
    ``backoff_s``: the wait before the second try, doubled before each next
    one, up to ``max_backoff_s``: 1, 2 s by default (three tries, as the
    seed's ``call_with_retry``). Each try is bounded by the client's
    ``timeout``. ``retry_busy``: a ``busy`` refusal (no free slot, a full
    queue) is tried again too. ``resend_unsafe``: a run that may have run (an
    ``execute``, ``sandbox.exec``/``run_code``/``write_file`` whose connection
    broke before its answer) is sent again; it may then run twice. Nothing
    sends a ``sandbox.create``, ``publish``, ``spawn`` or process call twice.
    """

    attempts: int = 3
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    retry_busy: bool = False
    resend_unsafe: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or isinstance(self.attempts, bool) or not 1 <= self.attempts <= 100:
            raise ValueError(f"Retry.attempts must be a whole number from 1 (no retry) to 100, not {self.attempts!r}")
        for name in ("backoff_s", "max_backoff_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"Retry.{name} must be a finite number of seconds, 0 or more, not {value!r}")

    def delays(self) -> tuple[float, ...]:
        """The waits between the attempts, in order: ``backoff_s`` doubled each time, at most ``max_backoff_s``."""
        waits, wait = [], float(self.backoff_s)
        for _ in range(self.attempts - 1):
            waits.append(min(wait, self.max_backoff_s))
            wait *= 2
        return tuple(waits)


NO_RETRY = Retry(attempts=1)


class ConnectionLost(DaemonUnavailableError):
    """One attempt that did not reach the daemon, or lost its connection before the answer.

    ``sent``: some of the request went out, so it may have reached the daemon.
    ``retryable``: False where trying again cannot help (the socket's permissions).
    The clients turn it into the error the call raises (``Attempts``).
    """

    def __init__(self, message: str, *, sent: bool, retryable: bool = True) -> None:
        super().__init__(message)
        self.sent = sent
        self.retryable = retryable


def unreachable(socket_path: str, exc: OSError) -> ConnectionLost:
    """The failure of a connect to the daemon's socket."""
    return ConnectionLost(
        f"cannot reach the stockade daemon at {socket_path}: {exc.strerror or exc}",
        sent=False,
        retryable=exc.errno not in (errno.EACCES, errno.EPERM),
    )


def hung_up_before_sending(socket_path: str) -> ConnectionLost:
    return ConnectionLost(
        f"the stockade daemon at {socket_path} hung up before the request went out, saying nothing", sent=False
    )


def lost_after_sending(socket_path: str, why: object) -> ConnectionLost:
    return ConnectionLost(f"lost the connection to the stockade daemon at {socket_path} ({why})", sent=True)


class Attempts:
    """One call's attempts under its client's ``Retry``: after each failure, the wait
    before the next attempt, or the error the call raises. Made at the call's first
    failure (a call that succeeds pays for none of this); its clock starts there."""

    def __init__(self, retry: Retry, method: str) -> None:
        # Inside call_with_retry, that loop is the one that retries: not both.
        self.retry = NO_RETRY if _OUTER_RETRY.get() else retry
        self.method = method
        self.made = 0
        self.started = time.monotonic()
        self._waits = iter(self.retry.delays())

    def after_lost(self, lost: ConnectionLost) -> float:
        """The wait before the next attempt, after ``lost``; or raises the call's error."""
        self.made += 1
        unsafe = lost.sent and self.method not in SAFE_TO_RESEND
        if unsafe and not (self.retry.resend_unsafe and self.method in RESENT_WHEN_ASKED):
            again = " (Retry(resend_unsafe=True) re-sends it)" if self.method in RESENT_WHEN_ASKED else ""
            raise AnswerLostError(
                f"{lost} after the {self.method} request went out, before its answer: it may have run, "
                f"so it was not sent again{again}"
            ) from None
        wait = next(self._waits, None) if lost.retryable else None
        if wait is None:
            raise (AnswerLostError if unsafe else DaemonUnavailableError)(f"{lost}{self._tally()}") from None
        return wait

    def after_refusal(self, code: Any, message: Any) -> float | None:
        """After an error answer: the wait before the next attempt when the daemon refused the
        request unrun and may take it later (stopping; busy, with ``retry_busy``); None when
        the answer is the call's outcome. Raises the refusal once the attempts are spent."""
        if not (code == "unavailable" or (code == "busy" and self.retry.retry_busy)):
            return None
        self.made += 1
        wait = next(self._waits, None)
        if wait is None and self.made > 1:
            raise error_from_code(code, f"{message}{self._tally()}") from None
        return wait

    def _tally(self) -> str:
        if self.made <= 1:
            return ""
        return f" (gave up after {self.made} attempts over {time.monotonic() - self.started:.1f} s)"


_OUTER_RETRY: contextvars.ContextVar[bool] = contextvars.ContextVar("stockade_call_with_retry", default=False)


def unanswered(method: str, wait: float) -> DaemonUnavailableError:
    """The error for a request sent and not answered in time: it may have run, so one that is
    not safe to send twice is ``AnswerLostError``, which nothing sends again by itself."""
    message = f"the stockade daemon did not answer {method} within {wait:g} s"
    if method in SAFE_TO_RESEND:
        return DaemonUnavailableError(message)
    return AnswerLostError(f"{message}; it may have run, so it was not sent again")


def call_with_retry(fn: Callable[[], T], max_retries: int = 3, backoff: float = 1.0) -> T:
    """Call ``fn``; on a connection failure retry with exponential backoff (seed 000).

    Only ``DaemonUnavailableError`` is retried: an authentication, rate-limit or
    policy error would fail the same way again; and not ``AnswerLostError``, a
    request that may have run. The clients' own retries step aside while ``fn``
    runs, so that the attempts are not multiplied. A client's ``retry=`` does
    the same without a wrapper.
    """
    token = _OUTER_RETRY.set(True)
    try:
        for attempt in range(max(1, max_retries)):
            try:
                return fn()
            except AnswerLostError:
                raise
            except DaemonUnavailableError:
                if attempt >= max_retries - 1:
                    raise
                time.sleep(backoff * (2**attempt))
    finally:
        _OUTER_RETRY.reset(token)
    raise AssertionError("unreachable")
