"""Python environments (docs/environments.md): built with the host's real pip from its
configured index, content-addressed, read-only, mounted by every runtime at
/opt/stockade/env; and the /etc every isolate gets (CA bundle, fonts.conf, mime.types).

The store is a temporary directory for the session (STOCKADE_ENV_STORE), so every
session starts from an empty cache, as CI does: the small environments take about a
second each, pandas + matplotlib about ten, built once per session.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

import stockade
from stockade import Policy, PolicyError, environment_build, environments, settings
from stockade.runtimes.manager import RuntimeManager
from tests.conftest import require

SMALL = ["six", "tabulate"]  # pure Python, from the local index; tabulate has a console script


@pytest.fixture(scope="session")
def small(store: str) -> str:
    return environments.build(SMALL, name="small")


def _host_sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# What code inside sees of the environment and of /etc: one run_code and one exec, so that
# the microVM needs one sandbox.
INSIDE = textwrap.dedent("""
    import errno, hashlib, json, os, ssl, subprocess, sys
    import six, tabulate
    def sha(p):
        try:
            return hashlib.sha256(open(p, 'rb').read()).hexdigest()
        except OSError:
            return None
    try:
        open('/opt/stockade/env/python/planted.py', 'w')
        write = 0
    except OSError as exc:
        write = exc.errno
    fc = subprocess.run(['fc-list'], capture_output=True, text=True) if os.path.exists('/usr/bin/fc-list') else None
    print(json.dumps({
        'six': six.__file__, 'tabulate': tabulate.__file__, 'sys_path': sys.path, 'environ': dict(os.environ),
        'mountinfo': open('/proc/self/mountinfo').read(), 'write_errno': write,
        'ca': sha('/etc/ssl/certs/ca-certificates.crt'), 'mime': sha('/etc/mime.types'),
        'fonts_conf': open('/etc/fonts/fonts.conf').read() if os.path.exists('/etc/fonts/fonts.conf') else None,
        'fc_stderr': fc.stderr if fc else '', 'fc_fonts': len(fc.stdout.splitlines()) if fc else -1,
        'ssl_cas': ssl.create_default_context().cert_store_stats()['x509_ca'],
    }))
""")
SHELL = (
    "python3 -c 'import six, sys; print(six.__file__); print(sys.executable)'; "
    "printf '1 2\\n3 4\\n' | tabulate; head -1 \"$(command -v tabulate)\"; "
    "touch /opt/stockade/env/planted 2>/dev/null; echo touch=$?"
)


def check_inside(sb: Any, store: str, env_id: str) -> None:
    r = sb.run_code(INSIDE)
    assert r.success, r.stderr
    seen = json.loads(r.stdout)
    assert seen["six"] == "/opt/stockade/env/python/six.py"
    assert "/opt/stockade/env/python" in seen["sys_path"]
    assert seen["environ"]["PYTHONPATH"] == "/opt/stockade/env/python"
    assert seen["environ"]["PATH"].startswith("/opt/stockade/env/bin:")
    assert seen["environ"]["MPLCONFIGDIR"] == "/tmp/.cache/matplotlib"
    assert seen["write_errno"] in (errno.EROFS, errno.EACCES), seen["write_errno"]
    # Nothing of the host's store: not its path, not the id's directory name.
    for what in ("sys_path", "environ", "mountinfo"):
        text = json.dumps(seen[what])
        assert store not in text and env_id not in text, (what, text)
    assert any(" /opt/stockade/env " in line for line in seen["mountinfo"].splitlines()), seen["mountinfo"]
    check_etc(seen)
    r = sb.exec(["sh", "-c", SHELL])
    lines = r.stdout.splitlines()
    assert lines[:2] == ["/opt/stockade/env/python/six.py", "/usr/bin/python3"], r.stdout + r.stderr
    assert "#!/usr/bin/python3" in lines and "touch=1" in lines, r.stdout + r.stderr
    assert any(set(line) == {"-", " "} for line in lines), r.stdout  # tabulate's rule: the console script ran
    # Named bare, as a shell would: found on the environment's PATH, by exec and by spawn alike.
    direct = sb.exec(["tabulate"], stdin="a b\n")
    assert direct.exit_code == 0 and any(set(line) == {"-", " "} for line in direct.stdout.splitlines()), direct
    spawned = sb.spawn(["tabulate"], stdin="a b\n")
    spawned.close_stdin()
    assert spawned.wait(30) == 0 and b"-" in spawned.read()[0]
    with pytest.raises(FileNotFoundError, match="cannot execute 'no-such-tool': No such file or directory"):
        sb.exec(["no-such-tool"])  # and a name on no PATH entry fails as exec would


def check_etc(seen: dict[str, Any]) -> None:
    """The host's CA bundle and mime.types, a fontconfig configuration that fc-list takes quietly."""
    if os.path.exists("/etc/ssl/certs/ca-certificates.crt"):
        assert seen["ca"] == _host_sha("/etc/ssl/certs/ca-certificates.crt")
        assert seen["ssl_cas"] > 10  # Python's default context finds them
    if os.path.exists("/etc/mime.types"):
        assert seen["mime"] == _host_sha("/etc/mime.types")
    assert seen["fonts_conf"] is not None and "<dir>/usr/share/fonts</dir>" in seen["fonts_conf"]
    if os.path.exists("/usr/bin/fc-list"):
        assert seen["fc_stderr"] == "" and seen["fc_fonts"] > 0, seen


