"""How one Python environment's tree is made (docs/environments.md): ``pip install --target``
with the host's pip and configuration, bytecode by the isolates' interpreter, matplotlib's
caches primed in a sandbox, then made read-only and renamed into the store whole.

``environments.py`` decides what an environment is, names it, locks it and lists it; this
module only builds one, under that lock.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import IO, TextIO

from .environments import (
    MANIFEST,
    build_timeout,
    canonical,
    python_identity,
    run_env,
    store_dir,
    store_root,
)
from .errors import PolicyError, printable
from .policy import ENV_ROOT
from .runtimes.process.zygote import system_python

log = logging.getLogger("stockade.environments")
_PLAIN = re.compile(r"[\w+-][\w.+-]*(/[\w+-][\w.+-]*)*")  # a relative path a sandbox may name in the caches


# A build stops before it leaves the store's disk with less free than this (a wheel is a zip: a
# small download can unpack to any size), and a daemon's callers' build at their share of the store.
MIN_FREE_BYTES = 1 << 30
MIN_FREE_INODES = 100_000  # the same for files: a wheel of empty files takes inodes, not bytes
MAX_CALLER_FILES = 250_000  # files and directories of a caller's build, pip's temporary ones and bytecode included
# Directories below an environment's root: no package needs as many. A tree that deep was a walk
# of the store this module could not finish (Python's own walks recurse), every later build's too.
MAX_DEPTH = 64
WATCH_S = 0.5  # how often a running pip's tree and the disk are looked at


def make(env_id: str, reqs: tuple[str, ...], allow_source: bool, verbose: bool, budget: int | None = None) -> None:
    """Build ``env_id`` into the store; ``budget``: the most bytes it may hold (None: what the disk has,
    down to MIN_FREE_BYTES)."""
    sweep_tmp()
    work = tempfile.mkdtemp(prefix=f"{env_id}.{os.getpid()}.", dir=store_dir("tmp"))
    os.chmod(work, 0o755)  # noqa: S103 - every sandbox uid reads it (the cache step mounts it)
    if not verbose:
        log.warning("building a Python environment for %s (once; cached as %s)", printable(", ".join(reqs)), env_id)
    deadline = time.monotonic() + build_timeout()  # the whole build's: pip's and its bytecode's
    try:
        _pip(work, reqs, allow_source, verbose, budget, deadline)
        target = os.path.join(work, "python")
        if os.path.isdir(os.path.join(target, "bin")):
            os.rename(os.path.join(target, "bin"), os.path.join(work, "bin"))
        os.makedirs(os.path.join(work, "bin"), exist_ok=True)
        _compile(work, target, budget, deadline)
        set_modes(work, writable=True)
        if os.path.isdir(os.path.join(target, "matplotlib")):
            _prime_caches(work)
        _within_room(work, budget)  # its bytecode and caches too
        manifest = {"id": env_id, "requirements": list(reqs), "python": python_identity()["version"],
                    "sources": allow_source, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "installed": _installed(target), "size_bytes": _size(work)[0]}  # fmt: skip
        with open(os.path.join(work, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        set_modes(work, writable=False)
        # Whole, or not there at all. Its own top is made read-only once it is in place: a directory
        # moved to another takes writing to itself (its ".."), which only root may do without.
        os.chmod(work, 0o755)  # noqa: S103 - read by every sandbox uid
        place = os.path.join(store_dir("envs"), env_id)
        os.rename(work, place)
        os.chmod(place, 0o555)  # noqa: S103 - read by every sandbox uid
    except BaseException as exc:
        remove_tree(work)
        if isinstance(exc, OSError):  # (a wheel's file the host cannot write): a failed build, remembered
            raise PolicyError(f"packages: the build failed: {printable(str(exc))}") from None
        raise


# What the bytecode step may take of the host's memory. A constant folded at compile time may be
# 4 KiB from 16 bytes of source ('k00001'*585): a wheel of 44 KB made an 82 MB .pyc, and 286 MB of
# the compiler's memory. A file past it is left to be compiled when an isolate imports it, in the
# isolate's own memory.
COMPILE_MEMORY_BYTES = 1 << 30
# File by file, counting what it writes: the build's room is held to the byte (a watch each
# WATCH_S let a fast compiler write over a hundred MiB past it), and no one .pyc is larger than the
# room: RLIMIT_FSIZE one past it (a write that crosses it is cut short, not refused, and importlib
# keeps what was written: a file of room + 1 bytes says it crossed). Exit 3: past the room. As
# compileall: regular files, not below __pycache__.
_COMPILE = """\
import errno, os, py_compile, resource, signal, stat, sys
memory, room, inside, root = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (room + 1, room + 1))
written = 0
for top, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d != "__pycache__")
    for name in sorted(files):
        path = os.path.join(top, name)
        if not name.endswith(".py") or not stat.S_ISREG(os.lstat(path).st_mode):
            continue
        try:
            made = py_compile.compile(path, dfile=os.path.join(inside, os.path.relpath(path, root)), doraise=True)
        except OSError as e:
            if e.errno in (errno.EFBIG, errno.ENOSPC, errno.EDQUOT):
                sys.exit(3)
            continue
        except (py_compile.PyCompileError, MemoryError, RecursionError, ValueError):
            continue
        written += os.path.getsize(made)
        if written > room:
            sys.exit(3)
