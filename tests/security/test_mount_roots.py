"""STOCKADE_MOUNT_ROOTS: a host that names the directories it shares shares nothing else, whatever
path a caller names, and wherever a link of its own would lead."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import httpx
import pytest

import stockade
from stockade.environments import store_root
from stockade.errors import PolicyError
from stockade.policy import Mount
from stockade.runtimes.manager import RuntimeManager
from stockade.runtimes.shared_paths import check_mount_sources
from stockade.settings import ConfigError, Settings
from tests.daemon_harness import start_daemon


@pytest.fixture
def tree() -> Iterator[tuple[str, str]]:
    """``(allowed, outside)``: two directories open to others, each holding a file ``f``."""
    top = tempfile.mkdtemp(prefix="stockade-roots-")
    try:
        os.chmod(top, 0o755)
        for name in ("allowed", "outside"):
            os.mkdir(os.path.join(top, name), 0o755)
            with open(os.path.join(top, name, "f"), "w") as f:
                f.write(f"{name}\n")
            os.chmod(os.path.join(top, name, "f"), 0o644)
        yield os.path.join(top, "allowed"), os.path.join(top, "outside")
    finally:
        shutil.rmtree(top)


def test_only_paths_below_the_roots_are_shared(
    process_runtime: str, manager: RuntimeManager, tree: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    allowed, outside = tree
    monkeypatch.setenv("STOCKADE_MOUNT_ROOTS", allowed)
    r = stockade.run(["cat", "/data/f"], manager=manager, filesystem_access=[f"{allowed}:/data"])
    assert r.stdout == "allowed\n", r.summary() + r.stderr
    with pytest.raises(PolicyError, match=f"{outside} is outside what this host shares"):
        stockade.run(["true"], manager=manager, filesystem_access=[f"{outside}:/data"])
    # Named outside, it is refused unread: a link there that leads inside is not followed either.
    os.symlink(os.path.join(allowed, "f"), os.path.join(outside, "way-in"))
    with pytest.raises(PolicyError, match=f"{outside}/way-in is outside what this host shares"):
        stockade.run(["true"], manager=manager, filesystem_access=[f"{outside}/way-in:/data"])
    with pytest.raises(PolicyError, match=f"{outside}/nothing is outside what this host shares"):
        stockade.run(["true"], manager=manager, filesystem_access=[f"{outside}/nothing:/data"])
    # Named below a root, a link leads out of it: what it leads to is what would be mounted.
    os.symlink(outside, os.path.join(allowed, "way-out"))
    with pytest.raises(PolicyError, match=f"way-out leads to {outside}, outside"):
        stockade.run(["true"], manager=manager, filesystem_access=[f"{allowed}/way-out:/data"])
    # A name that only begins like a root is not below it.
    os.mkdir(f"{allowed}-not", 0o755)
    with pytest.raises(PolicyError, match=r"allowed-not is outside what this host shares"):
        stockade.run(["true"], manager=manager, filesystem_access=[f"{allowed}-not:/data"])


def test_none_shares_nothing_but_the_hosts_own_environments(
    tree: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    allowed, _ = tree
    monkeypatch.setenv("STOCKADE_MOUNT_ROOTS", "none")
    with pytest.raises(PolicyError, match=r"STOCKADE_MOUNT_ROOTS=none\)"):
        check_mount_sources(stockade.Policy(filesystem_access=[f"{allowed}:/data"]))
    # An environment of the store is shared as the runtime mounts it (environments.share), read-only
    # where environments go; the store itself, or one written, or elsewhere inside, is not. No caller
    # names that place at all: one that did passed here as the store's own (a build in progress).
    env_dir = tempfile.mkdtemp(dir=_store("envs"))
    try:
        os.chmod(env_dir, 0o755)
        base = stockade.Policy()
        check_mount_sources(base.with_mount(Mount(source=env_dir, target="/opt/stockade/env")))
        for mount in (Mount(source=env_dir, target="/opt/stockade/env", writable=True),
                      Mount(source=store_root(), target="/opt/stockade/env")):  # fmt: skip
            with pytest.raises(PolicyError, match="outside what this host shares"):
                check_mount_sources(base.with_mount(mount))
        with pytest.raises(PolicyError, match="outside what this host shares"):
            check_mount_sources(stockade.Policy(filesystem_access=[f"{env_dir}:/data"]))
        with pytest.raises(PolicyError, match="is the environment's place"):
            stockade.Policy(filesystem_access=[f"{env_dir}:/opt/stockade/env"])
    finally:
        os.rmdir(env_dir)


def _store(*parts: str) -> str:
    path = os.path.join(store_root(), *parts)
    os.makedirs(path, mode=0o755, exist_ok=True)
    return path


def test_a_malformed_root_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="STOCKADE_MOUNT_ROOTS entry 'srv' is not an absolute path"):
        Settings.load({"STOCKADE_MOUNT_ROOTS": "/data,srv"})
    assert Settings.load({"STOCKADE_MOUNT_ROOTS": "/data/, /srv/x/.."}).mount_roots == ("/data", "/srv")
    assert Settings.load({}).mount_roots is None


def test_a_daemons_http_caller_is_refused_outside_the_roots(process_runtime: str, tree: tuple[str, str]) -> None:
    allowed, outside = tree
    daemon = start_daemon(http="127.0.0.1:0", env={"STOCKADE_MOUNT_ROOTS": allowed})
    try:
        assert daemon.http_url is not None
        with httpx.Client(base_url=daemon.http_url, timeout=60) as http:

            def execute(source: str) -> httpx.Response:
                body = {"agent_id": "tester", "command": ["cat", "/data/f"], "filesystem_access": [f"{source}:/data"]}
                return http.post("/api/v1/sandbox/execute", json=body)

            ok = execute(allowed)
            assert ok.status_code == 200 and ok.json()["output"] == "allowed\n", ok.text
            refused = execute(outside)
            assert (refused.status_code, refused.json()["code"]) == (422, "policy"), refused.text
            assert f"{outside} is outside what this host shares" in refused.json()["error"]
            assert "outside\n" not in refused.text
    finally:
        assert daemon.stop() == 0, daemon.logs()
        daemon.cleanup()


@pytest.mark.skipif(
    os.getuid() != 0, reason="the walk of a shared path's parents is a root daemon's (it can read anything)"
)
def test_a_caller_learns_nothing_of_what_a_closed_directory_holds(tree: tuple[str, str]) -> None:
    """A root daemon said "does not exist" of a missing path below a 0700 directory, and "not
    searchable" of a present one: any caller could list /root by asking. One answer for both,
    named or reached through a link of the caller's."""
    allowed, _ = tree
    closed = os.path.join(allowed, "closed")
    os.mkdir(closed, 0o700)
    with open(os.path.join(closed, "there"), "w") as f:
        f.write("x")
    os.symlink(os.path.join(closed, "there"), os.path.join(allowed, "to-there"))
    os.symlink(os.path.join(closed, "missing"), os.path.join(allowed, "to-missing"))
    said = []
    for name in ("closed/there", "closed/missing", "to-there", "to-missing"):
        with pytest.raises(PolicyError) as refused:
            check_mount_sources(stockade.Policy(filesystem_access=[f"{allowed}/{name}:/data"]))
        said.append(str(refused.value).replace(name, "NAME"))
    assert len(set(said)) == 1 and f"{closed} is not searchable by others" in said[0], said
    # Nor where a link inside it leads, reached through a link of the caller's: root's realpath went
    # through the closed directory, and the error named the hidden link's target.
    hidden_target = os.path.join(allowed, "..", "elsewhere-" + os.path.basename(closed))
    os.symlink(hidden_target, os.path.join(closed, "hidden"))
    os.symlink(os.path.join(closed, "hidden"), os.path.join(allowed, "via"))
    with pytest.raises(PolicyError) as refused:
        check_mount_sources(stockade.Policy(filesystem_access=[f"{allowed}/via/x:/data"]))
    assert "elsewhere" not in str(refused.value) and f"{closed} is not searchable by others" in str(refused.value)


def test_no_writable_share_holds_the_environment_store_or_lies_in_it(store: str) -> None:
    # Rootless, the store's files are the isolate's own uid's: read-only modes were no bar to a chmod,
    # and a sandbox sharing its cache directory rewrote a package later sandboxes imported.
    assert os.path.realpath(store_root()) == os.path.realpath(store)
    store = os.path.realpath(store)
    os.makedirs(os.path.join(store, "envs"), exist_ok=True)
    for source in (os.path.dirname(store), store, os.path.join(store, "envs")):
        policy = stockade.Policy(filesystem_access=[f"{source}:/data:rw"])
        with pytest.raises(PolicyError, match=r"holds the Python environments' store \(.*\) or lies in it"):
            check_mount_sources(policy)