# ---- the store: content addresses, names, concurrency, failures ------------------------------------------


def test_the_content_address_is_stable(small: str, monkeypatch: pytest.MonkeyPatch) -> None:
    reqs = environments.normalise(SMALL)
    assert environments.content_id(reqs) == small
    # Spelt differently, the same requirements: the same id, and nothing is built again.
    assert environments.normalise(["Tabulate ", "# a comment", "", "SIX"]) == reqs
    monkeypatch.setattr(environment_build, "make", lambda *a: pytest.fail("built again"))
    assert environments.build(["SIX", "tabulate"]) == small
    assert environments.content_id(environments.normalise(["six"])) != small
    assert environments.content_id(environments.normalise(["six>=1", "tabulate"])) != small
    assert environments.content_id(reqs, allow_source=True) != small
    # The pip configuration that chooses packages is part of it; the rest is not.
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "7")
    assert environments.content_id(reqs) == small
    monkeypatch.setenv("PIP_INDEX_URL", "file:///nowhere/simple")
    assert environments.content_id(reqs) != small


@pytest.mark.parametrize(
    "bad",
    [
        "-r other.txt", "--index-url=https://example.org", "./local/pkg", "six; $(reboot)", "six @", "six=>=1",
        # pip reads a requirement line's "--option" tail as its own: --global-option means "build from source"
        'six ; python_version>"3" --global-option=x', "six ; os_name=='posix' --install-option=--prefix=/",
        # Any text (===), or a version that is a file's name: pip took it for the archive so named
        # where it ran, and built it from source on the host.
        "probe===1.tar.gz", "probe==1.tar.gz", "probe==1.zip",
        # A local version that is an archive's name too: pip built "six==1.0+a.tar.gz" from source, if so named.
        "probe==1.0+local.whl", "probe==1.0+a.tar.gz",
        # Logged whole and an argument of pip's: 300,000 characters were an internal error, and no failure.
        "six==1.0+" + "a" * 2000,
        # What `stockade env ls` and the daemon's log would show raw: a title set, the screen cleared.
        'six ; platform_release == "\x1b]0;OWNED\x07\x1b[2J"',
    ],
)  # fmt: skip
def test_requirements_are_refused_when_they_are_not_plain(bad: str, store: str) -> None:
    with pytest.raises(PolicyError, match="packages"):
        Policy(packages=[bad])


def test_a_bad_version_specifier_is_quoted_as_given(store: str) -> None:
    with pytest.raises(PolicyError, match=r"'not a valid req!!': 'a valid req!!' is not a version specifier"):
        Policy(packages=["not a valid req!!"])


def test_a_missing_environment_is_a_policy_error_naming_it(store: str, small: str) -> None:
    with pytest.raises(PolicyError, match=r"environment_name: 'nope' does not exist.*stockade env ls"):
        Policy(environment_name="nope")
    with pytest.raises(PolicyError, match="environment_name or packages, not both"):
        Policy(environment_name="small", packages=["six"])
    with pytest.raises(PolicyError, match=r"environment_id.*stockade env ls"):
        Policy(environment_id="0" * 32)
    with pytest.raises(PolicyError, match="would cover the environment"):
        Policy(environment_name="small", filesystem_access=[f"{store}:/opt/stockade"])
    with pytest.raises(PolicyError, match="not an environment name"):
        Policy(environment_name="../etc")
    for leading in ("-x", ".hidden", "."):  # every character allowed, but not first: the message says so
        with pytest.raises(PolicyError, match="starting with a letter or digit"):
            Policy(environment_name=leading)


def test_the_digest_says_which_environment(small: str, store: str) -> None:
    other = environments.build(["six"], name="moving")
    before = Policy(environment_name="moving")
    environments.build(SMALL, name="moving")  # the name now points at another build
    after = Policy(environment_name="moving")
    assert (before.environment_id, after.environment_id) == (other, small)
    assert before.digest != after.digest
    assert Policy(environment_id=small).environment_id == small  # an id alone pins it
    environments.remove("moving")


