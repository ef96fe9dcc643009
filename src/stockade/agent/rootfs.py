"""An isolate's new root file system: /dev, the scratch tmpfs, a synthesized /etc,
the policy's extra mounts, and the seeded caches.

The process runtime's init builds it (confine.py, inside its own mount
namespace, before the host's root goes) and the microVM's guest agent builds
the same one over its initramfs (guest.py), so that code sees one layout
whatever isolates it. Stdlib only: it runs in the fresh interpreter of every
isolate.
"""

from __future__ import annotations

import errno
import os

from . import linux, wire

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

INNER_UID = 1000
INNER_GID = 1000
_DEVICES = ("null", "zero", "full", "random", "urandom")


def make_dev(old: str) -> None:
    linux.mount("tmpfs", "/dev", "tmpfs", linux.MS_NOSUID | linux.MS_NOEXEC, "size=64k,mode=0755")
    for name in _DEVICES:
        path = "/dev/" + name
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o666))
        linux.mount(f"{old}/dev/{name}", path, None, linux.MS_BIND)
    os.symlink("/proc/self/fd", "/dev/fd")
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{i}", "/dev/" + name)
    os.mkdir("/dev/shm", 0o1777)


def hide_kernel_cmdline() -> None:
    """/proc/cmdline (and /proc/bootconfig, which quotes it), empty: the kernel's command line (the
    host's; a microVM's, its init's flags) is none of the code's business (boot parameters, a
    cloud's seed URL, its vsock ports). Needs /dev/null (``make_dev``) and /proc."""
    for path in ("/proc/cmdline", "/proc/bootconfig"):
        if os.path.exists(path):
            linux.mount("/dev/null", path, None, linux.MS_BIND)
            _remount(path, linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NOEXEC)


def make_scratch(size_mb: int, owner: tuple[int, int] | None = None) -> None:
    """One size-capped tmpfs shared by /tmp, /work and /dev/shm: disk_mb caps them together.

    ``/work`` belongs to whoever makes it (the code's own uid in a user
    namespace), or to ``owner`` (uid, gid) when the maker is a real root.
    """
    os.mkdir("/.scratch")
    flags = linux.MS_NOSUID | linux.MS_NODEV
    linux.mount("tmpfs", "/.scratch", "tmpfs", flags, f"size={size_mb}m,mode=0755")
    for name, mode in (("tmp", 0o1777), ("work", 0o755), ("shm", 0o1777)):
        os.mkdir("/.scratch/" + name)
        os.chmod("/.scratch/" + name, mode)
    if owner is not None:
        os.chown("/.scratch/work", *owner)
    linux.mount("/.scratch/tmp", "/tmp", None, linux.MS_BIND)
    linux.mount("/.scratch/work", "/work", None, linux.MS_BIND)
    linux.mount("/.scratch/shm", "/dev/shm", None, linux.MS_BIND)
    linux.umount2("/.scratch", linux.MNT_DETACH)
    os.rmdir("/.scratch")
    # /dev itself is read-only from now on; its binds (shm, devices) keep their own mode.
    _remount("/dev", linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NOEXEC)


