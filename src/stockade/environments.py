"""Python environments: packages installed on the host, read-only and content-addressed,
mounted into every isolate at ``/opt/stockade/env`` (docs/environments.md).

An environment is a ``pip install --target`` tree made for the isolate's own
interpreter (the host's ``/usr/bin/python3``) with the host's pip configuration
(pip.conf, ``PIP_INDEX_URL``, find-links, constraints). Its id is a hash of what
decides its content: the normalised requirements, the interpreter's version
and ABI, the pip options that choose packages, and whether sdists were allowed.
Wheels only by default: an sdist's build code would run on the host, outside
any sandbox. Store (``$STOCKADE_ENV_STORE``; else ``/var/cache/stockade/envs``
as root, since every sandbox uid must read it; else ``$XDG_CACHE_HOME/stockade/envs``)::

    envs/<id>/       python/ (PYTHONPATH), bin/ (console scripts), cache/ (copied to
                     $XDG_CACHE_HOME in each isolate), stockade-env.json; read-only
    names/<name>     the id a name points at (several names may share one)
    locks/<id>.lock  flock'd while <id> is built or removed
    tmp/             builds under way (renamed into envs/ when whole) and removals
"""

from __future__ import annotations

import base64
import configparser
import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import PolicyError
from .runtimes.process.zygote import system_python
from .settings import current

if TYPE_CHECKING:
    from .policy import Policy

ENV_ROOT = "/opt/stockade/env"  # where every runtime mounts the environment (agent/confine.py says it too)
CACHE_HOME = "/tmp/.cache"  # XDG_CACHE_HOME inside; the environment's cache/ is copied there
BASE_PATH = "/usr/local/bin:/usr/bin:/bin"  # runtimes/base.py's BASE_ENV["PATH"]
SYSTEM_STORE = "/var/cache/stockade/envs"
MANIFEST = "stockade-env.json"
BUILD_TIMEOUT_S = 600.0  # STOCKADE_ENV_BUILD_TIMEOUT: the most one build may take
FAILURE_MEMORY_S = 60.0  # a failed build of the same id is refused this long without running pip again
log = logging.getLogger("stockade.environments")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ID = re.compile(r"^[0-9a-f]{32}$")
_REQ = re.compile(r"^([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*(\[[A-Za-z0-9._,\s-]*\])?\s*(.*)$")
_CLAUSE = r"(?:===|~=|==|!=|<=|>=|<|>)[A-Za-z0-9.*+!_-]+"
_SPEC = re.compile(rf"^(?:{_CLAUSE}(?:,{_CLAUSE})*)?$")
_MARKER = re.compile(r"^[\w\s.<>=!~\"'()-]+$")
# pip options (config files, PIP_* variables) that change which packages a requirement list installs.
_PIP_KEYS = ("index-url", "extra-index-url", "find-links", "no-index", "constraint", "pre", "only-binary",
             "no-binary", "prefer-binary", "use-feature")  # fmt: skip
_PLAIN = re.compile(r"[\w+-][\w.+-]*(/[\w+-][\w.+-]*)*")
_failures: dict[str, tuple[float, str]] = {}
# Whether a policy's ``packages`` may build its environment on first use: on in a
# process of the caller's own (the SDK, the CLI); the daemon sets it from
# STOCKADE_BUILD_PACKAGES (off by default: a build runs pip on the host for the caller).
BUILD_ON_DEMAND = True


def store_root() -> str:
    configured = current().env_store
    if configured:
        return configured
    if os.getuid() == 0:
        return SYSTEM_STORE  # not under /root (0700): each sandbox's own uid reads it
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "stockade", "envs")


def _dir(*parts: str) -> str:
    path = os.path.join(store_root(), *parts)
    os.makedirs(path, mode=0o755, exist_ok=True)
    return path


def env_path(env_id: str) -> str:
    return os.path.join(store_root(), "envs", env_id)


# ---- what an environment is: requirements, interpreter, pip's configuration ------------


