"""The command line's flags: each subcommand takes what it acts on, and refuses the rest."""

from __future__ import annotations

import pytest

from stockade.cli import build_parser
from stockade.errors import RuntimeUnavailableError
from stockade.isolation import RUNTIME_NAMES
from stockade.runtimes.manager import RuntimeManager

# What only a run that ends acts on: a component (start) runs until stopped, its output
# streamed to its log uncut, supervised on this host, not through a daemon.
ONE_RUN_FLAGS: dict[str, tuple[list[str], str, object]] = {
    "--timeout": (["--timeout", "5"], "timeout", 5.0),
    "--max-output": (["--max-output", "100"], "max_output", 100),
    "--json": (["--json"], "json", True),
    "--socket": (["--socket", "/x.sock"], "socket", "/x.sock"),
    "--token-file": (["--token-file", "/t"], "token_file", "/t"),
}


@pytest.mark.parametrize("flag", sorted(ONE_RUN_FLAGS))
def test_start_refuses_the_flags_it_would_ignore(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv, _, _ = ONE_RUN_FLAGS[flag]
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["start", "--name", "web", *argv, "--", "true"])
    assert exit_info.value.code == 2
    assert f"unrecognized arguments: {flag}" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "exec-code"])
@pytest.mark.parametrize("flag", sorted(ONE_RUN_FLAGS))
def test_run_and_exec_code_take_them(command: str, flag: str) -> None:
    argv, dest, value = ONE_RUN_FLAGS[flag]
    assert getattr(build_parser().parse_args([command, *argv, "--", "true"]), dest) == value


def test_start_keeps_the_other_policy_flags() -> None:
    args = build_parser().parse_args(["start", "--name", "web", "--memory", "64", "--pids", "8", "--", "sleep", "9"])
    assert (args.memory, args.pids, args.command) == (64, 8, ["--", "sleep", "9"])


def test_the_runtime_flag_names_every_runtime(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("run", "exec-code", "start"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        help_text = " ".join(capsys.readouterr().out.split())
        assert f"runtime by name ({', '.join(RUNTIME_NAMES)})" in help_text
    assert {"process", "gvisor", "microvm", "fake"} <= set(RUNTIME_NAMES)
    # The manager knows exactly these, by the same list.
    with pytest.raises(RuntimeUnavailableError, match=f"known: {', '.join(RUNTIME_NAMES)}$"):
        RuntimeManager(pool_size=0).get("warp")
