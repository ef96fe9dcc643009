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
    locks/env-XXXX.lock  flock'd while an id is built or removed (ids share 65,536 by a hash)
    tmp/             builds under way (renamed into envs/ when whole) and removals

Every run imports this module (``share``); few build or name an environment, so the store's own
tools (configparser, hashlib, tempfile) are imported where they are used.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import stat
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import PolicyError, printable
from .owned_paths import check_owned
from .policy import ENV_ROOT
from .runtimes.process.zygote import system_python
from .settings import current, serving_callers

if TYPE_CHECKING:
    from .policy import Policy

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
_CLAUSE = r"(?:~=|==|!=|<=|>=|<|>)[A-Za-z0-9.*+!_-]+"
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")  # all but tab, which is a space here
_SPEC = re.compile(rf"^(?:{_CLAUSE}(?:,{_CLAUSE})*)?$")
# pip options (config files, PIP_* variables) that change which packages a requirement list installs.
_PIP_KEYS = ("index-url", "extra-index-url", "find-links", "no-index", "constraint", "pre", "only-binary",
             "no-binary", "prefer-binary", "use-feature")  # fmt: skip
_failures: dict[str, tuple[float, str]] = {}  # env id -> (when its build failed, why), oldest first
MAX_FAILURES = 1024
_failures_lock = threading.Lock()


_pinned_store: str | None = None  # pin_root_view's
_pinned_pip: list[tuple[str, str]] | None = None  # the same


def pin_root_view() -> None:
    """Keep this process on the store and the pip settings it sees now: a daemon that gives root
    up still reads the system store (where ``stockade env build`` as root puts environments), not
    its new user's, and names environments by root's pip configuration (under /root, 0700, which
    it could no longer read), so that ``packages=`` finds the ones root built."""
    global _pinned_store, _pinned_pip
    _pinned_store = store_root()
    _pinned_pip = pip_settings()


def store_root() -> str:
    """The store, checked to be one no other user can change (what it holds runs in sandboxes,
    and a build writes there as this user, maybe root): it and the way to it this user's or root's."""
    if _pinned_store is not None:
        return _pinned_store
    configured = current().env_store
    if configured:
        root = configured
    elif os.getuid() == 0:
        root = SYSTEM_STORE  # not under /root (0700): each sandbox's own uid reads it
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "stockade", "envs")
    if root not in _owned_stores:
        check_owned(root, STORE_WHAT)
        if os.path.isdir(root):
            _owned_stores.add(root)  # as it stays: no other user can change the way to it
    return root


_owned_stores: set[str] = set()
STORE_WHAT = "the environment store (STOCKADE_ENV_STORE)"  # as an owned_paths refusal names it


def store_dir(*parts: str) -> str:
    """A folder of the store (made if need be)."""
    path = os.path.join(store_root(), *parts)
    os.makedirs(path, mode=0o755, exist_ok=True)
    check_owned(path, STORE_WHAT)  # what was made just now too
    if os.geteuid() == 0:  # leased uids (runsc's gofer, QEMU) reach environments by path, whatever the umask
        for depth in range(len(parts) + 1):
            folder = os.path.join(store_root(), *parts[:depth])
            if os.stat(folder).st_mode & 0o755 != 0o755:
                os.chmod(folder, 0o755)  # noqa: S103 - read by every sandbox uid
    return path


def env_path(env_id: str) -> str:
    return os.path.join(store_root(), "envs", env_id)


# ---- what an environment is: requirements, interpreter, pip's configuration ------------


MAX_REQUIREMENT_CHARS = 1024  # one requirement's text (it is logged, and an argument of pip's)
MAX_REQUIREMENTS = 512  # in one list (pip's command line holds them all)
# What pip takes a requirement ending so for: an archive's file name (pip's ARCHIVE_EXTENSIONS).
_ARCHIVES = (".zip", ".whl", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz", ".tar.xz", ".txz", ".tlz",
             ".tar.lz", ".tar.lzma")  # fmt: skip


