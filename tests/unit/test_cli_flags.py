"""The command line's flags: each subcommand takes what it acts on, and refuses the rest."""

from __future__ import annotations

import dataclasses

import pytest

from stockade.cli import build_parser
from stockade.errors import RuntimeUnavailableError
from stockade.isolation import RUNTIME_NAMES
from stockade.runtimes.manager import RuntimeManager

# What only a run that ends acts on: a component (start) runs until stopped, its output
# streamed to its log uncut, supervised on this host, not through a daemon.
ONE_RUN_FLAGS: dict[str, tuple[list[str], str, object]] = {
    "--timeout": (["--timeout", "5"], "timeout_seconds", 5.0),
    "--max-output": (["--max-output", "100"], "max_output_bytes", 100),
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
    assert (args.memory_mb, args.pids_limit, args.command) == (64, 8, ["--", "sleep", "9"])


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


def test_every_policy_field_has_its_flag_with_the_fields_choices_and_bounds(capsys: pytest.CaptureFixture[str]) -> None:
    from stockade.policy import CLI_FLAGS, Policy

    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for name in (f.name for f in dataclasses.fields(Policy)):
        flag = CLI_FLAGS.get(name, ("--" + name.replace("_", "-"), None))[0]
        assert flag in help_text, name
    # Bounds and choices come from the model: a new maximum shows without a CLI edit.
    assert "--memory MB memory limit, MB; default 512; at least 16; at most 2048" in help_text
    assert "{none,loopback,allowlist}" in help_text and "{deny,kill}" in help_text
    args = build_parser().parse_args(["run", "--memory", "64", "--env", "A=1", "--mount", "/srv", "--", "true"])
    assert (args.memory_mb, args.environment, args.filesystem_access) == (64, ["A=1"], ["/srv"])


def test_a_value_out_of_the_fields_range_is_refused_naming_it() -> None:
    import subprocess
    import sys

    argv = [sys.executable, "-m", "stockade.cli", "run", "--memory", "99999", "--", "true"]
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert done.returncode == 125
    assert "--memory (memory_mb): Input should be less than or equal to 2048" in done.stderr


def test_subcommands_without_a_policy_do_not_build_its_flags() -> None:
    # Building the Policy's flags imports it and argparse: `stockade ps` and the like stay cheap.
    parser = build_parser("ps")
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--memory", "64", "--", "true"])


def test_token_new_does_not_replace_a_token_file_unless_forced(tmp_path: object) -> None:
    import os

    from stockade.cli import main

    path = os.path.join(str(tmp_path), "token")
    assert main(["token", "new", "--file", path]) == 0
    with open(path) as f:
        first = f.read()
    assert main(["token", "new", "--file", path]) == 125
    with open(path) as f:
        assert f.read() == first
    assert main(["token", "new", "--file", path, "--force"]) == 0
    with open(path) as f:
        assert f.read() != first
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_an_unknown_flag_is_refused_in_its_commands_usage(capsys: pytest.CaptureFixture[str]) -> None:
    from stockade.cli import main

    for argv, usage in ((["ps", "--all"], "usage: stockade ps"), (["env", "ls", "--all"], "usage: stockade env ls")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith(usage), err
        assert f"stockade {' '.join(argv[:-1])}: error: unrecognized arguments: --all" in err
    # One a user may expect says why it is not there.
    with pytest.raises(SystemExit):
        main(["start", "--name", "web", "--timeout", "5", "--", "sleep", "9"])
    err = capsys.readouterr().err
    assert "stockade start: error: unrecognized arguments: --timeout (a component runs until `stockade stop`" in err


def test_an_unknown_flag_of_a_run_is_refused_in_runs_usage() -> None:
    import subprocess
    import sys

    argv = [sys.executable, "-m", "stockade.cli", "run", "--bogus", "--", "true"]
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert (
        done.stderr.startswith("usage: stockade run")
        and "stockade run: error: unrecognized arguments: --bogus" in done.stderr
    )


def test_a_registered_secret_names_the_hosts_it_may_be_sent_to(capsys: pytest.CaptureFixture[str]) -> None:
    from pydantic import ValidationError

    from stockade.protocol.models import SecretPut

    with pytest.raises(SystemExit):
        build_parser().parse_args(["secrets", "put", "API_KEY"])
    assert "the following arguments are required: --host" in capsys.readouterr().err
    # The daemon refuses one without them, from any client.
    for hosts in ({}, {"hosts": None}, {"hosts": []}):
        with pytest.raises(ValidationError, match="hosts"):
            SecretPut.model_validate({"name": "API_KEY", "value": "sk-1", **hosts})
    assert SecretPut.model_validate({"name": "API_KEY", "value": "sk-1", "hosts": ["api.example"]}).hosts


@pytest.mark.parametrize(
    ("reason", "exit_code", "status"),
    [
        ("completed", 3, 3),
        ("killed", -15, 143),  # a signal: 128 + N
        ("killed", None, 137),  # cancelled or closed with its isolate: as SIGKILL says, not "could not run it"
        ("violation", None, 137),
        ("timeout", None, 124),
        ("memory_limit", -9, 137),
        ("output_limit", 0, 141),  # cut, whether it ended first or was killed for it
        ("output_limit", -9, 141),
        ("error", None, 125),
        ("lost", None, 125),
    ],
)
def test_a_runs_exit_status_says_how_it_ended(reason: str, exit_code: int | None, status: int) -> None:
    from stockade.cli_outcome import exit_status

    assert exit_status(reason, exit_code) == status


def test_a_name_with_a_trailing_newline_is_refused() -> None:
    # `$` matches before a last newline: names are matched whole.
    from stockade import components, environments
    from stockade.errors import StockadeError

    for check in (components.check_name, environments.check_name):
        with pytest.raises((StockadeError, ValueError)):
            check("web\n")
