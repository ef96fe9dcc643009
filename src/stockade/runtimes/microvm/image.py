"""``stockade image build``: the microVM's guest image, made from Debian packages.

- kernel: the ``linux-image-*-amd64`` package; its ``vmlinuz`` is a bzImage
  whose payload is an xz stream, decompressed here into the ELF ``vmlinux``
  that QEMU boots straight through the PVH entry (no bootloader, no real-mode
  decompression: ~2 s under TCG instead of ~4.5 s);
- initramfs (newc cpio, written here): ``busybox`` from ``busybox-static``, the
  virtio, virtio-serial and 9p modules from the same kernel package, the
  guest agent's code, copies of the files the host's ``python3`` reads to
  start the agent (its binary, libraries and a dozen stdlib modules), and
  ``/init``. The guest's ``/usr`` is the host's, shared read-only over 9p and
  mounted over those copies: nothing else of the host is visible.

The image lives in ``$XDG_CACHE_HOME/stockade/images/<key>`` and is rebuilt only
when an input changes (kernel package, busybox, agent code, init script).
"""

from __future__ import annotations

import ast
import contextlib
import glob
import hashlib
import json
import logging
import lzma
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from ...agent import rootfs, runner
from ...errors import SandboxStartError
from ..hosted import readable_by_all
from ..process import seccomp
from ..process.zygote import AGENT_PARENT

GUEST_PYTHON = "/usr/bin/python3"  # the guest runs the host's interpreter, as the init script says

MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_console",
    "netfs",
    "fscache",
    "9pnet",
    "9pnet_virtio",
    "9p",
)  # fmt: skip  (load order)
log = logging.getLogger("stockade.microvm")
IMAGE_LAYOUT = 8  # bump when the initramfs layout changes in a way the other inputs do not show
LD_SO_CACHE = "/etc/ld.so.cache"
BUSYBOX_APPLETS = (
    "sh", "mount", "umount", "mkdir", "insmod", "ln", "sleep", "ls", "cat", "hostname", "poweroff", "ifconfig", "chmod",
    "date",
)  # fmt: skip

# The guest agent's -c program (no double quote, $ or backquote: it sits in the init script's "...").
GUEST_BOOT = runner.bootstrap(
    "import sys; sys.path.insert(0, '/opt/stockade'); from agent import guest", "guest.main()"
)
INIT = r"""#!/bin/sh
# stockade microVM init: modules, the agent's interpreter started from the
# initramfs, the host's go line, /usr, then the agent on the virtio-serial port
# (which confines itself and the code: agent/guest.py).
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in __MODULES__; do insmod /modules/$m.ko || { echo "stockade: insmod $m failed"; poweroff -f; }; done
i=0
while [ ! -e /dev/vport0p1 ] && [ $i -lt 500 ]; do sleep 0.01; i=$((i+1)); done
[ -e /dev/vport0p1 ] || { echo "stockade: no virtio-serial port"; poweroff -f; }
# The port stays open on fd 3 from here to the agent: the guest driver drops
# whatever arrived unread when a port is closed (the agent's first request may
# already be there). read takes one byte at a time and leaves that request.
exec 3<>/dev/vport0p1
setup() {
  PATH=/bin
  # The agent's interpreter has started from the copies in the initramfs and
  # waits on its stdin. Nothing of the host is mounted and no program has been
  # given randomness for its own use: a snapshot of the VM taken here can be
  # restored many times. "S" tells the host so; the go line gives each boot or
  # restore its own random seed, the wall-clock time (the VM has no RTC), the
  # scratch size and the network.
  i=0
  while [ ! -e /.agent-ready ] && [ $i -lt 3000 ]; do sleep 0.01; i=$((i+1)); done
  echo -n S >&3
  SEED=
  until [ -n "$SEED" ]; do
    read -r SEED NOW DISK NET <&3 || sleep 0.02
  done
  echo "$SEED" > /dev/urandom
  date -s "@$NOW" > /dev/null
  # The host's /usr goes over the initramfs copies: the running interpreter keeps
  # what it has loaded, and everything else comes from the host.
  mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose,noatime usr /usr || poweroff -f
  hostname stockade
  echo "go $DISK $NET"
}
export HOME=/work TMPDIR=/tmp LANG=C.UTF-8 PATH=/usr/local/bin:/usr/bin:/bin
# After "go" the agent has the kernel reseed its generator from the seed, makes
# the code's namespaces and root (the scratch space of $DISK MB, the shared
# paths of stockade.mounts=), drops to uid 1000 and puts itself under the
# process runtime's seccomp profile, compiled by the host. Its first process
# waits outside the namespaces until the confined agent ends: then the VM goes.
export STOCKADE_GUEST_SECCOMP=/opt/stockade/seccomp.bpf STOCKADE_GUEST_SECCOMP_ANSWERS=__ANSWERS__
setup | /usr/bin/python3 -I -S -c "__AGENT_BOOT__"
poweroff -f
"""