def normalise(requirements: Iterable[str], allow_source: bool = False) -> tuple[str, ...]:
    """PEP 508 requirements, one form each (project names canonical, spaces dropped), sorted, unique.

    ``NAME @ URL`` only with ``allow_source``: pip builds a direct reference from
    source whatever ``--only-binary`` says, running its build code on the host.
    pip options, paths and bare URLs are refused: indexes come from pip's own
    configuration, and a path would not say what the environment holds."""
    out = set()
    for count, raw in enumerate(requirements, 1):
        if count > MAX_REQUIREMENTS:
            raise ValueError(f"more than {MAX_REQUIREMENTS} requirements: build such an environment with a "
                             "requirements file (stockade env build NAME -r FILE)")  # fmt: skip
        # No control characters (a marker's quoted text could hold any): the text is shown by
        # `stockade env ls` and the daemon's log, where they would steer a terminal.
        if not isinstance(raw, str) or _CONTROL.search(raw):
            raise ValueError(f"{printable(repr(raw)[:300])} is not a requirement (it holds control characters)")
        if len(raw) > MAX_REQUIREMENT_CHARS:
            raise ValueError(f"{raw[:60]!r}...: a requirement is at most {MAX_REQUIREMENT_CHARS} characters")
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
        name = canonical(name)
        if extras:
            extras = "[" + ",".join(sorted({canonical(e.strip()) for e in extras[1:-1].split(",") if e.strip()})) + "]"
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
            given, _, marker = rest.partition(";")
            spec = "".join(given.split())
            if not _SPEC.match(spec) or not _versions(spec):
                raise ValueError(f"{raw!r}: {given.strip()!r} is not a version specifier (such as '>=2.1,<3')")
            text = name + (extras or "") + spec
        marker = " ".join(marker.split())
        if marker:
            from packaging.markers import InvalidMarker, Marker  # only for a marker: most lists have none

            try:  # PEP 508's grammar, not a look-alike: pip would read "--option" after one as its own
                Marker(marker)
            except InvalidMarker:
                raise ValueError(f"{raw!r}: {marker!r} is not an environment marker") from None
        out.add(text + (f" ; {marker}" if marker else ""))
    return tuple(sorted(out))


def _versions(spec: str) -> bool:
    """Whether ``spec`` is a specifier PEP 440 reads, of versions: not ``===`` (any text, which pip
    takes for a file's name when one so named is where it runs: ``x===1.tar.gz`` built a local
    archive from source), nor ``==1.zip``."""
    if not spec:
        return True
    if "===" in spec or spec.lower().endswith(_ARCHIVES):  # ==1.0+local.whl: a local version, or a file
        return False
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    try:
        SpecifierSet(spec)
    except InvalidSpecifier:
        return False
    return True


def canonical(name: str) -> str:
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
    if _pinned_pip is not None:
        return list(_pinned_pip)
    home = os.path.expanduser("~")
    files = [os.path.join(d, "pip", "pip.conf") for d in (os.environ.get("XDG_CONFIG_DIRS") or "/etc/xdg").split(":")]
    files += ["/etc/pip.conf", os.path.join(python_identity().get("prefix", "/usr"), "pip.conf")]
    user = os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    files += [os.path.join(home, ".pip", "pip.conf"), os.path.join(user, "pip", "pip.conf")]
    if os.environ.get("PIP_CONFIG_FILE", os.devnull) != os.devnull:
        files.append(os.environ["PIP_CONFIG_FILE"])
    import configparser
    import hashlib

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
    import hashlib

    identity = {k: v for k, v in python_identity().items() if k != "prefix"}
    what = {"requirements": list(requirements), "python": identity, "pip": pip_settings(), "sources": allow_source}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


# ---- names --------------------------------------------------------------------------------


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"{name!r} is not an environment name "
            "(1-64 of letters, digits, '.', '_', '-', starting with a letter or digit)"
        )
    return name


def named(name: str) -> str | None:
    """The id ``name`` points at, or None."""
    try:
        with open(os.path.join(store_root(), "names", check_name(name))) as f:
            env_id = f.read().strip()
    except OSError:
        return None
    return env_id if _ID.fullmatch(env_id) else None


def names() -> dict[str, str]:
    """Every name, with the id it points at."""
    try:
        entries = sorted(os.listdir(os.path.join(store_root(), "names")))
    except OSError:
        return {}
    return {n: i for n in entries if _NAME.fullmatch(n) and (i := named(n))}