def normalise(requirements: Iterable[str], allow_source: bool = False) -> tuple[str, ...]:
    """PEP 508 requirements, one form each (project names canonical, spaces dropped), sorted, unique.

    ``NAME @ URL`` only with ``allow_source``: pip builds a direct reference from
    source whatever ``--only-binary`` says, running its build code on the host.
    pip options, paths and bare URLs are refused: indexes come from pip's own
    configuration, and a path would not say what the environment holds."""
    out = set()
    for raw in requirements:
        if not isinstance(raw, str) or "\0" in raw or "\n" in raw:
            raise ValueError(f"{raw!r} is not a requirement")
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        if line.startswith("-"):
            raise ValueError(f"{raw!r}: pip options are not taken here; set them in pip's configuration "
                             "(pip.conf, PIP_INDEX_URL, PIP_FIND_LINKS)")  # fmt: skip
        match = _REQ.match(line)
        if match is None:
            raise ValueError(f"{raw!r} is not a requirement (NAME[extras][version][; marker], or NAME @ URL)")
        name, extras, rest = match.groups()
        name = _canonical(name)
        if extras:
            extras = "[" + ",".join(sorted({_canonical(e.strip()) for e in extras[1:-1].split(",") if e.strip()})) + "]"
        if rest.startswith("@"):
            if not allow_source:
                raise ValueError(
                    f"{raw!r}: a direct reference (NAME @ URL) is built from source on the host; "
                    "name a project from the package index, or build it with `stockade env build --allow-source`"
                )
            url, _, marker = rest[1:].strip().partition(" ;")
            if not url or any(c.isspace() for c in url):
                raise ValueError(f"{raw!r}: NAME @ URL needs one URL")
            text = f"{name}{extras or ''} @ {url}"
        else:
            spec, _, marker = rest.partition(";")
            spec = "".join(spec.split())
            if not _SPEC.match(spec):
                raise ValueError(f"{raw!r}: {spec!r} is not a version specifier")
            text = name + (extras or "") + spec
        marker = " ".join(marker.split())
        if marker and not _MARKER.match(marker):
            raise ValueError(f"{raw!r}: {marker!r} is not an environment marker")
        out.add(text + (f" ; {marker}" if marker else ""))
    return tuple(sorted(out))


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@functools.lru_cache(maxsize=4)
def _python_identity(python: str, stamp: tuple[int, int]) -> dict[str, str]:
    code = ("import json, platform, sys, sysconfig; print(json.dumps({'version': '%d.%d.%d' % sys.version_info[:3], "
            "'soabi': sysconfig.get_config_var('SOABI') or '', 'platform': sysconfig.get_platform(), "
            "'libc': '-'.join(platform.libc_ver()), 'prefix': sys.prefix}))")  # fmt: skip
    try:
        out = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, timeout=60, check=True)
        return dict(json.loads(out.stdout))
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        raise PolicyError(f"packages: cannot ask {python} what it is: {exc}") from None


def python_identity() -> dict[str, str]:
    """The isolates' interpreter: version, ABI, platform, libc (what a wheel must fit)."""
    try:
        st = os.stat(system_python())
    except OSError as exc:
        raise PolicyError(f"packages: the isolates' interpreter {system_python()} is missing: {exc}") from None
    return _python_identity(system_python(), (st.st_mtime_ns, st.st_size))


def pip_settings() -> list[tuple[str, str]]:
    """The pip options that choose packages, as pip would read them here (its configuration
    files, global, site, user, PIP_CONFIG_FILE; then PIP_*), with each constraints file's content."""
    home = os.path.expanduser("~")
    files = [os.path.join(d, "pip", "pip.conf") for d in (os.environ.get("XDG_CONFIG_DIRS") or "/etc/xdg").split(":")]
    files += ["/etc/pip.conf", os.path.join(python_identity().get("prefix", "/usr"), "pip.conf")]
    user = os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    files += [os.path.join(home, ".pip", "pip.conf"), os.path.join(user, "pip", "pip.conf")]
    if os.environ.get("PIP_CONFIG_FILE", os.devnull) != os.devnull:
        files.append(os.environ["PIP_CONFIG_FILE"])
    settings: list[tuple[str, str]] = []
    for path in files:
        parser = configparser.RawConfigParser(strict=False)
        try:
            parser.read(path, encoding="utf-8")
        except (OSError, UnicodeError, configparser.Error):
            continue
        for section in ("global", "install"):
            if parser.has_section(section):
                for key, value in parser.items(section):
                    if key.lstrip("-").replace("_", "-") in _PIP_KEYS:
                        settings.append((key.lstrip("-").replace("_", "-"), value))
    for key in _PIP_KEYS:
        if (env_value := os.environ.get("PIP_" + key.upper().replace("-", "_"))) is not None:
            settings.append((key, env_value))
    for key, value in list(settings):
        if key == "constraint":
            for path in value.split():
                with contextlib.suppress(OSError):
                    with open(path, "rb") as f:
                        settings.append((f"constraint:{path}", hashlib.sha256(f.read()).hexdigest()))
    return settings


