"""How a command's outcome reaches its caller: its exit status, the summary line, the run's output
as it comes, and a failure of stockade's own (stderr; with ``--json``, stdout too).

Exit status of ``run``/``exec-code``: the command's own; 128+N when a signal ended it; 124 on
timeout (as timeout(1)); 137 when the memory limit killed it, or it was killed with its isolate
(cancelled, closed); 141 when its output was cut at the policy's cap (as a pipe's reader that stops
reading); 125 when stockade itself failed (bad policy, no runtime), with the reason on stderr.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # not typing's: a run through the daemon imports neither typing nor re
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from .result import ExecResult

EXIT_TIMEOUT = 124
EXIT_STOCKADE_ERROR = 125
EXIT_MEMORY = 137
EXIT_KILLED = 137  # 128 + SIGKILL
EXIT_OUTPUT_CUT = 141  # 128 + SIGPIPE


# `--json`: a failure is a JSON object on stdout as well, where a result would have been, so that a
# caller parsing stdout reads one document either way.
json_failures = False


def fail(message: str, code: str = "error") -> int:
    """Say why stockade could not do it (stderr; with ``--json`` stdout too, with ``code``); exit 125."""
    from .errors import printable  # a message may quote the sandbox (a path, a server's stderr)

    print(f"stockade: {printable(message)}", file=sys.stderr)
    if json_failures:
        import json

        print(json.dumps({"error": message, "code": code}))
    return EXIT_STOCKADE_ERROR


def fail_for(exc: BaseException) -> int:
    """``fail`` for an exception: with its error code where it is stockade's (``policy``, ``path_not_found``, ...)."""
    from .errors import StockadeError, error_code

    return fail(str(exc), error_code(exc) if isinstance(exc, StockadeError) else "error")


def stream(name: str, data: bytes) -> None:
    """A run's output as it comes, to this process's own stdout or stderr."""
    out = sys.stdout if name == "stdout" else sys.stderr
    out.buffer.write(data)
    out.flush()


def report(args: Any, result: ExecResult) -> int:
    """Print what the run's output did not say (all of it with --json); its exit status."""
    if args.json:
        print(result.to_json(indent=2))
    elif (
        result.termination_reason != "completed"
        or result.security_violations
        or result.unenforced_limits
        or result.limits_reached
        or result.failed_egress()
    ):
        from .errors import printable

        print(printable(result.summary()), file=sys.stderr)
    return exit_status(result.termination_reason, result.exit_code)


def exit_status(termination_reason: str, exit_code: int | None) -> int:
    """A run's exit status from how it ended (an ``ExecResult``'s two fields, or its JSON's)."""
    if termination_reason == "timeout":
        return EXIT_TIMEOUT
    if termination_reason == "memory_limit":
        return EXIT_MEMORY
    if termination_reason == "output_limit":
        # Whether the command was killed for it or ended first: its output was cut, as a pipe's
        # reader that stops reading cuts it (SIGPIPE), not its exit status, is the news.
        return EXIT_OUTPUT_CUT
    if exit_code is None:
        # Killed with its isolate (cancelled, closed, a violation): as SIGKILL says. Only a run
        # that stockade could not start or lost says 125.
        return EXIT_KILLED if termination_reason in ("killed", "violation", "cpu_limit") else EXIT_STOCKADE_ERROR
    if exit_code < 0:
        return 128 - exit_code
    return int(exit_code)


def whole_number(least: int) -> Callable[[str], int]:
    """An argparse ``type``: a whole number of at least ``least`` (argparse names the flag when it refuses)."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value}: give {least} or more")
        return value

    return parse