def test_concurrent_builds_of_one_environment_make_one(store: str) -> None:
    code = "from stockade import environments as e; print(e.build(['termcolor']))"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    ids = {p.communicate(timeout=300)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(ids) == 1
    (env_id,) = ids
    assert [e.id for e in environments.listing()].count(env_id) == 1
    assert os.listdir(os.path.join(store, "tmp")) == []  # no half-built copy left
    # Read-only on the host too.
    assert not os.stat(environments.env_path(env_id)).st_mode & 0o222


def test_env_ls_and_rm(store: str) -> None:
    parser = argparse.ArgumentParser(prog="stockade")
    from stockade import cli_env

    cli_env.add_parser(parser.add_subparsers(dest="cmd"))

    def cli(*argv: str) -> int:
        args = parser.parse_args(list(argv))
        status: int = args.func(args)
        return status

    req = os.path.join(store, "req.txt")
    with open(req, "w") as f:
        f.write("# pinned for the test\ncycler\n")
    assert cli("env", "build", "one", "-r", req) == 0
    assert cli("env", "build", "two", "cycler") == 0  # the same environment, another name
    entries = {e.id: e for e in environments.listing()}
    env_id = environments.named("one")
    assert env_id == environments.named("two") and sorted(entries[env_id].names) == ["one", "two"]
    assert entries[env_id].installed[0].startswith("cycler==")
    # Refused by id while named, naming every name to remove.
    with pytest.raises(
        PolicyError, match=r"is named one, two: remove the names \(stockade env rm one and stockade env rm two;"
    ):
        environments.remove(env_id[:8])
    # A name shared with another goes alone; the environment is refused by id while named.
    assert cli("env", "rm", "one") == 0
    assert environments.named("one") is None and os.path.isdir(environments.env_path(env_id))
    assert cli("env", "rm", env_id[:8]) == cli_env.EXIT_ERROR
    assert os.path.isdir(environments.env_path(env_id))
    # Its last name takes it with it.
    assert cli("env", "rm", "two") == 0
    assert not os.path.exists(environments.env_path(env_id))
    assert cli("env", "rm", "two") == cli_env.EXIT_ERROR
    assert cli("env", "ls", "--json") == 0


def test_a_build_imports_nothing_from_its_callers_directory(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A build runs as root from wherever its caller stands, which may be a directory a sandbox
    # wrote (a writable mount): `python -m pip` there would import its pip first.
    planted = tmp_path / "pip"
    planted.mkdir()
    marker = tmp_path / "ran-as-host"
    code = f"open({str(marker)!r}, 'w').write('planted')\nraise SystemExit(3)\n"
    (planted / "__init__.py").write_text(code)
    (planted / "__main__.py").write_text(code)
    monkeypatch.chdir(tmp_path)
    environment_build._pip_command.cache_clear()
    try:
        env_id = environments.build(["six"], name="from-planted-dir")
    finally:
        environment_build._pip_command.cache_clear()
    assert not marker.exists()
    assert env_id in {e.id for e in environments.listing()}


def _probe_distributions(where: Path, marker: Path) -> None:
    """A wheel and an sdist of ``stockade-sdist-probe`` in ``where``; the sdist's setup.py writes ``marker``."""
    import tarfile

    metadata = _wheel(where, "stockade-sdist-probe")
    source = where / "stockade_sdist_probe-1.0"
    (source / "stockade_sdist_probe").mkdir(parents=True)
    (source / "stockade_sdist_probe" / "__init__.py").write_text("")
    (source / "PKG-INFO").write_text(metadata)
    (source / "setup.py").write_text(
        f"open({str(marker)!r}, 'w').write('setup.py ran on the host')\n"
        "from setuptools import setup\n"
        "setup(name='stockade-sdist-probe', version='1.0', packages=['stockade_sdist_probe'])\n"
    )
    with tarfile.open(where / "stockade_sdist_probe-1.0.tar.gz", "w:gz") as sdist:
        sdist.add(source, arcname=source.name)


def test_no_requirement_text_makes_pip_build_from_source(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Past normalise (which refuses it), a requirement reaches pip as one argument, never as a
    # requirements file's line: its "--global-option" tail is no option there, and no sdist is built.
    links, marker = tmp_path / "links", tmp_path / "setup-py-ran"
    links.mkdir()
    _probe_distributions(links, marker)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    smuggled = 'stockade-sdist-probe ; python_version>"3" --global-option=x'
    with pytest.raises(PolicyError, match="pip could not install them"):
        environment_build.make("0" * 32, (smuggled,), False, False)
    assert not marker.exists()
    # The same distributions, asked for plainly: the wheel is installed, and setup.py never runs.
    env_id = environments.build(["stockade-sdist-probe"], name="sdist-probe")
    assert os.path.isdir(os.path.join(environments.env_path(env_id), "python", "stockade_sdist_probe"))
    assert not marker.exists()


def test_pip_takes_no_file_of_its_callers_directory_for_a_requirement(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Past normalise (which refuses "==="), pip read "probe===1.tar.gz" as the archive of that name
    # where it ran, the caller's directory, and ran its build backend on the host.
    import tarfile

    marker = tmp_path / "backend-ran"
    source = tmp_path / "probe"
    source.mkdir()
    (source / "pyproject.toml").write_text(
        '[build-system]\nrequires = []\nbuild-backend = "probe_backend"\nbackend-path = ["."]\n'
    )
    (source / "probe_backend.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with tarfile.open(tmp_path / "probe===1.tar.gz", "w:gz") as sdist:
        sdist.add(source, arcname="probe")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(PolicyError, match="pip could not install them"):
        environment_build.make("0" * 32, ("probe===1.tar.gz",), False, False)
    assert not marker.exists()


def test_a_daemons_callers_build_into_the_store_up_to_its_limit(
    store: str, small: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each spelling of a requirement list was an environment of its own, kept: a caller could fill the
    # host's disk one build at a time. A store at its limit builds nothing more for callers.
    planted = os.path.join(store, "envs", "f" * 32)
    os.makedirs(planted)
    try:
        with open(os.path.join(planted, environments.MANIFEST), "w") as f:
            json.dump({"requirements": ["big"], "size_bytes": 3 << 20}, f)
        monkeypatch.setenv("STOCKADE_ENV_STORE_LIMIT_MB", "2")
        monkeypatch.setattr(settings, "_serving", True)
        monkeypatch.setenv("STOCKADE_BUILD_PACKAGES", "1")
        environments.share(Policy(environment_name="small"))  # built already: a store at its limit serves it
        policy = Policy(packages=["six>=0"])
        with pytest.raises(PolicyError, match=r"holds \d+ MiB, its limit for callers' builds \(STOCKADE_ENV_STORE"):
            environments.share(policy)
        assert not os.path.isdir(environments.env_path(policy.environment_id or ""))
    finally:
        environment_build.remove_tree(planted)


def _wheel(where: Path, project: str, zeros_mib: int = 0, extra: dict[str, str] | None = None) -> str:
    """A wheel of ``project`` 1.0 in ``where`` (its package empty, and ``zeros.bin`` of ``zeros_mib``
    MiB of zeros: a few hundred KiB that unpack to that many; ``extra`` files too); its METADATA."""
    import zipfile

    module = project.replace("-", "_")
    dist_info = f"{module}-1.0.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {project}\nVersion: 1.0\n"
    files = {
        f"{module}/__init__.py": "",
        f"{dist_info}/METADATA": metadata,
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        **(extra or {}),
    }
    with zipfile.ZipFile(where / f"{module}-1.0-py3-none-any.whl", "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
        if zeros_mib:
            files[f"{module}/zeros.bin"] = ""
            with wheel.open(f"{module}/zeros.bin", "w") as zeros:
                for _ in range(zeros_mib):
                    zeros.write(bytes(1 << 20))
        wheel.writestr(f"{dist_info}/RECORD", "".join(f"{name},,\n" for name in [*files, f"{dist_info}/RECORD"]))
    return metadata


def test_a_callers_build_that_unpacks_past_the_stores_room_is_stopped(
    store: str, small: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A wheel is a zip: a small download that unpacks to any size filled the disk, the limit
    # being checked only before a build began.
    links = tmp_path / "links"
    links.mkdir()
    _wheel(links, "stockade-bomb-probe", zeros_mib=200)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    held = sum(e.size_bytes for e in environments.listing()) >> 20
    monkeypatch.setenv("STOCKADE_ENV_STORE_LIMIT_MB", str(held + 50))
    monkeypatch.setattr(settings, "_serving", True)
    monkeypatch.setenv("STOCKADE_BUILD_PACKAGES", "1")
    policy = Policy(packages=["stockade-bomb-probe"])
    with pytest.raises(PolicyError, match=r"the build stopped at \d+ MiB, past the \d+ MiB left of the store's limit"):
        environments.share(policy)
    assert not os.path.isdir(environments.env_path(policy.environment_id or ""))
    assert os.listdir(os.path.join(store, "tmp")) == []


def test_a_callers_build_gives_pip_none_of_the_hosts_secrets_and_the_caller_none_of_its_output(
    store: str, small: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A wheel's dependency named by URL is built from source whatever --only-binary says: its build
    # code ran with the daemon's whole environment, and its output came back in the caller's error.
    import tarfile

    seen = tmp_path / "seen.json"
    setup = (
        "import json, os, sys\n"
        f"json.dump(sorted(os.environ), open({str(seen)!r}, 'w'))\n"
        "print('LEAKED', os.environ.get('CLOUD_SECRET_KEY'))\nsys.exit(1)\n"
    )
    sdist = tmp_path / "stockade-leak-src-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        info = "Metadata-Version: 2.1\nName: stockade-leak-src\nVersion: 1.0\n"
        for name, text in {"setup.py": setup, "PKG-INFO": info}.items():
            data = text.encode()
            member = tarfile.TarInfo(f"stockade-leak-src-1.0/{name}")
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    links = tmp_path / "links"
    links.mkdir()
    _wheel(links, "stockade-leak-probe", extra={
        "stockade_leak_probe-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: stockade-leak-probe\n"
        f"Version: 1.0\nRequires-Dist: stockade-leak-src @ file://{sdist}\n"})  # fmt: skip
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.setenv("CLOUD_SECRET_KEY", "hunter2-cloud")
    monkeypatch.setattr(settings, "_serving", True)
    monkeypatch.setenv("STOCKADE_BUILD_PACKAGES", "1")
    with pytest.raises(PolicyError, match=r"pip could not install them \(exit 1\).*in the host's log") as refused:
        environments.share(Policy(packages=["stockade-leak-probe"]))
    assert "LEAKED" not in str(refused.value) and "hunter2" not in str(refused.value)
    environment = json.loads(seen.read_text())  # the build's code ran: what it could read
    assert "CLOUD_SECRET_KEY" not in environment and "PIP_FIND_LINKS" in environment, environment


def test_a_process_that_serves_callers_builds_for_them_only_where_its_operator_said_so(
    store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the daemon read STOCKADE_BUILD_PACKAGES (into a module global whose default was on): a Ray
    # node's actor, which serves callers too, ran pip on its host for any caller's packages=.
    monkeypatch.setattr(settings, "_serving", True)
    monkeypatch.delenv("STOCKADE_BUILD_PACKAGES", raising=False)
    with pytest.raises(PolicyError, match="STOCKADE_BUILD_PACKAGES=0"):
        environments.share(Policy(packages=["stockade-never-built"]))


def test_a_callers_pip_reads_the_settings_the_environments_id_counts() -> None:
    # The id counts every pip.conf pip would read ($XDG_CONFIG_DIRS' included): pip run without that
    # variable read another index than the one the id said.
    from stockade.environment_build import pip_environment

    host = {"XDG_CONFIG_DIRS": "/etc/mirror", "PIP_INDEX_URL": "https://mirror/simple", "https_proxy": "http://p:3128",
            "AWS_SECRET_ACCESS_KEY": "k", "DAEMON_TOKEN": "t", "PATH": "/usr/bin"}  # fmt: skip
    assert pip_environment(host) == {
        k: v for k, v in host.items() if k not in ("AWS_SECRET_ACCESS_KEY", "DAEMON_TOKEN")
    }


def test_failed_builds_leave_a_bounded_trace(store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each id tried left a lock file in the store and an entry in memory, for the process's life:
    # each spelling of a caller's failing requirements is an id of its own.
    monkeypatch.setattr(environments, "LOCK_FILES", 2)
    monkeypatch.setattr(environments, "MAX_FAILURES", 3)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))  # empty: nothing is found
    locks = os.path.join(store, "locks")
    before = set(os.listdir(locks)) if os.path.isdir(locks) else set()
    for n in range(6):
        with pytest.raises(PolicyError, match="pip could not install them"):
            environments.build([f"stockade-missing-{n}"])
    made = set(os.listdir(locks)) - before
    assert made <= {"env-0000.lock", "env-0001.lock"}, made
    assert len(environments._failures) <= 3


def test_a_package_whose_files_lie_too_deep_is_stopped_and_leaves_nothing(
    store: str, small: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Python's walks of a tree recurse: a wheel 1,600 directories deep broke the build's walk, its
    # clean-up and, left behind, every later build's sweep. No package needs 64 levels.
    links = tmp_path / "links"
    links.mkdir()
    _wheel(links, "stockade-deep-probe", extra={"stockade_deep_probe/" + "d/" * 100 + "f.py": ""})
    _wheel(links, "stockade-plain-probe")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    with pytest.raises(PolicyError, match=r"the build stopped: its files lie more than 64 directories deep"):
        environments.build(["stockade-deep-probe"], name="deep")
    assert os.listdir(os.path.join(store, "tmp")) == []
    assert environments.build(["stockade-plain-probe"])  # and the store goes on


def test_a_tree_of_any_depth_is_removed(tmp_path: Path) -> None:
    # Left by a build (a SIGKILLed one's), deeper than Python's recursion: the sweep removes it.
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(1500):
        os.mkdir("d", 0o555, dir_fd=fd)  # and read-only, as a finished build's
        below = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = below
    os.close(os.open("f", os.O_CREAT | os.O_WRONLY, 0o444, dir_fd=fd))
    os.close(fd)
    environment_build.remove_tree(str(tmp_path / "d"))
    assert os.listdir(tmp_path) == []


def test_a_file_system_that_counts_no_inodes_builds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # btrfs, or a tmpfs of nr_inodes=0, says 0 inodes free of 0: every build was refused as out of them.
    real = os.statvfs(tmp_path)
    uncounted = os.statvfs_result((real.f_bsize, real.f_frsize, real.f_blocks, real.f_bfree, real.f_bavail,
                                   0, 0, 0, real.f_flag, real.f_namemax))  # fmt: skip
    monkeypatch.setattr(environment_build.os, "statvfs", lambda path: uncounted)
    monkeypatch.setattr(environment_build, "MIN_FREE_BYTES", 0)
    environment_build._within_room(str(tmp_path), None)  # nothing raised
    counted = os.statvfs_result((*uncounted[:5], 1000, 10, 10, *uncounted[8:]))
    monkeypatch.setattr(environment_build.os, "statvfs", lambda path: counted)
    with pytest.raises(PolicyError, match="10 files free"):
        environment_build._within_room(str(tmp_path), None)


@pytest.mark.skipif(os.getuid() != 0, reason="a tree of another user's is made by root")
def test_a_tree_with_directories_its_user_may_not_read_is_removed_as_far_as_it_may_be() -> None:
    # The walk raised on a directory it could not list (mode 0300), so a failed build's clean-up
    # raised in its turn, and a store's count of builds under way (another user's among them) failed.
    import tempfile

    where = tempfile.mkdtemp(prefix="stockade-tree-")
    try:
        os.chmod(where, 0o755)
        tree = os.path.join(where, "t")
        os.makedirs(os.path.join(tree, "a", "b", "c"))
        open(os.path.join(tree, "a", "b", "c", "f"), "w").close()
        os.chmod(os.path.join(tree, "a", "b"), 0o300)
        for top, dirs, files in os.walk(where):
            for name in [top, *[os.path.join(top, n) for n in dirs + files]]:
                os.chown(name, 65534, 65534)
        script = ("import sys; from stockade import environment_build as b\n"
                  "print(b._size(sys.argv[1])[1]); b.remove_tree(sys.argv[1]); print('removed')")  # fmt: skip
        out = subprocess.run([sys.executable, "-c", script, tree], user=65534, group=65534, extra_groups=[],
                             capture_output=True, text=True, timeout=60, cwd="/")  # fmt: skip
        assert out.returncode == 0 and out.stdout.split()[1:] == ["removed"], out.stderr
        assert not os.path.exists(tree)  # its owner made each directory readable on the way down
    finally:
        environment_build.remove_tree(where)


def test_a_callers_build_of_more_files_than_it_may_make_is_stopped(
    store: str, small: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Empty files take the disk's inodes, not its bytes: 80,000 were counted as 2.9 MB of a caller's
    # 10 MiB (their directories, and inodes, not at all).
    links = tmp_path / "links"
    links.mkdir()
    _wheel(links, "stockade-files-probe", extra={f"stockade_files_probe/f{i}.txt": "" for i in range(300)})
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.setattr(environment_build, "MAX_CALLER_FILES", 200)
    monkeypatch.setattr(settings, "_serving", True)
    monkeypatch.setenv("STOCKADE_BUILD_PACKAGES", "1")
    policy = Policy(packages=["stockade-files-probe"])
    with pytest.raises(PolicyError, match=r"the build stopped at \d+ files, past the 200 a caller's build may make"):
        environments.share(policy)
    assert os.listdir(os.path.join(store, "tmp")) == []
    environments._failures.clear()  # (a failed build is not tried again for a minute)
    monkeypatch.setattr(settings, "_serving", False)
    assert environments.build(["stockade-files-probe"])  # an administrator's: no such cap


def test_a_callers_build_keeps_no_pip_cache_and_a_pip_that_cannot_start_is_a_failed_build(
    store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pip caches what it downloads outside the store, uncounted: a caller's build keeps nothing there.
    seen: list[dict[str, str]] = []

    def cannot_start(*args: Any, **kwargs: Any) -> None:
        seen.append(kwargs["env"])
        raise OSError(errno.E2BIG, "Argument list too long")

    monkeypatch.setattr(environment_build.subprocess, "Popen", cannot_start)
    for budget in (None, 1 << 30):
        with pytest.raises(PolicyError, match="packages: pip could not start: Argument list too long"):
            environments.build(["six>=0.0.0.1"] if budget else ["six>=0.0.0.2"], budget=budget)
    assert [env.get("PIP_NO_CACHE_DIR") for env in seen] == [None, "1"]
    assert os.listdir(os.path.join(store, "tmp")) == []


def test_no_build_leaves_the_disk_without_room(store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    links = tmp_path / "links"
    links.mkdir()
    _wheel(links, "stockade-bomb-probe", zeros_mib=1)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    # As if the disk were that near full: an administrator's build too stops short of it.
    monkeypatch.setattr(environment_build, "MIN_FREE_BYTES", shutil.disk_usage(store).free + (1 << 30))
    with pytest.raises(PolicyError, match=r"the build stopped: the disk holding the environment store .* files free"):
        environments.build(["stockade-bomb-probe"], name="no-room")
    assert os.listdir(os.path.join(store, "tmp")) == []


def test_bytecode_is_made_naming_the_path_inside(store: str, small: str) -> None:
    import marshal

    cache = os.path.join(environments.env_path(small), "python", "__pycache__")
    (made,) = [n for n in os.listdir(cache) if n.startswith("six.")]
    with open(os.path.join(cache, made), "rb") as f:
        code = marshal.loads(f.read()[16:])
    assert code.co_filename == "/opt/stockade/env/python/six.py"  # where isolates see it, never the store


def test_a_wheel_whose_bytecode_folds_past_the_room_is_stopped_while_it_compiles(
    store: str, small: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only pip was watched: a constant folded at compile time is 4 KiB from 16 bytes of source, and
    # a wheel of a few hundred KB filled a disk with bytecode before the build's room was looked at.
    links = tmp_path / "links"
    links.mkdir()
    folded = "".join(f"a{i} = 'k{i:05}' * 585\n" for i in range(2000))  # ~7 MB of bytecode a module
    _wheel(links, "stockade-fold-probe", extra={f"stockade_fold_probe/m{i}.py": folded for i in range(30)})
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    held = sum(e.size_bytes for e in environments.listing()) >> 20
    monkeypatch.setenv("STOCKADE_ENV_STORE_LIMIT_MB", str(held + 20))
    monkeypatch.setattr(settings, "_serving", True)
    monkeypatch.setenv("STOCKADE_BUILD_PACKAGES", "1")
    policy = Policy(packages=["stockade-fold-probe"])
    with pytest.raises(PolicyError, match=r"the build stopped at (\d+) MiB, past the \d+ MiB left") as stopped:
        environments.share(policy)
    at = int(str(stopped.value).split("stopped at ")[1].split(" MiB")[0])
    assert at < 120, stopped.value  # stopped on the way (all of it compiled is ~240 MiB)
    assert not os.path.isdir(environments.env_path(policy.environment_id or ""))
    assert os.listdir(os.path.join(store, "tmp")) == []


def test_the_bytecode_step_is_held_to_the_builds_time_with_every_process_it_started(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its timeout was one of its own (the build's time twice over), raised as no PolicyError (not
    # remembered: tried again at once), and killed compileall alone: its workers went on writing.
    pid_file = tmp_path / "worker.pid"
    stalls = f"import os, time\nif os.fork() == 0:\n    open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
    stalls += "time.sleep(3600)\n"
    monkeypatch.setattr(environment_build, "_COMPILE", stalls)
    monkeypatch.setattr(environment_build, "_pip", lambda work, *_: os.mkdir(os.path.join(work, "python")))
    monkeypatch.setenv("STOCKADE_ENV_BUILD_TIMEOUT", "2")
    with pytest.raises(PolicyError, match=r"did not finish within 2 s \(its bytecode"):
        environments.build(["stockade-stall-probe"], name="stalls")
    worker = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{worker}") and time.monotonic() < deadline:  # (reaped by init)
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{worker}"), "the bytecode step's worker outlived the build"
    assert os.listdir(os.path.join(store, "tmp")) == []


def test_pips_temporary_files_go_with_its_build(store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A pip that is killed (^C, the build's timeout) leaves its temporary directories: they are made
    # inside the build's own, which goes with it, not in /tmp.
    leaves = "import sys, tempfile; print('TMP', tempfile.mkdtemp(prefix='pip-unpack-')); sys.exit(9)"
    monkeypatch.setattr(environment_build, "_pip_command", lambda: (sys.executable, "-c", leaves))
    with pytest.raises(PolicyError, match=r"exit 9") as failed:
        environments.build(["stockade-temp-probe"], name="leaves-temp")
    (left,) = [line.split()[1] for line in str(failed.value).splitlines() if line.startswith("TMP ")]
    assert left.startswith(os.path.join(store, "tmp") + os.sep), left
    assert not os.path.exists(left) and os.listdir(os.path.join(store, "tmp")) == []


def test_a_failed_build_says_what_pip_said(
    store: str, manager: RuntimeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No index at all, so that pip fails at once, with or without a network.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", store)
    with pytest.raises(PolicyError, match=r"pip could not install them(.|\n)*stockade-no-such-package") as failed:
        with stockade.Sandbox(runtime="fake", packages=["stockade-no-such-package"], manager=manager):
            pass
    assert "(wheels only: stockade env build --allow-source takes sdists)" in str(failed.value)
    assert os.listdir(os.path.join(store, "tmp")) == []
    # Asked again at once, it is refused with what pip said then, saying so.
    with pytest.raises(PolicyError, match=r"that was pip \d+ s ago: the same build is not tried again for 60 s"):
        stockade.Sandbox(runtime="fake", packages=["stockade-no-such-package"], manager=manager)


def test_an_index_out_of_reach_is_named_as_the_cause(
    store: str, manager: RuntimeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as closed:  # a port nothing listens on: pip's connections are refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # this host's own indexes and links are not asked
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{port}/simple")
    monkeypatch.setenv("PIP_RETRIES", "1")  # pip says why it retries, not that it gave up on an index
    with pytest.raises(PolicyError, match=r"\(it could not reach the package index: this host's pip settings"):
        stockade.Sandbox(runtime="fake", packages=["stockade-unreachable-package"], manager=manager)
    # `stockade env build` shows pip's output as it comes, and still names the cause once pip has failed.
    built = subprocess.run(
        [sys.executable, "-m", "stockade.cli", "env", "build", "far", "stockade-unreachable-too"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert built.returncode == 125, built
    assert "stockade: packages: pip could not install them (exit 1) (it could not reach the package index" in (
        built.stderr
    )
    assert "Connection refused" in built.stderr + built.stdout  # pip's own words, shown as they came


# ---- inside each runtime -------------------------------------------------------------------------------


@pytest.mark.parametrize("runtime", ["process", "gvisor"])
def test_the_environment_inside(runtime: str, store: str, small: str, manager: RuntimeManager) -> None:
    require(runtime)
    with stockade.Sandbox(runtime=runtime, environment_name="small", manager=manager) as sb:
        check_inside(sb, store, small)
        r = sb.run_code("print(1)")
        assert r.policy_digest == sb.policy.digest and sb.policy.environment_id == small


@pytest.mark.timeout(300)
def test_the_environment_inside_a_microvm(store: str, small: str, manager: RuntimeManager) -> None:
    require("microvm")
    with stockade.Sandbox(runtime="microvm", environment_name="small", timeout_seconds=120, manager=manager) as sb:
        check_inside(sb, store, small)


@pytest.mark.parametrize("runtime", ["process", "gvisor"])
def test_etc_without_an_environment(runtime: str, manager: RuntimeManager) -> None:
    require(runtime)
    code = INSIDE.replace("import six, tabulate", "six = tabulate = os")
    r = stockade.run_code(code, runtime=runtime, manager=manager)
    assert r.success, r.stderr
    seen = json.loads(r.stdout)
    check_etc(seen)
    assert "PYTHONPATH" not in seen["environ"] and "MPLCONFIGDIR" not in seen["environ"]


def test_packages_build_once_and_are_reused(
    store: str, monkeypatch: pytest.MonkeyPatch, manager: RuntimeManager
) -> None:
    require("process")
    builds = []
    real = environment_build.make
    monkeypatch.setattr(environment_build, "make", lambda *a: (builds.append(a[0]), real(*a))[1])
    code = "import termcolor, six; print(termcolor.__file__)"
    with stockade.Sandbox(runtime="process", packages=["six", "termcolor"], manager=manager) as sb:
        assert sb.run_code(code).stdout == "/opt/stockade/env/python/termcolor/__init__.py\n"
        first = sb.policy.environment_id
    r = stockade.run_code(code, runtime="process", packages=["termcolor", "six"], manager=manager)
    assert r.stdout == "/opt/stockade/env/python/termcolor/__init__.py\n"
    assert builds == [first]  # built on first use only
    assert r.policy_digest == Policy(runtime="process", packages=["six", "termcolor"]).digest


def test_the_pool_keeps_isolates_per_environment(small: str) -> None:
    require("process")
    manager = RuntimeManager(pool_size=1)
    try:
        runtime: Any = manager.get("process")
        policy = Policy(runtime="process", environment_name="small")
        for _ in range(2):  # two misses: the shape joins the pool
            assert runtime.pool_statistics() is not None
            stockade.run_code("pass", policy=policy, manager=manager)
        runtime.wait_idle()  # the pool refills once the used isolate is gone
        assert runtime.wait_ready(60)
        ready = runtime._pool.ready(policy)
        assert ready and all(sb.policy.environment_id == small for sb in ready)
        assert all(sb.policy.environment_id is None for sb in runtime._pool.ready())  # the default shape's
        served = runtime.pool_statistics()["served"]
        r = stockade.run_code("import six; print(six.__file__)", policy=policy, manager=manager)
        assert r.stdout == "/opt/stockade/env/python/six.py\n"
        assert runtime.pool_statistics()["served"] == served + 1
    finally:
        manager.close()


def test_through_the_daemon(store: str, small: str) -> None:
    require("process")
    from stockade.client import Client
    from tests.daemon_harness import start_daemon

    daemon = start_daemon(env={"STOCKADE_ENV_STORE": store})
    with Client(daemon.socket_path, timeout=300) as client:
        r = client.execute(
            code="import six; print(six.__file__)", policy={"runtime": "process", "environment_name": "small"}
        )
        assert r.stdout == "/opt/stockade/env/python/six.py\n", r
        # By default a daemon builds nothing for a caller: pip would run on its host, as long as the caller likes.
        with pytest.raises(PolicyError, match="STOCKADE_BUILD_PACKAGES=0"):
            client.execute(code="1", policy={"runtime": "process", "packages": ["pyparsing"]})
    assert daemon.stop() == 0
    daemon = start_daemon(env={"STOCKADE_ENV_STORE": store, "STOCKADE_BUILD_PACKAGES": "1"})
    with Client(daemon.socket_path, timeout=300) as client:
        # Built by the daemon on first use, where its operator allows it.
        r = client.execute(code="import pyparsing; print(1)", policy={"runtime": "process", "packages": ["pyparsing"]})
        assert r.stdout == "1\n", r
    assert environments.content_id(("pyparsing",)) in {e.id for e in environments.listing()}
    assert daemon.stop() == 0


@pytest.mark.parametrize(
    "requirement",
    ["evil @ file:///tmp/evilpkg", "evil @ https://example.invalid/evil-1.0.tar.gz", "evil@git+https://x/y"],
)
def test_a_direct_reference_is_refused_unless_an_administrator_allows_source_builds(
    store: str, requirement: str
) -> None:
    """pip builds a direct reference from source whatever --only-binary says: its build code would run
    on the host, as the daemon's user. Only `stockade env build --allow-source` takes one."""
    with pytest.raises(PolicyError, match="direct reference"):
        Policy(packages=[requirement])
    with pytest.raises(ValueError, match="direct reference"):
        environments.build([requirement])
    assert environments.normalise([requirement], allow_source=True)


# ---- pandas and matplotlib -------------------------------------------------------------------------------

PLOT = textwrap.dedent("""
    import pandas as pd
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    df = pd.read_csv("/work/data.csv")
    ax = df.plot(x="day", y="sales", kind="line", title="sales")
    plt.savefig("/work/sales.png", dpi=72)
    print(int(df.sales.sum()))
""")


@pytest.mark.timeout(600)
def test_csv_to_pandas_to_matplotlib_png(ds: str, manager: RuntimeManager) -> None:
    require("process")
    policy = Policy(runtime="process", environment_name="ds", memory_mb=1024, timeout_seconds=120)
    with stockade.Sandbox(policy, manager=manager) as sb:
        sb.write_file("/work/data.csv", "day,sales\n1,10\n2,30\n3,20\n")
        r = sb.run_code(PLOT)
        assert (r.stdout, r.stderr, r.exit_code) == ("60\n", "", 0)  # no font-cache or config warnings
        png = sb.read_file("/work/sales.png")
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
        # The font list is the environment's, copied in, not rebuilt by the run.
        cache = os.path.join(environments.env_path(ds), "cache", "matplotlib")
        (name,) = os.listdir(cache)
        with open(os.path.join(cache, name), "rb") as f:
            assert sb.read_file(f"/tmp/.cache/matplotlib/{name}") == f.read()