def content_id(requirements: tuple[str, ...], allow_source: bool = False) -> str:
    """The id of the environment ``requirements`` (normalised) make here."""
    identity = {k: v for k, v in python_identity().items() if k != "prefix"}
    what = {"requirements": list(requirements), "python": identity, "pip": pip_settings(), "sources": allow_source}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


# ---- names --------------------------------------------------------------------------------


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{name!r} is not an environment name (letters, digits, '.', '_', '-'; at most 64)")
    return name


def named(name: str) -> str | None:
    """The id ``name`` points at, or None."""
    try:
        with open(os.path.join(store_root(), "names", check_name(name))) as f:
            env_id = f.read().strip()
    except OSError:
        return None
    return env_id if _ID.match(env_id) else None


def names() -> dict[str, str]:
    """Every name, with the id it points at."""
    try:
        entries = sorted(os.listdir(os.path.join(store_root(), "names")))
    except OSError:
        return {}
    return {n: i for n in entries if _NAME.match(n) and (i := named(n))}


def _point(name: str, env_id: str) -> None:
    where = _dir("names")
    fd, tmp = tempfile.mkstemp(dir=where, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(env_id + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, os.path.join(where, name))  # atomic: a reader sees the old id or the new


# ---- what a Policy's fields resolve to ---------------------------------------------------


def existing(name: str) -> str:
    """The id of the built environment ``name`` points at; ValueError naming it if there is none."""
    env_id = named(name)
    if env_id is None or not os.path.isdir(env_path(env_id)):
        raise ValueError(f"{name!r} does not exist in {store_root()} "
                         f"(stockade env ls lists them; stockade env build {name} PACKAGE... makes it)")  # fmt: skip
    return env_id


def resolve(name: str | None, packages: tuple[str, ...], pinned: str | None) -> str | None:
    """The id of the environment a policy names (Policy's validator calls this on the host)."""
    if name is not None and packages:
        raise ValueError("give environment_name or packages, not both")
    if name is not None:
        return existing(name)
    if packages:
        return content_id(packages)
    if pinned is not None and not (_ID.match(pinned) and os.path.isdir(env_path(pinned))):
        raise ValueError(f"environment_id {pinned!r} is not in {store_root()} (stockade env ls lists them)")
    return pinned


def share(policy: Policy) -> Policy:
    """``policy`` with its environment among its shared paths, read-only at ``ENV_ROOT``, as
    every runtime mounts it (built first from ``packages`` if this is its first use)."""
    if policy.environment_id is None:
        return policy
    from .policy import Mount

    path = env_path(policy.environment_id)
    if not os.path.isdir(path):
        if not policy.packages:
            raise PolicyError(f"environment {policy.environment_id} is no longer in {store_root()} (stockade env ls)")
        if not BUILD_ON_DEMAND:
            raise PolicyError(
                f"packages: {', '.join(policy.packages)} is not built here, and this daemon builds no environment "
                "for a caller (STOCKADE_BUILD_PACKAGES=0): an administrator builds it with "
                f"`stockade env build NAME {' '.join(policy.packages)}`"
            )
        build(policy.packages, expected_id=policy.environment_id)
    if os.getuid() == 0:
        _check_open_to_others(path)
    mount = Mount(source=path, target=ENV_ROOT)
    return policy.model_copy(update={"filesystem_access": (*policy.filesystem_access, mount)})


def _check_open_to_others(path: str) -> None:
    # As root each isolate runs as a uid of its own, which reads the environment as "others".
    walked = ""
    for part in path.strip("/").split("/"):
        walked += "/" + part
        if not os.stat(walked).st_mode & stat.S_IXOTH:
            raise PolicyError(f"the environment store {store_root()} is not readable by the sandboxes' uids: "
                              f"{walked} is not searchable by others (set STOCKADE_ENV_STORE)")  # fmt: skip


def run_env(root: str = ENV_ROOT, cache: str = CACHE_HOME, path: str = BASE_PATH) -> dict[str, str]:
    """The variables every command and run_code of an isolate with an environment gets."""
    return {"PATH": f"{root}/bin:{path}", "PYTHONPATH": f"{root}/python", "XDG_CACHE_HOME": cache,
            "MPLCONFIGDIR": f"{cache}/matplotlib"}  # fmt: skip


# ---- building -------------------------------------------------------------------------------


def build(requirements: Iterable[str], name: str | None = None, allow_source: bool = False, verbose: bool = False,
          expected_id: str | None = None) -> str:  # fmt: skip
    """Build (or find) the environment of ``requirements``; point ``name`` at it. Returns its id.

    ``verbose``: pip writes to this terminal (its progress bars); otherwise its output
    is kept and its last lines are the error. Concurrent builds of one id wait on its
    lock and find it built."""
    reqs = normalise(requirements, allow_source)
    if not reqs:
        raise PolicyError("packages: no requirement given")
    if name is not None:
        check_name(name)
    env_id = expected_id or content_id(reqs, allow_source)
    if not os.path.isdir(env_path(env_id)):
        with _locked(env_id):
            if not os.path.isdir(env_path(env_id)):
                failed = _failures.get(env_id)
                if failed and time.monotonic() - failed[0] < FAILURE_MEMORY_S and not verbose:
                    raise PolicyError(failed[1])
                try:
                    _build(env_id, reqs, allow_source, verbose)
                except PolicyError as exc:
                    _failures[env_id] = (time.monotonic(), str(exc))
                    raise
    if name is not None:
        _point(name, env_id)
    return env_id


def _timeout() -> float:
    configured = current().env_build_timeout
    return configured if configured is not None else BUILD_TIMEOUT_S


@contextlib.contextmanager
def _locked(env_id: str) -> Iterator[None]:
    fd = os.open(os.path.join(_dir("locks"), env_id + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + _timeout()
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise PolicyError(f"environment {env_id}: another build held it past {_timeout():g} s") from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)  # drops the lock


def _build(env_id: str, reqs: tuple[str, ...], allow_source: bool, verbose: bool) -> None:
    _sweep_tmp()
    work = tempfile.mkdtemp(prefix=f"{env_id}.{os.getpid()}.", dir=_dir("tmp"))
    os.chmod(work, 0o755)  # noqa: S103 - every sandbox uid reads it (the cache step mounts it)
    if not verbose:
        log.warning("building a Python environment for %s (once; cached as %s)", ", ".join(reqs), env_id)
    try:
        with open(os.path.join(work, "requirements.txt"), "w") as f:
            f.write("\n".join(reqs) + "\n")
        _pip(work, allow_source, verbose)
        os.unlink(os.path.join(work, "requirements.txt"))
        target = os.path.join(work, "python")
        if os.path.isdir(os.path.join(target, "bin")):
            os.rename(os.path.join(target, "bin"), os.path.join(work, "bin"))
        os.makedirs(os.path.join(work, "bin"), exist_ok=True)
        # Bytecode by the isolates' interpreter, naming the path inside (never this store's).
        subprocess.run([system_python(), "-I", "-m", "compileall", "-qq", "-j0", "-d", f"{ENV_ROOT}/python", target],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=_timeout(), check=False)  # fmt: skip
        _set_modes(work, writable=True)
        if os.path.isdir(os.path.join(target, "matplotlib")):
            _prime_caches(work)
        manifest = {"id": env_id, "requirements": list(reqs), "python": python_identity()["version"],
                    "sources": allow_source, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "installed": _installed(target), "size_bytes": _size(work)}  # fmt: skip
        with open(os.path.join(work, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        _set_modes(work, writable=False)
        os.rename(work, os.path.join(_dir("envs"), env_id))  # whole, or not there at all
    except BaseException:
        _remove_tree(work)
        raise


def _pip(work: str, allow_source: bool, verbose: bool) -> None:
    cmd = [*_pip_command(), "install", "--target", os.path.join(work, "python"), "--no-compile",
           "-r", os.path.join(work, "requirements.txt")]  # fmt: skip
    if not allow_source:
        cmd.append("--only-binary=:all:")
    # pip keeps the host's own settings (its index, proxy, certificates); never stockade's (a daemon's tokens,
    # a session key) nor the interpreter's overrides. A build's setup code could read its environment.
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP") and not k.startswith("STOCKADE_")}  # fmt: skip
    env.update({"PIP_ROOT_USER_ACTION": "ignore", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1",
                "PIP_NO_WARN_SCRIPT_LOCATION": "1", "PYTHONNOUSERSITE": "1"})  # fmt: skip
    log_path = os.path.join(work, "pip.log")
    with open(log_path, "wb") as out:
        sink = None if verbose else out
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink, env=env,
                                start_new_session=True)  # fmt: skip
        status: int | None = None
        try:
            status = proc.wait(timeout=_timeout())
        except subprocess.TimeoutExpired:
            pass
        finally:
            if proc.returncode is None:  # timed out, or interrupted: pip and its builds go
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if status is None:
            raise PolicyError(f"packages: pip did not finish within {_timeout():g} s (STOCKADE_ENV_BUILD_TIMEOUT; "
                              "stockade env build makes an environment ahead of time)")  # fmt: skip
    with open(log_path, "rb") as f:
        tail = f.read()[-2000:].decode(errors="replace").strip().splitlines()[-12:]
    os.unlink(log_path)
    if status != 0:
        said = ("\n" + "\n".join(tail)) if tail else ""
        hint = "" if allow_source else " (wheels only: stockade env build --allow-source takes sdists)"
        raise PolicyError(f"packages: pip could not install them (exit {status}){hint}{said}")


@functools.lru_cache(maxsize=1)
def _pip_command() -> tuple[str, ...]:
    """pip run by the isolates' interpreter (console scripts then start with its path)."""
    python = system_python()
    probe = subprocess.run([python, "-I", "-c", "import pip"], capture_output=True, timeout=60, check=False)
    if probe.returncode == 0:
        return (python, "-m", "pip")
    own = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, timeout=60, check=False)
    if own.returncode == 0:
        return (sys.executable, "-m", "pip", "--python", python)  # this pip, run by that interpreter
    raise PolicyError(f"packages: no pip for {python} (apt install python3-pip)")


_PRIME = """\
import base64, json, os
import matplotlib.font_manager  # its font list, and fontconfig's cache (fc-list)
out = {}
for top, _, files in os.walk(os.environ['XDG_CACHE_HOME']):
    for n in files:
        p = os.path.join(top, n)
        out[os.path.relpath(p, os.environ['XDG_CACHE_HOME'])] = base64.b64encode(open(p, 'rb').read()).decode()
print(json.dumps(out))
"""


def _prime_caches(work: str) -> None:
    """What matplotlib builds on its first import (its font list, fontconfig's cache), built
    once in a sandbox with this environment mounted as it will be: copied into each
    isolate's $XDG_CACHE_HOME, so no run pays for it or warns about it. Best effort."""
    from .policy import Mount, Policy
    from .runtimes.manager import RuntimeManager
    from .sdk import run_code

    policy = Policy(filesystem_access=(Mount(source=work, target=ENV_ROOT),), environment=run_env(),
                    timeout_seconds=120.0, memory_mb=1024, max_output_bytes=7 * 1024 * 1024)  # fmt: skip
    manager = RuntimeManager(pool_size=0)
    try:
        result = run_code(_PRIME, policy=policy, manager=manager)
        answer = json.loads(result.stdout) if result.success else {}
        # It came from a sandbox: plain relative paths only (no part starts with "."), base64 or nothing.
        files = {rel: base64.b64decode(data, validate=True) for rel, data in answer.items() if _PLAIN.fullmatch(rel)}
    except Exception as exc:  # noqa: BLE001 - a cache is an optimisation: without it matplotlib builds its own
        log.info("no pre-built caches for this environment: %s", exc)
        return
    finally:
        manager.close()
    for rel, data in files.items():
        dest = os.path.join(work, "cache", rel)
        os.makedirs(os.path.dirname(dest), mode=0o755, exist_ok=True)
        with open(dest, "wb") as f:
            f.write(data)


def _installed(target: str) -> list[str]:
    out = []
    for entry in sorted(os.listdir(target)):
        if entry.endswith(".dist-info"):
            project, _, version = entry.removesuffix(".dist-info").partition("-")
            out.append(f"{_canonical(project)}=={version}")
    return out


def _size(path: str) -> int:
    return sum(os.lstat(os.path.join(top, n)).st_size for top, _, files in os.walk(path) for n in files)


def _set_modes(path: str, writable: bool) -> None:
    """Readable by every uid; read-only when done (executables keep their x bits)."""
    w = 0o200 if writable else 0
    for top, _dirs, files in os.walk(path):
        os.chmod(top, 0o555 | w)  # noqa: S103 - read by every sandbox uid
        for n in files:
            p = os.path.join(top, n)
            if not os.path.islink(p):
                os.chmod(p, (0o555 if os.stat(p).st_mode & 0o111 else 0o444) | w)


def _remove_tree(path: str) -> None:
    for top, _, _ in os.walk(path):
        with contextlib.suppress(OSError):
            os.chmod(top, 0o755)  # noqa: S103 - about to be removed
    shutil.rmtree(path, ignore_errors=True)


def _sweep_tmp() -> None:
    """Builds and removals whose process died (``<id>.<pid>.<random>``)."""
    where = _dir("tmp")
    for entry in os.listdir(where):
        pid = entry.split(".")[1] if entry.count(".") >= 2 else ""
        try:
            if pid.isdigit():
                os.kill(int(pid), 0)
        except ProcessLookupError:
            _remove_tree(os.path.join(where, entry))
        except PermissionError:
            pass  # alive, another user's


# ---- listing and removing ------------------------------------------------------------------


@dataclass
class Environment:
    id: str
    names: list[str] = field(default_factory=list)
    requirements: list[str] = field(default_factory=list)
    installed: list[str] = field(default_factory=list)
    python: str = ""
    size_bytes: int = 0
    created: str = ""


def listing() -> list[Environment]:
    """Every environment in the store, with the names that point at it."""
    try:
        ids = sorted(e for e in os.listdir(os.path.join(store_root(), "envs")) if _ID.match(e))
    except OSError:
        return []
    by_id: dict[str, list[str]] = {}
    for name, env_id in names().items():
        by_id.setdefault(env_id, []).append(name)
    out = []
    for env_id in ids:
        try:
            with open(os.path.join(env_path(env_id), MANIFEST)) as f:
                m = json.load(f)
        except (OSError, ValueError):
            m = {}
        out.append(Environment(env_id, by_id.get(env_id, []), m.get("requirements", []), m.get("installed", []),
                               m.get("python", ""), m.get("size_bytes", 0), m.get("created", "")))  # fmt: skip
    return out


def remove(what: str) -> str:
    """Remove a name, or an unnamed environment by id (or a prefix of 6+ digits). Returns
    what was done. A name goes alone while another name still points at its environment;
    the environment goes with its last name. An environment a name points at is not
    removed by id: remove its names."""
    env_id = named(what) if _NAME.match(what) else None
    if env_id is not None:
        os.unlink(os.path.join(store_root(), "names", what))
        others = sorted(n for n, i in names().items() if i == env_id)
        if others:
            return f"removed the name {what}; environment {env_id[:12]} stays (also named {', '.join(others)})"
        _delete(env_id)
        return f"removed {what} and its environment {env_id[:12]}"
    matches = [e.id for e in listing() if len(what) >= 6 and e.id.startswith(what.lower())]
    if len(matches) != 1:
        if not matches:
            raise PolicyError(f"no environment is named {what!r} or has that id (stockade env ls lists them)")
        raise PolicyError(f"{what!r} matches {len(matches)} environments: give more of the id")
    env_id = matches[0]
    holders = sorted(n for n, i in names().items() if i == env_id)
    if holders:
        raise PolicyError(f"environment {env_id[:12]} is named {', '.join(holders)}: remove the name "
                          f"(stockade env rm {holders[0]}), not the environment under it")  # fmt: skip
    _delete(env_id)
    return f"removed environment {env_id[:12]}"


def _delete(env_id: str) -> None:
    # Renamed first: a sandbox starting now finds it whole or not at all. Those running with
    # it keep their mount of a directory that is then emptied.
    with _locked(env_id):
        gone = os.path.join(_dir("tmp"), f"{env_id}.{os.getpid()}.removed-{os.urandom(4).hex()}")
        with contextlib.suppress(FileNotFoundError):
            os.rename(env_path(env_id), gone)
            _remove_tree(gone)
    _failures.pop(env_id, None)
