"""The OCI bundle of one gVisor container: its root, its mounts, its process.

The root is read-only and holds only mount points, the merged-/usr links and
a synthesized ``/etc`` (no host files but the loader cache, the CA bundle and
MIME table); ``/usr`` and the agent's code are bound read-only; ``/tmp`` and
``/work`` are size-capped tmpfs; the policy's shared paths are bound as it
says. The process is the agent, as uid 1000, with no capabilities,
``noNewPrivileges`` and the policy's rlimits, reached on its stdin/stdout.

As root, the container has a user namespace of its own that maps two host
uids leased for it (hosted.py) and nothing else: its uid 1000, as which the
code reads and writes shared paths on the host, and its root, as which runsc
runs the Sentry and the gofer. Without it, runsc maps uids one to one: the
code's uid 1000 was the host's uid 1000 (a real account's, often the first
user's), whose private files in a shared directory it could read, and the
owner of whatever it wrote there (a setuid program included). Mapped, the
host's files are others' to it (shown as ``nobody``), as in a process
isolate, and the gofer, no longer host root, cannot make mount points in
the bundle's root: they are made here.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
from typing import Any, NamedTuple

from ..agent import runner
from ..agent.commands import AGENT_FDS
from ..agent.rootfs import INNER_UID, write_etc_extras
from ..environments import CACHE_HOME
from ..policy import ENV_ROOT, Policy
from .base import BASE_ENV
from .hosted import readable_by_all
from .process import seccomp
from .process.zygote import AGENT_PARENT, system_python

AGENT_MOUNT = "/opt/stockade"
# -S skips site (slow under gVisor); the site directories Debian's python3 would
# add are appended by hand so that code run in the sandbox finds the same packages.
CONTAINER_BOOT = runner.bootstrap(
    "import sys; v = '%d.%d' % sys.version_info[:2]; "
    f"sys.path.insert(0, {AGENT_MOUNT!r}); "
    "sys.path += ['/usr/local/lib/python%s/dist-packages' % v, '/usr/lib/python3/dist-packages', "
    "'/usr/lib/python%s/dist-packages' % v]; "
    "from agent import server",
    "server.main()",
)
# With a Python environment: its pre-built caches are copied into the scratch first, as the
# agent's own uid (agent/rootfs.py's seed_cache does it in the other runtimes).
_SEED = (
    "import os\n"
    "try:\n"
    f"    for top, _, files in os.walk({ENV_ROOT + '/cache'!r}):\n"
    f"        dest = {CACHE_HOME!r} + top[{len(ENV_ROOT + '/cache')}:]\n"
    "        os.makedirs(dest, exist_ok=True)\n"
    "        for name in files:\n"
    "            with open(top + '/' + name, 'rb') as src, open(dest + '/' + name, 'wb') as out:\n"
    "                out.write(src.read())\n"
    "except OSError:\n"
    "    pass\n"
)
_BOOT_WITH_ENV = _SEED + CONTAINER_BOOT


class HostIds(NamedTuple):
    """The host uids a container maps (each also its gid): its code's, and runsc's own."""

    code: int
    runsc: int


def _oci_filter() -> dict[str, Any]:
    """An OCI seccomp filter (``runsc --oci-seccomp``) made of the process runtime's rules
    (seccomp_profile.json, the one list of them) for what gVisor's trace cannot tell apart by
    its arguments. Its set-ID rules: in a shared directory a set-user-ID or set-group-ID file
    would make any host user who may run it the isolate's leased uid, which a later isolate may
    hold. Its rule for ``clone`` with a ``CLONE_NEW*`` flag (traced, every fork would be a
    record): a namespace is then made by ``unshare``, which is traced and reported. Not its
    ``clone3`` rule: runsc answers every refusal EPERM, where libc falls back to ``clone`` only
    on ENOSYS (no thread would start), so ``clone3`` may still make one of gVisor's own
    namespaces unreported (docs/runtime-gvisor.md). Refused with EPERM; the Sentry keeps no log of it."""

    def bits(cond: dict[str, Any]) -> list[dict[str, Any]]:
        # OCI has no "any of these bits": one MASKED_EQ a bit, the rules for a call OR'd.
        value = cond["value"]
        return [{"index": cond["arg"], "value": b, "valueTwo": b, "op": "SCMP_CMP_MASKED_EQ"}
                for b in (1 << n for n in range(32)) if value & b]  # fmt: skip

    rules: list[dict[str, Any]] = []
    for rule in (*seccomp.set_id_rules(), seccomp.namespace_clone_rule()):
        rules += [{"names": [rule.syscall], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM, "args": list(args)}
                  for args in itertools.product(*(bits(c) for c in seccomp.conditions(rule)))]  # fmt: skip
    rules.append({"names": ["openat2"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS})  # its mode: in memory
    return {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"], "syscalls": rules}


OCI_FILTER = _oci_filter()


def write_bundle(bundle: str, policy: Policy, warm: bool, ids: HostIds | None = None) -> list[tuple[str, str]]:
    """The bundle of one container for ``policy`` (``warm``: its agent forks a runner ahead;
    ``ids``: the host uids it maps, as root; None: runsc's own one-to-one map).

    As root, each read-only share's source in the spec is a place in the bundle, empty on the
    host: the pairs returned (the share, that place) are bound there read-only in runsc's own
    mount namespace (``spawn_in_cgroup``), so that the host's kernel refuses writes to it. The
    gofer binds a source as it is told with ``ro`` among the flags of a first bind, which Linux
    ignores: only the Sentry held it read-only, and code in a user namespace of gVisor's (which
    needs no privilege) could mount the share again read-write and write through to the host."""
    rootfs = os.path.join(bundle, "rootfs")
    for name in ("usr", "proc", "dev", "tmp", "work", "etc", "opt/stockade/agent"):
        os.makedirs(os.path.join(rootfs, name), mode=0o755)
    for name in ("bin", "sbin", "lib", "lib64"):
        host = "/" + name
        if os.path.islink(host):
            os.symlink(os.readlink(host), os.path.join(rootfs, name))
    etc = os.path.join(rootfs, "etc")
    with_env = any(m.target == ENV_ROOT for m in policy.filesystem_access)
    if with_env:
        os.makedirs(os.path.join(rootfs, ENV_ROOT.lstrip("/")), mode=0o755)
    files = {
        "passwd": "root:x:0:0:root:/root:/usr/sbin/nologin\nsandbox:x:1000:1000:sandbox:/work:/bin/sh\n",
        "group": "root:x:0:\nsandbox:x:1000:\n",
        "hosts": "127.0.0.1\tlocalhost stockade\n::1\tlocalhost\n",
        "hostname": "stockade\n",
        "resolv.conf": "# stockade: no name servers inside the sandbox\n",
        "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
    }
    for name, text in files.items():
        with open(os.path.join(etc, name), "w") as f:
            f.write(text)
    if os.path.isfile("/etc/ld.so.cache"):
        shutil.copyfile("/etc/ld.so.cache", os.path.join(etc, "ld.so.cache"))
    write_etc_extras("", etc)  # the host's CA bundle, mime.types; fonts.conf
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro", "nosuid", "nodev"]},
        {"destination": AGENT_MOUNT + "/agent", "type": "bind", "source": os.path.join(AGENT_PARENT, "agent"),
         "options": ["rbind", "ro", "nosuid", "nodev"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", f"size={policy.disk_mb}m", "mode=1777"]},
        {"destination": "/work", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", f"size={policy.disk_mb}m", "mode=0777"]},
        # gVisor's own /dev/shm is root's (0755): POSIX semaphores (multiprocessing's locks) need it.
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "nodev", f"size={policy.disk_mb}m", "mode=1777"]},
    ]  # fmt: skip
    if os.path.isdir("/etc/alternatives"):
        os.makedirs(os.path.join(etc, "alternatives"))
        mounts.append({"destination": "/etc/alternatives", "type": "bind", "source": "/etc/alternatives",
                       "options": ["rbind", "ro"]})  # fmt: skip
    read_only: list[tuple[str, str]] = []
    for m in policy.filesystem_access:
        directory = os.path.isdir(m.source)
        _mount_point(rootfs, m.target, directory)
        source = os.path.realpath(m.source)
        if ids is not None and not m.writable:
            read_only.append((source, _placeholder(bundle, len(read_only), directory)))
            source = read_only[-1][1]
        mounts.append({"destination": m.target, "type": "bind", "source": source,
                       "options": ["rbind", "rw" if m.writable else "ro", "nosuid", "nodev"]})  # fmt: skip
    readable_by_all(rootfs)  # the gofer reads it on a leased uid
    env = {**BASE_ENV, "STOCKADE_AGENT_FD": "stdio", "STOCKADE_AGENT_WARM": "1" if warm else "0"}
    open_files = max(policy.max_open_files, AGENT_FDS)
    config: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": INNER_UID, "gid": INNER_UID},
            "args": [system_python(), "-I", "-S", "-c", _BOOT_WITH_ENV if with_env else CONTAINER_BOOT],
            "env": [f"{k}={v}" for k, v in env.items()],
            "cwd": "/work",
            "noNewPrivileges": True,
            "capabilities": {k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")},
            "rlimits": [
                # The agent's own need; a command gets the policy's limit from the agent (a runner
                # when it is lower).
                {"type": "RLIMIT_NOFILE", "hard": open_files, "soft": open_files},
                {"type": "RLIMIT_CORE", "hard": 0, "soft": 0},
                {"type": "RLIMIT_NPROC", "hard": policy.pids_limit, "soft": policy.pids_limit},
                {"type": "RLIMIT_FSIZE", "hard": policy.max_file_size_bytes, "soft": policy.max_file_size_bytes},
            ],
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "stockade",
        "mounts": mounts,
        "linux": {"namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")]},
    }
    config["linux"]["seccomp"] = OCI_FILTER
    if ids is not None:
        maps = [
            {"containerID": 0, "hostID": ids.runsc, "size": 1},
            {"containerID": INNER_UID, "hostID": ids.code, "size": 1},
        ]
        config["linux"]["namespaces"].append({"type": "user"})
        config["linux"].update(uidMappings=maps, gidMappings=maps)
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(config, f)
    return read_only


def _placeholder(bundle: str, index: int, directory: bool) -> str:
    """An empty place in the bundle for a read-only share's bind: traversable, as the bundle is,
    by the gofer's leased uid."""
    shares = os.path.join(bundle, "shares")
    if index == 0:
        os.mkdir(shares)
        os.chmod(shares, 0o711)  # noqa: S103 - traversable, whatever the umask: the gofer reaches the shares
    path = os.path.join(shares, str(index))
    if directory:
        os.mkdir(path, 0o700)  # covered by the share's own root
    else:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    return path


def _mount_point(rootfs: str, target: str, directory: bool) -> None:
    """``target``'s mount point in the bundle's root (read-only, root's: runsc's gofer runs as
    the container's root, mapped to an unprivileged uid, and may not make it there)."""
    path = os.path.join(rootfs, target.lstrip("/"))
    parts = target.strip("/").split("/")
    if any(os.path.islink(os.path.join(rootfs, *parts[:i])) for i in range(1, len(parts) + 1)):
        return  # under a copied link (bin -> usr/bin): never follow it out of the bundle
    os.makedirs(path if directory else os.path.dirname(path), mode=0o755, exist_ok=True)
    if not directory and not os.path.exists(path):
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