"""


def _compile(work: str, target: str, budget: int | None, deadline: float) -> None:
    """Bytecode by the isolates' interpreter, naming the path inside (never this store's), within
    the build's time and room (what is left of ``budget``, or of the disk down to MIN_FREE_BYTES),
    its memory bounded (COMPILE_MEMORY_BYTES)."""
    disk = os.statvfs(work)
    room = disk.f_bavail * disk.f_frsize - MIN_FREE_BYTES
    if budget is not None:
        room = min(room, budget - _size(work)[0])
    if room <= 0:
        _within_room(work, budget)  # says which
    cmd = [system_python(), "-I", "-c", _COMPILE, str(COMPILE_MEMORY_BYTES), str(max(room, 1)),
           f"{ENV_ROOT}/python", target]  # fmt: skip
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    try:
        status, overrun = _wait_within(proc, work, budget, deadline)
    finally:
        _end_group(proc)
    if overrun is not None:
        raise overrun
    if status is None:
        raise PolicyError(
            f"packages: the build did not finish within {build_timeout():g} s (its bytecode; "
            "STOCKADE_ENV_BUILD_TIMEOUT; stockade env build makes an environment ahead of time)"
        )
    if status == 3:
        _within_room(work, budget)  # says which room it is past
        raise PolicyError("packages: the build stopped: its bytecode would be larger than the room it has left")


def _end_group(proc: subprocess.Popen[bytes]) -> None:
    """``proc`` and every process it started (its session's), ended: timed out, over its room or
    interrupted, its workers would go on writing into a tree being removed."""
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _pip(
    work: str, reqs: tuple[str, ...], allow_source: bool, verbose: bool, budget: int | None, deadline: float
) -> None:
    cmd = [*_pip_command(), "install", "--target", os.path.join(work, "python"), "--no-compile"]
    if not allow_source:
        cmd.append("--only-binary=:all:")
    # Each requirement one argument after "--": never a requirements file's line, whose tail pip
    # reads as per-requirement options (--global-option there would make it build from source).
    cmd += ["--", *reqs]
    # A caller's build: pip's own settings and nothing else of the host's (see pip_environment); an
    # administrator's keeps theirs (a compiler's CC, CFLAGS for --allow-source), never stockade's
    # (a daemon's tokens) nor the interpreter's overrides.
    env = pip_environment(os.environ) if budget is not None else {
        k: v for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP") and not k.startswith("STOCKADE_")}  # fmt: skip
    env.update({"PIP_ROOT_USER_ACTION": "ignore", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1",
                "PIP_NO_WARN_SCRIPT_LOCATION": "1", "PYTHONNOUSERSITE": "1"})  # fmt: skip
    if budget is not None:  # a caller's: what pip would cache (a download of any size) is outside the store
        env["PIP_NO_CACHE_DIR"] = "1"
    # pip's temporary directories inside the build's own: a pip killed (^C, a timeout) leaves them
    # there, and they go with the build, not into /tmp.
    env["TMPDIR"] = os.path.join(work, "pip-tmp")
    os.mkdir(env["TMPDIR"], 0o700)
    log_path = os.path.join(work, "pip.log")
    with open(log_path, "wb") as out:
        # Verbose: pip's output to the terminal as it comes, and to the log, which says why it failed.
        sink = subprocess.PIPE if verbose else out
        # In a directory of its own, empty: pip reads an argument that names a file where it runs
        # as that file, and builds an archive so named from source whatever --only-binary says.
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink, env=env,
                                    cwd=env["TMPDIR"], start_new_session=True)  # fmt: skip
        except OSError as exc:
            raise PolicyError(f"packages: pip could not start: {exc.strerror or exc}") from None
        pairs = ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))
        shown = [threading.Thread(target=_tee, args=(pipe, mine, out), daemon=True)
                 for pipe, mine in pairs if pipe is not None]  # fmt: skip
        for thread in shown:
            thread.start()
        status: int | None = None
        overrun: PolicyError | None = None
        try:
            status, overrun = _wait_within(proc, work, budget, deadline)
        finally:
            _end_group(proc)  # pip's builds too, whatever became of pip
            for thread in shown:  # pip has ended: they read to its pipes' end
                thread.join(timeout=10)
        if overrun is not None:
            raise overrun
        if status is None:
            raise PolicyError(f"packages: pip did not finish within {build_timeout():g} s (STOCKADE_ENV_BUILD_TIMEOUT; "
                              "stockade env build makes an environment ahead of time)")  # fmt: skip
    remove_tree(env["TMPDIR"])
    with open(log_path, "rb") as f:
        output = f.read()
    os.unlink(log_path)
    tail = output[-2000:].decode(errors="replace").strip().splitlines()[-12:]
    if status != 0:
        if budget is not None:
            # A caller's build: pip's last lines may be a build's own output (a wheel's dependency named by
            # URL is built from source whatever --only-binary says), whatever its code read on this host.
            # The host's log has them; the caller, why in general terms.
            log.warning("packages %s: pip exited %d:\n%s", printable(", ".join(reqs)), status,
                        printable("\n".join(tail)))  # fmt: skip
            said = " (pip's last lines are in the host's log)"
        else:
            said = ("\n" + "\n".join(tail)) if tail and not verbose else ""  # verbose: shown as it came
        raise PolicyError(f"packages: pip could not install them (exit {status}){_why(output, allow_source)}{said}")


# What pip is given of the host's environment for a caller's build: its settings (index, proxy,
# certificates, locale, every place pip reads a pip.conf from: the environment's id counts those
# too), nothing else. A build's code (a wheel's dependency named by URL is built from source, whatever
# --only-binary says) reads its environment: a daemon's tokens, a cloud's keys must not be there.
_PIP_KEEPS = frozenset({"PATH", "HOME", "LANG", "LANGUAGE", "TZ", "USER", "LOGNAME", "XDG_CONFIG_HOME",
                        "XDG_CONFIG_DIRS", "XDG_CACHE_HOME", "NETRC", "SSL_CERT_FILE", "SSL_CERT_DIR",
                        "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
                        "ALL_PROXY"})  # fmt: skip


def pip_environment(environ: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """The environment pip runs in: ``_PIP_KEEPS`` (proxies in either case), ``PIP_*`` and ``LC_*``."""
    return {k: v for k, v in environ.items()
            if k.upper() in _PIP_KEEPS or k.startswith(("PIP_", "LC_"))}  # fmt: skip


def _wait_within(
    proc: subprocess.Popen[bytes], work: str, budget: int | None, deadline: float
) -> tuple[int | None, PolicyError | None]:
    """``proc``'s exit status once it ends, within the build's time (``deadline``, monotonic) and
    room: (None, None) past the time, (None, why) past the room (the caller kills it either way)."""
    while True:
        try:
            return proc.wait(timeout=max(0.0, min(WATCH_S, deadline - time.monotonic()))), None
        except subprocess.TimeoutExpired:
            pass
        if time.monotonic() >= deadline:
            return None, None
        try:
            _within_room(work, budget)
        except PolicyError as exc:
            return None, exc


def _within_room(work: str, budget: int | None) -> None:
    """Refuse a build that fills the disk past MIN_FREE_BYTES or MIN_FREE_INODES, lies deeper than
    MAX_DEPTH, or (``budget``: a daemon's caller's) holds more than it or MAX_CALLER_FILES."""
    disk = os.statvfs(work)
    free = disk.f_bavail * disk.f_frsize
    # (A file system that counts no inodes says 0 of them: btrfs, a tmpfs of nr_inodes=0.)
    if free < MIN_FREE_BYTES or (disk.f_files and disk.f_favail < MIN_FREE_INODES):
        raise PolicyError(
            f"packages: the build stopped: the disk holding the environment store {store_root()} has "
            f"{free >> 20} MiB and {disk.f_favail} files free, under the {MIN_FREE_BYTES >> 20} MiB and "
            f"{MIN_FREE_INODES} a build leaves (a package that unpacks to more than the disk holds?)"
        )
    held, files = _size(work)
    if budget is not None and held > budget:
        raise PolicyError(
            f"packages: the build stopped at {held >> 20} MiB, past the {budget >> 20} MiB left of the store's "
            "limit for callers' builds (STOCKADE_ENV_STORE_LIMIT_MB): an administrator builds it with "
            "`stockade env build`"
        )
    if budget is not None and files > MAX_CALLER_FILES:
        raise PolicyError(
            f"packages: the build stopped at {files} files, past the {MAX_CALLER_FILES} a caller's build may "
            "make: an administrator builds it with `stockade env build`"
        )


def _tee(source: IO[bytes], shown: TextIO | None, log: IO[bytes]) -> None:
    """One of pip's streams to this process's own (``shown``, when it has bytes to write to) and
    to ``log``, until pip ends: always read, so that pip never blocks on a full pipe."""
    out = getattr(shown, "buffer", None)
    while chunk := os.read(source.fileno(), 65536):
        with contextlib.suppress(OSError, ValueError):  # the log closed (the build given up), a closed stdout
            log.write(chunk)
            if out is not None:
                out.write(chunk)
                out.flush()
    source.close()


# What pip says (anywhere in its output) when it could not reach a package index at all.
_UNREACHABLE = (b"NewConnectionError", b"Connection refused", b"Temporary failure in name resolution",
                b"Network is unreachable", b"ProxyError", b"ConnectTimeoutError", b"Could not fetch URL")  # fmt: skip


def _why(log: bytes, allow_source: bool) -> str:
    """The likeliest cause of a failed pip run, for the error's first line."""
    if any(marker in log for marker in _UNREACHABLE):
        return (" (it could not reach the package index: this host's pip settings say where it is, "
                "pip.conf, PIP_INDEX_URL or PIP_FIND_LINKS for a local mirror)")  # fmt: skip
    if not allow_source and b"No matching distribution" in log:
        return " (wheels only: stockade env build --allow-source takes sdists)"
    return ""


@functools.lru_cache(maxsize=1)
def _pip_command() -> tuple[str, ...]:
    """pip run by the isolates' interpreter (console scripts then start with its path). Isolated
    (``-I``): ``-m`` would otherwise import ``pip`` from the working directory first, and a build
    runs as root from wherever its caller stands (a directory a sandbox may have written)."""
    python = system_python()
    probe = subprocess.run([python, "-I", "-c", "import pip"], capture_output=True, timeout=60, check=False)
    if probe.returncode == 0:
        return (python, "-I", "-m", "pip")
    own = subprocess.run([sys.executable, "-I", "-m", "pip", "--version"], capture_output=True, timeout=60, check=False)
    if own.returncode == 0:
        return (sys.executable, "-I", "-m", "pip", "--python", python)  # this pip, run by that interpreter
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

    # Mounted as the runtime mounts an environment (no caller may name its root: Policy refuses it).
    policy = Policy(environment=run_env(), timeout_seconds=120.0, memory_mb=1024,
                    max_output_bytes=7 * 1024 * 1024).with_mount(Mount(source=work, target=ENV_ROOT))  # fmt: skip
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
            out.append(f"{canonical(project)}=={version}")
    return out


def _walk(path: str, max_depth: int | None = MAX_DEPTH) -> Iterator[tuple[str, list[os.DirEntry[str]]]]:
    """Each directory of the tree at ``path``, top down, with its entries (no link followed); by a
    list, not recursion, so a tree of any depth is walked (and removed); PolicyError past
    ``max_depth`` levels. Entries that go meanwhile (pip still moving them) are passed over."""
    stack = [(path, 0)]
    while stack:
        top, depth = stack.pop()
        if max_depth is not None and depth > max_depth:
            raise PolicyError(f"packages: the build stopped: its files lie more than {max_depth} directories deep")
        try:
            with os.scandir(top) as listed:
                entries = list(listed)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue  # gone meanwhile; or not this user's to read (another's build): what it may see
        yield top, entries
        stack.extend((e.path, depth + 1) for e in entries if e.is_dir(follow_symlinks=False))


def _size(path: str, max_depth: int | None = MAX_DEPTH) -> tuple[int, int]:
    """What the tree at ``path`` takes of the disk: its bytes (blocks, directories too: a sparse
    file's), and its files and directories (inodes), read while pip may still be moving them."""
    total, count = 0, 0
    for _top, entries in _walk(path, max_depth):
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                total += entry.stat(follow_symlinks=False).st_blocks * 512
                count += 1
    return total, count


def set_modes(path: str, writable: bool) -> None:
    """Readable by every uid; read-only when done (executables keep their x bits)."""
    w = 0o200 if writable else 0
    for top, entries in _walk(path):
        os.chmod(top, 0o555 | w)  # noqa: S103 - read by every sandbox uid
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False) and not entry.is_symlink():
                os.chmod(entry.path, (0o555 if entry.stat().st_mode & 0o111 else 0o444) | w)