@dataclass(frozen=True)
class GuestImage:
    directory: str
    kernel: str  # ELF vmlinux
    initramfs: str
    kernel_version: str


def cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "stockade", "images")


def snapshots_directory() -> str:
    """Where saved VMs live (runtimes/microvm/snapshot.py); they belong to the current image."""
    return os.path.join(os.path.dirname(cache_root()), "snapshots")


Progress = Callable[[str, float], None]


def _quiet(step: str, fraction: float) -> None:
    return None


def bar(step: str, fraction: float) -> None:
    """A one-line text progress bar on stderr."""
    width = 30
    done = int(width * fraction)
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {fraction * 100:3.0f}% {step:<40}")
    if fraction >= 1:
        sys.stderr.write("\n")
    sys.stderr.flush()


def find_image() -> GuestImage | None:
    """The newest built image whose inputs still match, without building anything."""
    try:
        key = _inputs_key(_kernel_package_name(cached_only=True))
    except SandboxStartError:
        return None
    return _load(os.path.join(cache_root(), key))


def build(progress: Progress = _quiet, force: bool = False) -> GuestImage:
    progress("looking up the kernel package", 0.02)
    package = _kernel_package_name(cached_only=False)
    key = _inputs_key(package)
    target = os.path.join(cache_root(), key)
    if not force and (image := _load(target)) is not None:
        progress("up to date", 1.0)
        return image
    if progress is _quiet:
        # Built on demand (a first microVM start, doctor, the daemon): without a
        # word, the minute this takes would look like a hang.
        log.warning("building the microVM guest image from %s and busybox-static (once; about a minute)", package)
    work = tempfile.mkdtemp(prefix="stockade-image-")
    try:
        progress(f"downloading {package}", 0.1)
        kernel_deb = _download(package, work)
        progress("downloading busybox-static", 0.35)
        busybox_deb = _download("busybox-static", work)
        progress("unpacking", 0.45)
        _run(["dpkg-deb", "-x", kernel_deb, os.path.join(work, "kernel")])
        _run(["dpkg-deb", "-x", busybox_deb, os.path.join(work, "busybox")])
        progress("decompressing the kernel", 0.6)
        (vmlinuz,) = glob.glob(os.path.join(work, "kernel", "boot", "vmlinuz-*"))
        version = os.path.basename(vmlinuz).removeprefix("vmlinuz-")
        staging = target + ".tmp"
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        _extract_vmlinux(vmlinuz, os.path.join(staging, "vmlinux"))
        progress("writing the initramfs", 0.8)
        copied = _write_initramfs(work, version, os.path.join(staging, "initramfs.cpio"))
        with open(os.path.join(staging, "manifest.json"), "w") as f:
            host_files = {path: _host_stamp(path) for path in copied}
            json.dump({"kernel_package": package, "kernel_version": version, "key": key, "host_files": host_files}, f)
        readable_by_all(staging)  # QEMU, on a leased uid, reopens the kernel and initramfs
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
        for old in os.listdir(cache_root()):  # images of older inputs are never used again
            path = os.path.join(cache_root(), old)
            if old != key and os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
        # Snapshots hold a booted copy of the old image: none of them can be restored now.
        shutil.rmtree(snapshots_directory(), ignore_errors=True)
        progress("done", 1.0)
        image = _load(target)
        assert image is not None
        return image
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _load(directory: str) -> GuestImage | None:
    try:
        with open(os.path.join(directory, "manifest.json")) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    kernel, initramfs = os.path.join(directory, "vmlinux"), os.path.join(directory, "initramfs.cpio")
    if not (os.path.isfile(kernel) and os.path.isfile(initramfs)):
        return None
    if any(not os.stat(path).st_mode & stat.S_IROTH for path in (kernel, initramfs)):
        try:
            readable_by_all(directory)  # written under a umask like systemd's UMask=0077
        except OSError:
            return None  # not ours to change: build it again
    host_files = manifest.get("host_files")
    if not isinstance(host_files, dict) or any(_host_stamp(p) != stamp for p, stamp in host_files.items()):
        return None  # built from host files that have changed since (or by a stockade that kept no list)
    return GuestImage(directory, kernel, initramfs, manifest["kernel_version"])