def make_etc(old: str, config: dict[str, Any]) -> None:
    hostname = config.get("hostname", "stockade")
    files = {
        "passwd": (
            "root:x:0:0:root:/root:/usr/sbin/nologin\n"
            f"sandbox:x:{INNER_UID}:{INNER_GID}:sandbox:/work:/bin/sh\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ),
        "group": f"root:x:0:\nsandbox:x:{INNER_GID}:\nnogroup:x:65534:\n",
        "hosts": f"127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost\n",
        "hostname": hostname + "\n",
        "resolv.conf": "# stockade: no name servers inside the sandbox\n",
        "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
    }
    if config.get("network") == "allowlist":  # the host answers allowed names on the isolate's loopback
        files["resolv.conf"] = "# stockade: allowed names only, answered by the host\nnameserver 127.0.0.1\n"
        files["nsswitch.conf"] = "passwd: files\ngroup: files\nhosts: files dns\n"
    for name, text in files.items():
        write_text("/etc/" + name, text)
    # Not secrets: the loader's cache speeds up every exec; alternatives are symlinks
    # that /usr/bin/awk and friends go through on Debian.
    for name in ("ld.so.cache", "localtime"):
        try:
            fd = os.open(f"{old}/etc/{name}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            data = os.read(fd, 1 << 20)
        finally:
            os.close(fd)
        write_bytes("/etc/" + name, data)
    if os.path.isdir(f"{old}/etc/alternatives"):
        os.mkdir("/etc/alternatives")
        bind(f"{old}/etc/alternatives", "/etc/alternatives", writable=False)


# What common libraries read from /etc to work offline and quietly: the host's CA bundle
# (the first of the usual places it has, kept at that path: OpenSSL's default file there),
# the MIME table, and a fontconfig configuration of our own (fonts from /usr, a cache in
# $XDG_CACHE_HOME, or ~/.cache: both writable). The gvisor runtime and the microVM image
# copy the same files.
CA_BUNDLES = ("ssl/certs/ca-certificates.crt", "pki/tls/certs/ca-bundle.crt", "ssl/cert.pem")
ETC_COPIES = ("mime.types",)
FONTS_CONF = """<?xml version="1.0"?>
<!DOCTYPE fontconfig SYSTEM "urn:fontconfig:fonts.dtd">
<!-- stockade: the fonts under /usr, a cache in the writable scratch -->
<fontconfig>
  <dir>/usr/share/fonts</dir>
  <dir>/usr/local/share/fonts</dir>
  <cachedir prefix="xdg">fontconfig</cachedir>
  <include ignore_missing="yes">/usr/share/fontconfig/conf.avail/45-latin.conf</include>
  <include ignore_missing="yes">/usr/share/fontconfig/conf.avail/49-sansserif.conf</include>
  <include ignore_missing="yes">/usr/share/fontconfig/conf.avail/60-latin.conf</include>
</fontconfig>
"""
# Where a policy's Python environment is mounted, and where its pre-built caches go
# (the host's environments.ENV_ROOT and CACHE_HOME).
ENV_ROOT = "/opt/stockade/env"
CACHE_HOME = "/tmp/.cache"


def etc_copies(root: str) -> list[str]:
    """The files of ``root``/etc an isolate's /etc copies (paths under etc/)."""
    bundles = [p for p in CA_BUNDLES if os.path.isfile(f"{root}/etc/{p}")][:1]
    return bundles + [p for p in ETC_COPIES if os.path.isfile(f"{root}/etc/{p}")]


def write_etc_extras(root: str, etc: str = "/etc") -> None:
    """Copy ``etc_copies(root)`` into ``etc`` and write fonts.conf there."""
    for rel in etc_copies(root):
        try:
            data = read_bytes(f"{root}/etc/{rel}")
        except OSError:
            continue  # not readable by the isolate's uid: the host keeps it to itself
        os.makedirs(os.path.dirname(f"{etc}/{rel}"), mode=0o755, exist_ok=True)
        write_bytes(f"{etc}/{rel}", data)
    os.makedirs(f"{etc}/fonts", mode=0o755, exist_ok=True)
    write_text(f"{etc}/fonts/fonts.conf", FONTS_CONF)


def seed_cache(owner: tuple[int, int] | None = None) -> None:
    """Copy the environment's pre-built caches (``cache/``: matplotlib's font list,
    fontconfig's) into the scratch's $XDG_CACHE_HOME, owned by the code's uid
    (``owner`` when the maker is a real root), as if its first run had made them."""
    try:
        _seed_cache(owner)
    except OSError:
        pass  # a scratch too small for it, say: the library builds its own


def _seed_cache(owner: tuple[int, int] | None) -> None:
    seed = ENV_ROOT + "/cache"
    for top, _dirs, files in os.walk(seed):
        dest = CACHE_HOME + top[len(seed) :]
        os.makedirs(dest, mode=0o755, exist_ok=True)
        made = [dest] + [f"{dest}/{name}" for name in files]
        for name in files:
            write_bytes(f"{dest}/{name}", read_bytes(f"{top}/{name}"))
        if owner is not None:
            for path in made:
                os.chown(path, *owner)


def bind_extra(old: str, mount: dict[str, Any]) -> None:
    source, target = mount["source"], mount["target"]
    host = old + source
    if not os.path.exists(host):
        raise FileNotFoundError(f"filesystem_access source {source} does not exist or is not reachable")
    if os.path.isdir(host):
        os.makedirs(target, exist_ok=True)
        if mount.get("hide_source") and _mount_hiding_source(host, target):
            return
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.exists(target):
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
    bind(host, target, writable=bool(mount.get("writable")))


def _mount_hiding_source(host: str, target: str) -> bool:
    """``host`` read-only at ``target``, its host path out of /proc/self/mountinfo.

    A bind shows the source's path within its filesystem there; an overlay of its own
    has "/" for a root, and its layers are named as given, relative to the working
    directory ("."). A read-only overlay needs two layers: the second is ``target``
    itself, empty, then covered. False where overlays cannot be mounted in a user
    namespace (Linux < 5.11): the caller binds instead.
    """
    here = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.chdir(host)
        flags = linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV
        linux.mount("overlay", target, "overlay", flags, f"lowerdir=.:{target}")
        return True
    except OSError:
        return False
    finally:
        os.fchdir(here)
        os.close(here)


def bind(source: str, target: str, writable: bool) -> None:
    """``source`` at ``target`` with the mounts below it, each of them nosuid, nodev and (unless
    ``writable``) read-only: a mount below a shared path keeps its own flags otherwise (a tmpfs
    under a read-only share was writable, with devices and set-user-ID files)."""
    linux.mount(source, target, None, linux.MS_BIND | linux.MS_REC)
    attrs = linux.MOUNT_ATTR_NOSUID | linux.MOUNT_ATTR_NODEV | (0 if writable else linux.MOUNT_ATTR_RDONLY)
    try:
        linux.mount_setattr_recursive(target, attrs)
    except OSError as exc:
        if exc.errno != errno.ENOSYS:
            raise
        flags = linux.MS_NOSUID | linux.MS_NODEV | (0 if writable else linux.MS_RDONLY)
        for point in _mounts_at_or_below(target):  # Linux < 5.12: one remount each, top first
            _remount(point, flags)


def _mounts_at_or_below(target: str) -> list[str]:
    """The mount points at ``target`` and below it, as this thread's mountinfo lists them (linux.mount_table)."""
    below = target.rstrip("/") + "/"
    return [point for _, _, point, _ in linux.mount_table() if point == target or point.startswith(below)]


def _remount(target: str, flags: int) -> None:
    # In a user namespace the flags a mount was created with are locked: keep them.
    st = os.statvfs(target)
    locked = 0
    for st_flag, ms_flag in (
        (os.ST_NOSUID, linux.MS_NOSUID),
        (os.ST_NODEV, linux.MS_NODEV),
        (os.ST_NOEXEC, linux.MS_NOEXEC),
        (os.ST_NOATIME, linux.MS_NOATIME),
        (os.ST_NODIRATIME, linux.MS_NODIRATIME),
        (os.ST_RELATIME, linux.MS_RELATIME),
    ):
        if st.f_flag & st_flag:
            locked |= ms_flag
    if st.f_flag & os.ST_RDONLY:
        locked |= linux.MS_RDONLY
    linux.mount(None, target, None, linux.MS_REMOUNT | linux.MS_BIND | flags | locked)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def read_bytes(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_bytes(path: str, data: bytes) -> None:
    # os-level I/O: a text-mode open() costs ~50 us in a freshly forked child.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        wire.write_all(fd, data)
    finally:
        os.close(fd)