def _point(name: str, env_id: str) -> None:
    import tempfile

    where = store_dir("names")
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
        raise ValueError(f"{name!r} does not exist on this host "
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
    if pinned is not None and not (_ID.fullmatch(pinned) and os.path.isdir(env_path(pinned))):
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
        # A policy's ``packages`` builds its environment on first use in a process of the caller's own
        # (the SDK, the CLI); in one that serves callers (a daemon, a Ray node's actor) only where its
        # operator said so (STOCKADE_BUILD_PACKAGES, off by default: a build runs pip on the host).
        if serving_callers() and not current().build_packages:
            raise PolicyError(
                f"packages: the environment of {', '.join(policy.packages)} is not built here, and this daemon "
                "builds none for a caller (STOCKADE_BUILD_PACKAGES=0): an administrator builds it with "
                f"`stockade env build NAME {' '.join(policy.packages)}`"
            )
        try:
            if serving_callers():
                # One caller's build at a time, its room checked under the lock: builds begun together
                # all passed the check, and filled the store past its limit between them.
                with _locked("callers"):
                    if not os.path.isdir(path):
                        room = _room_left(policy.packages)
                        build(policy.packages, expected_id=policy.environment_id, budget=room)
            else:
                build(policy.packages, expected_id=policy.environment_id)
        except PermissionError as exc:  # e.g. a daemon that gave root up: it reads root's store, builds nothing in it
            raise PolicyError(
                f"packages: the environment of {', '.join(policy.packages)} is not built here, and this process "
                f"may not build into {store_root()} ({exc.strerror}): an administrator builds it with "
                f"`stockade env build NAME {' '.join(policy.packages)}`"
            ) from None
    if os.getuid() == 0:
        _check_open_to_others(path)
    mount = Mount(source=path, target=ENV_ROOT)
    return policy.with_mount(mount)


def _room_left(packages: tuple[str, ...]) -> int:
    """The bytes a daemon's caller's build may take: callers build into the store up to
    STOCKADE_ENV_STORE_LIMIT_MB, each spelling of a requirement list an environment of its own,
    kept (``six``, ``six>=0``, ``six>=0.0``...), and the build is stopped past what is left."""
    from .environment_build import held_by_builds  # (it imports this module)

    limit = current().env_store_limit_mb
    held = sum(e.size_bytes for e in listing()) + held_by_builds()  # builds under way, or left by one
    if held >> 20 >= limit:
        raise PolicyError(
            f"packages: the environment store {store_root()} holds {held >> 20} MiB, its limit for callers' builds "
            f"(STOCKADE_ENV_STORE_LIMIT_MB={limit}): an administrator removes some (stockade env ls, "
            f"stockade env rm) or builds this one: `stockade env build NAME {' '.join(packages)}`"
        )
    return (limit << 20) - held


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
          expected_id: str | None = None, budget: int | None = None) -> str:  # fmt: skip
    """Build (or find) the environment of ``requirements``; point ``name`` at it. Returns its id.
    ``budget``: the most bytes the build may hold (a daemon's caller's); it never fills the disk.

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
                if failed and (ago := time.monotonic() - failed[0]) < FAILURE_MEMORY_S and not verbose:
                    raise PolicyError(
                        f"{failed[1]}\n(that was pip {ago:.0f} s ago: the same build is not tried again for "
                        f"{FAILURE_MEMORY_S:g} s; `stockade env build` tries it now)"
                    )
                try:
                    from . import environment_build  # it imports this module

                    environment_build.make(env_id, reqs, allow_source, verbose, budget)
                except PolicyError as exc:
                    _remember_failure(env_id, str(exc))
                    raise
    if name is not None:
        _point(name, env_id)
    return env_id


def _remember_failure(env_id: str, said: str) -> None:
    """A failed build, not tried again for ``FAILURE_MEMORY_S``: those past it forgotten, and at
    most ``MAX_FAILURES`` kept (each spelling of a caller's requirements is an id of its own)."""
    now = time.monotonic()
    with _failures_lock:  # builds of several threads (an SDK's) end at once
        for old in [k for k, (at, _) in _failures.items() if now - at >= FAILURE_MEMORY_S]:
            del _failures[old]
        while len(_failures) >= MAX_FAILURES:
            del _failures[next(iter(_failures))]  # the oldest
        _failures.pop(env_id, None)  # (a rebuild's: to the end, the newest)
        _failures[env_id] = (now, said)


def build_timeout() -> float:
    configured = current().env_build_timeout
    return configured if configured is not None else BUILD_TIMEOUT_S


# An environment's lock is one of this many files, by its id: a file per id tried (a caller's
# failed builds, each spelling an id of its own) grew the store without end.
LOCK_FILES = 65536  # (found by trying, a spelling that shares another's lock would take ~65,000 failed builds)


@contextlib.contextmanager
def _locked(env_id: str) -> Iterator[None]:
    """``env_id``'s lock, held across processes (``callers``: the one of callers' builds)."""
    name = (
        env_id
        if env_id == "callers"
        else f"env-{int(hashlib.sha256(env_id.encode()).hexdigest(), 16) % LOCK_FILES:04x}"
    )
    fd = os.open(os.path.join(store_dir("locks"), name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + build_timeout()
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    waited = build_timeout()
                    raise PolicyError(f"environment {env_id}: another build held it past {waited:g} s") from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)  # drops the lock


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
        ids = sorted(e for e in os.listdir(os.path.join(store_root(), "envs")) if _ID.fullmatch(e))
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
    env_id = named(what) if _NAME.fullmatch(what) else None
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
        rm = " and ".join(f"stockade env rm {name}" for name in holders)
        names_ = "the names" if len(holders) > 1 else "the name"
        raise PolicyError(f"environment {env_id[:12]} is named {', '.join(holders)}: remove {names_} "
                          f"({rm}; it goes with its last name), not the environment under them")  # fmt: skip
    _delete(env_id)
    return f"removed environment {env_id[:12]}"


def _delete(env_id: str) -> None:
    # Renamed first: a sandbox starting now finds it whole or not at all. Those running with
    # it keep their mount of a directory that is then emptied.
    from . import environment_build

    with _locked(env_id):
        gone = os.path.join(store_dir("tmp"), f"{env_id}.{os.getpid()}.removed-{os.urandom(4).hex()}")
        with contextlib.suppress(FileNotFoundError):
            os.chmod(env_path(env_id), 0o755)  # noqa: S103 - a directory moved takes writing to itself (its "..")
            os.rename(env_path(env_id), gone)
            environment_build.remove_tree(gone)
    _failures.pop(env_id, None)