def remove_tree(path: str) -> None:
    """Remove the tree at ``path``, whatever its modes or depth (nothing raised; what this user
    may not remove is left)."""
    with contextlib.suppress(OSError):
        os.chmod(path, 0o755)  # noqa: S103 - about to be removed
    walked = []
    for top, entries in _walk(path, max_depth=None):
        for entry in entries:  # each directory made readable before the walk lists it
            if entry.is_dir(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.chmod(entry.path, 0o755)  # noqa: S103 - about to be removed
        walked.append((top, entries))
    for top, entries in reversed(walked):  # the deepest first: each directory empty once reached
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
        with contextlib.suppress(OSError):
            os.rmdir(top)


def held_by_builds() -> int:
    """The bytes of the builds under way in the store (and of any that could not be removed)."""
    return _size(store_dir("tmp"), max_depth=None)[0]


def sweep_tmp() -> None:
    """Builds and removals whose process died (``<id>.<pid>.<random>``); one that cannot be
    removed is logged and left, never a failure of the build that sweeps."""
    where = store_dir("tmp")
    for entry in os.listdir(where):
        pid = entry.split(".")[1] if entry.count(".") >= 2 else ""
        try:
            if pid.isdigit():
                os.kill(int(pid), 0)
        except ProcessLookupError:
            try:
                remove_tree(os.path.join(where, entry))
            except Exception as exc:  # noqa: BLE001 - said, and the build goes on
                log.warning("could not remove %s: %s", os.path.join(where, entry), exc)
        except PermissionError:
            pass  # alive, another user's
