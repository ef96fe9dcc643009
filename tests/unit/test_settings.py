"""Every STOCKADE_* setting in one typed object: parsed once per environment, refused by name."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from stockade import settings
from stockade.errors import ConfigError
from stockade.settings import Settings


def test_values_are_typed_and_secrets_kept_out_of_reprs() -> None:
    s = Settings.load({"STOCKADE_POOL_SIZE": "3", "STOCKADE_ALLOWED_UIDS": "1000, 1001", "STOCKADE_HTTP": "[::1]:9",
                       "STOCKADE_AUTH_TOKEN": "t" * 32, "STOCKADE_SANDBOX_UIDS": "100000-100009",
                       "STOCKADE_TRUST_MAP": "untrusted=gvisor", "STOCKADE_MICROVM_SNAPSHOTS": "0"})  # fmt: skip
    assert (s.pool_size, s.allowed_uids, s.http) == (3, frozenset({1000, 1001}), ("::1", 9))
    assert (s.sandbox_uids, s.trust_map, s.microvm_snapshots) == ((100000, 100009), {"untrusted": "gvisor"}, False)
    assert s.secret("auth_token") == "t" * 32 and "t" * 32 not in repr(s)
    assert Settings.load({"STOCKADE_AUDIT_LOG": "off"}).audit_log is None
    assert Settings.load({"STOCKADE_STATE_DIR": "/srv/st"}).audit_log == "/srv/st/audit.log"
    assert Settings.load({"STOCKADE_POOL_SIZE": ""}).pool_size == 2  # set but empty: the default
    assert Settings.load({"STOCKADE_PUBLISH_PORTS": "20000-20099"}).publish_ports == (20000, 20099)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("STOCKADE_SOCKET_PERMS", "rw"),
        ("STOCKADE_POOL_SHAPES", "0"),
        ("STOCKADE_SANDBOX_UIDS", "5-1"),
        ("STOCKADE_PUBLISH_PORTS", "80-90"),
        ("STOCKADE_PUBLISH_PORTS", "9000"),
        ("STOCKADE_CGROUP_PARENT", "../x"),
        ("STOCKADE_TRUST_MAP", "untrusted=chroot"),
        ("STOCKADE_HTTP", "nowhere:port"),
        ("STOCKADE_BUILD_PACKAGES", "yes"),
        ("STOCKADE_API_TOKEN", "short"),
    ],
)
def test_a_malformed_value_is_refused_naming_its_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.load({name: value})


def test_the_process_settings_follow_its_environment_unless_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STOCKADE_POOL_SIZE", "5")
    first = settings.current()
    assert first.pool_size == 5 and settings.current() is first  # parsed once while nothing changes
    monkeypatch.setenv("STOCKADE_POOL_SIZE", "6")
    assert settings.current().pool_size == 6
    installed = Settings.load({"STOCKADE_POOL_SIZE": "1"})
    settings.install(installed)
    try:
        monkeypatch.setenv("STOCKADE_POOL_SIZE", "7")
        assert settings.current() is installed  # the daemon's, read at its start, whatever changes after
    finally:
        settings.install(None)
    assert settings.current().pool_size == 7


def test_no_module_but_settings_reads_a_stockade_variable() -> None:
    import stockade

    root = os.path.dirname(stockade.__file__)
    allowed = {"settings.py", "cli_daemon.py", "cli.py"}  # the lean command line: no pydantic on its path
    found = []
    for folder, _, files in os.walk(root):
        if os.path.relpath(folder, root).startswith("agent"):
            continue  # inside isolates: the agent's own protocol variables, not settings
        for name in files:
            if not name.endswith(".py") or name in allowed:
                continue
            with open(os.path.join(folder, name)) as f:
                for number, line in enumerate(f, 1):
                    if ("environ.get(\"STOCKADE_" in line or "getenv(\"STOCKADE_" in line
                            or "environ[\"STOCKADE_" in line):  # fmt: skip
                        found.append(f"{name}:{number}")
    assert found == []


def test_a_variable_no_setting_reads_is_said_with_the_nearest_setting() -> None:
    env = {"STOCKADE_POOLSIZE": "3", "STOCKADE_XYZ": "1", "STOCKADE_POOL_SIZE": "2", "STOCKADE_pool_size": "2"}
    env |= {"STOCKADE_AGENT_FD": "3", "PATH": "/bin"}
    assert settings.unknown_variables(env) == [
        "STOCKADE_POOLSIZE is no setting (ignored): did you mean STOCKADE_POOL_SIZE?",
        "STOCKADE_XYZ is no setting (ignored)",
    ]


def test_every_stockade_variable_named_in_the_source_is_a_setting_or_internal() -> None:
    """What the runtimes set for their agents is not said to be a typo (``INTERNAL_VARIABLES``)."""
    import re

    import stockade

    root = os.path.dirname(stockade.__file__)
    named: set[str] = set()
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(folder, name)) as f:
                    named.update(re.findall(r"[\"'](STOCKADE_[A-Z0-9_]+)[\"']", f.read()))
    settings_names = {f"STOCKADE_{f.name.upper()}" for f in dataclasses.fields(Settings)}
    assert named - settings_names - settings.INTERNAL_VARIABLES == set()
    assert settings.unknown_variables(dict.fromkeys(named, "1")) == []


def test_every_setting_is_documented() -> None:
    import stockade

    docs = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(stockade.__file__))), "docs", "settings.md")
    with open(docs) as f:
        text = f.read()
    missing = [
        f"STOCKADE_{name.upper()}"
        for name in (f.name for f in dataclasses.fields(Settings))
        if f"STOCKADE_{name.upper()}`" not in text
    ]
    assert missing == []


def test_the_cli_begins_its_isolate_before_the_runtime_and_the_policy_are_imported() -> None:
    # What a CLI run imports before the zygote's spare can start (cli.py _early_factory): the
    # factory and the settings, not the Policy, asyncio or logging, which load meanwhile.
    code = (
        "import sys; from stockade.runtimes.process.factory import IsolateFactory; "
        "from stockade.settings import current; current(); "
        "print(sorted(m for m in ('stockade.policy', 'stockade.runtimes.base', 'asyncio', 'logging', 'hashlib') "
        "if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split("\n")[0] == "[]"
    # The placement seam still offers its base classes, loaded on first use.
    code = "from stockade.placement import Placement, one_shot; import sys; print('logging' in sys.modules)"
    done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "True"


def test_reading_the_settings_needs_no_pydantic_and_keeps_secrets_out_of_reprs() -> None:
    code = (
        "import sys; from stockade import settings; "
        "s = settings.Settings.load({'STOCKADE_AUTH_TOKEN': 'k' * 20, 'STOCKADE_NOT_A_SETTING': 'x', 'OTHER': '1'}); "
        "print(repr(s).count('k' * 20), s.secret('auth_token') == 'k' * 20, s.placement.type, "
        "any(m.startswith('pydantic') for m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["0", "True", "local", "False"]


def test_the_daemon_s_config_is_the_settings_with_its_flags() -> None:
    from stockade.daemon.config import DaemonConfig

    config = DaemonConfig.from_env({"STOCKADE_MAX_SANDBOXES": "3", "STOCKADE_UNIX_SOCKET": "0"})
    assert isinstance(config, DaemonConfig) and config.max_sandboxes == 3 and config.unix_socket
    served = config.with_http("127.0.0.1:0", unix_socket=False)
    assert (served.http, served.unix_socket, served.max_sandboxes) == (("127.0.0.1", 0), False, 3)
    assert config.http is None  # a copy: the settings read at start stay as they were
    # `--http` alone: $STOCKADE_HTTP's address where it is set, else the default.
    assert config.with_http("").http == ("127.0.0.1", 8002)
    from_env = DaemonConfig.from_env({"STOCKADE_HTTP": "127.0.0.1:8814"})
    assert from_env.with_http("").http == ("127.0.0.1", 8814)
    assert from_env.with_http("127.0.0.1:9").http == ("127.0.0.1", 9)


@pytest.mark.parametrize(("name", "good"), [("STOCKADE_GVISOR_PLATFORM", "ptrace"), ("STOCKADE_MICROVM_ACCEL", "tcg")])
def test_a_platform_or_accelerator_is_one_the_program_has(name: str, good: str) -> None:
    # Unchecked, a misspelt one failed every start later, with the program's own fatal error.
    with pytest.raises(ConfigError, match=f"{name}='bogus': expected one of"):
        Settings.load({name: "bogus"})
    assert good in dataclasses.astuple(Settings.load({name: good}))