def _kernel_package_name(cached_only: bool) -> str:
    """The newest linux-image-<abi>-amd64 package apt knows of (or the one last built)."""
    marker = os.path.join(cache_root(), "kernel-package")
    if cached_only:
        try:
            with open(marker) as f:
                return f.read().strip()
        except OSError:
            raise SandboxStartError("no guest image has been built yet (stockade image build)") from None
    names = _search_kernels()
    if not names and os.getuid() == 0:
        _run(["apt-get", "update", "-qq"])  # a fresh machine may have no package lists yet
        names = _search_kernels()
    if not names:
        raise SandboxStartError("apt knows no linux-image-*-amd64 package (run apt-get update)")
    os.makedirs(cache_root(), exist_ok=True)
    with open(marker, "w") as f:
        f.write(names[-1])
    return names[-1]


def _search_kernels() -> list[str]:
    try:
        out = subprocess.run(
            ["apt-cache", "search", "--names-only", r"^linux-image-[0-9.]+-[0-9]+-amd64$"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        raise SandboxStartError(f"cannot look up a Debian kernel package: {exc}") from None
    return sorted((line.split()[0] for line in out.splitlines() if line), key=_version_key)


def _version_key(name: str) -> tuple[int, ...]:
    digits = name.removeprefix("linux-image-").removesuffix("-amd64").replace("-", ".").split(".")
    return tuple(int(d) for d in digits if d.isdigit())


def _inputs_key(package: str) -> str:
    h = hashlib.sha256()
    h.update(f"layout {IMAGE_LAYOUT}".encode())
    h.update(package.encode())
    h.update(" ".join(BUSYBOX_APPLETS).encode())
    h.update(INIT.encode())
    h.update(" ".join(MODULES).encode())
    agent_dir = os.path.join(AGENT_PARENT, "agent")
    for name in sorted(os.listdir(agent_dir)):
        if name.endswith(".py"):
            with open(os.path.join(agent_dir, name), "rb") as f:
                h.update(name.encode() + f.read())
    h.update(seccomp.default_program())  # the guest's filter: the profile as this host compiles it
    h.update(seccomp.guest_answers().encode())  # and how its agent answers what the filter refuses
    if os.path.isfile(LD_SO_CACHE):
        with open(LD_SO_CACHE, "rb") as f:
            h.update(f.read())  # changes whenever the host's libraries do
    with contextlib.suppress(OSError):
        st = os.stat(GUEST_PYTHON)  # the initramfs carries a copy of it
        h.update(f"{os.path.realpath(GUEST_PYTHON)} {st.st_size} {st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _download(package: str, into: str) -> str:
    _run(["apt-get", "download", package], cwd=into)
    found = glob.glob(os.path.join(into, f"{package}_*.deb"))
    if not found:
        raise SandboxStartError(f"apt-get download {package} produced no .deb")
    return found[0]


def _run(cmd: list[str], cwd: str | None = None) -> None:
    try:
        subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, check=True)
    except subprocess.CalledProcessError as exc:
        raise SandboxStartError(f"{' '.join(cmd)} failed: {exc.stderr.strip()[-400:]}") from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SandboxStartError(f"{' '.join(cmd)} failed: {exc}") from None


def _extract_vmlinux(vmlinuz: str, out: str) -> None:
    with open(vmlinuz, "rb") as f:
        data = f.read()
    start = data.find(b"\xfd7zXZ\x00")
    if start < 0:
        raise SandboxStartError(f"{vmlinuz} holds no xz-compressed kernel")
    elf = lzma.LZMADecompressor().decompress(data[start:])
    if not elf.startswith(b"\x7fELF"):
        raise SandboxStartError(f"{vmlinuz}: the decompressed payload is not an ELF kernel")
    with open(out, "wb") as f:
        f.write(elf)


def _write_initramfs(work: str, version: str, out: str) -> list[str]:
    """Write the initramfs to ``out``; return the host files it copies from /usr and /etc (see ``_host_stamp``)."""
    modules_root = os.path.join(work, "kernel", "lib", "modules", version)
    entries: list[tuple[str, int, bytes]] = []  # path, mode, data (symlink target for links)

    def add_dir(path: str) -> None:
        entries.append((path, stat.S_IFDIR | 0o755, b""))

    # mnt: where the agent builds the code's root (agent/guest.py).
    for d in ("bin", "dev", "proc", "sys", "mnt", "usr", "modules", "opt", "opt/stockade",
              "opt/stockade/agent", "etc"):  # fmt: skip
        add_dir(d)
    for link, target in (("lib", "usr/lib"), ("lib64", "usr/lib64"), ("sbin", "bin")):
        entries.append((link, stat.S_IFLNK | 0o777, target.encode()))
    with open(os.path.join(work, "busybox", "bin", "busybox"), "rb") as f:
        entries.append(("bin/busybox", stat.S_IFREG | 0o755, f.read()))
    for applet in BUSYBOX_APPLETS:
        entries.append((f"bin/{applet}", stat.S_IFLNK | 0o777, b"busybox"))
    for module in MODULES:
        found = glob.glob(os.path.join(modules_root, "kernel", "**", f"{module}.ko"), recursive=True)
        if not found:
            raise SandboxStartError(f"kernel module {module}.ko is not in the kernel package")
        with open(found[0], "rb") as f:
            entries.append((f"modules/{module}.ko", stat.S_IFREG | 0o644, f.read()))
    agent_dir = os.path.join(AGENT_PARENT, "agent")
    for name in sorted(os.listdir(agent_dir)):
        if name.endswith(".py"):
            with open(os.path.join(agent_dir, name), "rb") as f:
                entries.append((f"opt/stockade/agent/{name}", stat.S_IFREG | 0o644, f.read()))
    entries.append(("opt/stockade/seccomp.bpf", stat.S_IFREG | 0o644, seccomp.default_program()))
    # The code's /etc is synthesized by the agent (rootfs.make_etc), as in a process
    # isolate. The guest's /usr is the host's, so the host's loader cache, which
    # that /etc takes from here, describes it: the loader need not search directories.
    if os.path.isfile(LD_SO_CACHE):
        with open(LD_SO_CACHE, "rb") as f:
            entries.append(("etc/ld.so.cache", stat.S_IFREG | 0o644, f.read()))
    # And the host's CA bundle and MIME table, which that /etc copies (rootfs.write_etc_extras).
    etc_files = [f"/etc/{rel}" for rel in rootfs.etc_copies("")]
    for path in etc_files:
        parent = ""
        for part in os.path.dirname(path).strip("/").split("/")[1:]:
            parent += "/" + part
            if ("etc" + parent, stat.S_IFDIR | 0o755, b"") not in entries:
                entries.append(("etc" + parent, stat.S_IFDIR | 0o755, b""))
        with open(path, "rb") as f:
            entries.append((path.lstrip("/"), stat.S_IFREG | 0o644, f.read()))
    interpreter = _interpreter_entries({path for path, mode, _ in entries if stat.S_ISDIR(mode)})
    entries += interpreter
    entries += _bytecode_entries(entries)
    init = INIT.replace("__MODULES__", " ".join(MODULES)).replace("__ANSWERS__", seccomp.guest_answers())
    init = init.replace("__AGENT_BOOT__", GUEST_BOOT)
    entries.append(("init", stat.S_IFREG | 0o755, init.encode()))
    with open(out, "wb") as archive:
        for ino, (path, mode, data) in enumerate(entries, start=1):
            cpio_entry(archive, ino, path, mode, data)
        cpio_entry(archive, 0, "TRAILER!!!", 0, b"")
    return ["/" + name for name, mode, _data in interpreter if not stat.S_ISDIR(mode)] + etc_files


def _host_stamp(path: str) -> str:
    """What shows that a host file copied into the initramfs is unchanged: a link's
    target, a file's size and modification time. An upgraded library or stdlib
    module the interpreter's copies came from makes the image stale, though
    neither the python binary nor the loader cache (the inputs key) changed."""
    try:
        st = os.lstat(path)
    except OSError:
        return "missing"
    if stat.S_ISLNK(st.st_mode):
        return "-> " + os.readlink(path)
    return f"{st.st_size} {st.st_mtime_ns}"


def _interpreter_entries(have_dirs: set[str]) -> list[tuple[str, int, bytes]]:
    """Copies of what the agent's interpreter reads to start and import the agent.

    The guest starts the agent from these, at the same paths, before the host's
    /usr is mounted over them (a VM with a 9p export mounted cannot be saved),
    so that a VM restored from a snapshot resumes with its agent already
    loaded instead of reading an interpreter over 9p with a cold cache.
    """
    # guest: the guest's agent, with all it loads before the go line (linux, and so
    # ctypes, for its namespaces, mounts and seccomp filter; confine's parts).
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from agent import guest; "
        "sys.stdout.write(repr(sorted({getattr(m, '__file__', None) or '' for m in list(sys.modules.values())})))"
    )
    try:
        loaded = subprocess.run([GUEST_PYTHON, "-I", "-S", "-c", code, AGENT_PARENT],
                                capture_output=True, text=True, timeout=60, check=True).stdout  # fmt: skip
        paths = [p for p in ast.literal_eval(loaded) if p and not p.startswith(AGENT_PARENT + os.sep)]
        paths.append(GUEST_PYTHON)
        # The shared libraries of the interpreter and of the extension modules it loaded (libffi, ...).
        for binary in [GUEST_PYTHON, *(p for p in paths if p.endswith(".so"))]:
            libs = subprocess.run(["ldd", binary], capture_output=True, text=True, timeout=60, check=True).stdout
            paths += [word for line in libs.splitlines() for word in line.split() if word.startswith("/")]
    except (OSError, subprocess.SubprocessError) as exc:
        raise SandboxStartError(f"cannot list what {GUEST_PYTHON} loads: {exc}") from None
    entries: dict[str, tuple[int, bytes]] = {}
    for path in paths:
        _add_host_file(path, entries)
    dirs = set()
    for name in entries:
        parent = os.path.dirname(name)
        while parent and parent not in have_dirs:
            dirs.add(parent)
            parent = os.path.dirname(parent)
    out = [(d, stat.S_IFDIR | 0o755, b"") for d in sorted(dirs, key=lambda d: d.count("/"))]
    return out + [(name, mode, data) for name, (mode, data) in sorted(entries.items())]


def _bytecode_entries(entries: list[tuple[str, int, bytes]]) -> list[tuple[str, int, bytes]]:
    """Bytecode for every Python file of the initramfs, made by the guest's interpreter.

    Without it the guest compiles them at each boot (under TCG, most of a
    second). "unchecked-hash" pycs are used as they are: the archive's files
    carry no modification times for the usual check to compare.
    """
    sources = [(name, data) for name, mode, data in entries if stat.S_ISREG(mode) and name.endswith(".py")]
    work = tempfile.mkdtemp(prefix="stockade-pyc-")
    try:
        for i, (_name, data) in enumerate(sources):
            with open(os.path.join(work, f"{i}.py"), "wb") as f:
                f.write(data)
        code = (
            "import py_compile, sys\n"
            "for i in range(int(sys.argv[2])):\n"
            "    py_compile.compile(f'{sys.argv[1]}/{i}.py', cfile=f'{sys.argv[1]}/{i}.pyc', doraise=True,\n"
            "                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)\n"
            "print(sys.implementation.cache_tag)"
        )
        try:
            tag = subprocess.run([GUEST_PYTHON, "-I", "-S", "-c", code, work, str(len(sources))],
                                 capture_output=True, text=True, timeout=120, check=True).stdout.strip()  # fmt: skip
        except (OSError, subprocess.SubprocessError) as exc:
            raise SandboxStartError(f"{GUEST_PYTHON} could not compile the guest's Python files: {exc}") from None
        out: list[tuple[str, int, bytes]] = []
        have = {name for name, _mode, _data in entries}
        for i, (name, _data) in enumerate(sources):
            cache_dir = os.path.join(os.path.dirname(name), "__pycache__")
            if cache_dir not in have:
                have.add(cache_dir)
                out.append((cache_dir, stat.S_IFDIR | 0o755, b""))
            stem = os.path.basename(name)[: -len(".py")]
            with open(os.path.join(work, f"{i}.pyc"), "rb") as f:
                out.append((os.path.join(cache_dir, f"{stem}.{tag}.pyc"), stat.S_IFREG | 0o644, f.read()))
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _add_host_file(path: str, entries: dict[str, tuple[int, bytes]], depth: int = 0) -> None:
    """Add ``path`` (and whatever symlinks it goes through) under usr/ in the initramfs."""
    real = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    name = real.lstrip("/")
    if not name.startswith("usr/"):
        raise SandboxStartError(f"{path} is outside /usr ({real}): the guest image needs a merged-/usr host")
    if name in entries or depth > 8:
        return
    if os.path.islink(real):
        target = os.readlink(real)
        entries[name] = (stat.S_IFLNK | 0o777, target.encode())
        _add_host_file(os.path.normpath(os.path.join(os.path.dirname(real), target)), entries, depth + 1)
        return
    with open(real, "rb") as f:
        entries[name] = (stat.S_IFREG | (os.stat(real).st_mode & 0o755), f.read())


def cpio_entry(f: BinaryIO, ino: int, name: str, mode: int, data: bytes) -> None:
    """One entry of a newc ("070701") cpio archive, as the kernel's initramfs unpacker reads it."""
    raw_name = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw_name), 0]
    header = b"070701" + b"".join(b"%08X" % v for v in fields)
    f.write(header + raw_name)
    f.write(b"\0" * ((4 - (len(header) + len(raw_name)) % 4) % 4))
    f.write(data)
    f.write(b"\0" * ((4 - len(data) % 4) % 4))
