"""Thin ctypes wrappers over the Linux calls that Python 3.11 does not expose.

Stdlib-only: it runs in the process runtime's zygote (``/usr/bin/python3 -I -S``)
between fork and the start of the agent. Every wrapper raises ``OSError`` with
the call's name, so a failed confinement step says which step failed.
"""

from __future__ import annotations

import ctypes
import os
import stat
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# clone/unshare flags
CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACE_FLAGS = (
    CLONE_NEWTIME
    | CLONE_NEWNS
    | CLONE_NEWCGROUP
    | CLONE_NEWUTS
    | CLONE_NEWIPC
    | CLONE_NEWUSER
    | CLONE_NEWPID
    | CLONE_NEWNET
)

# mount flags
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MNT_DETACH = 2

# prctl
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAP_V3 = 0x20080522  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words per set

# x86_64 syscall numbers of calls without a libc wrapper we can rely on.
_NR_PIVOT_ROOT = 155
_NR_SECCOMP = 317
_NR_LANDLOCK_CREATE_RULESET = 444
_NR_LANDLOCK_ADD_RULE = 445
_NR_LANDLOCK_RESTRICT_SELF = 446
_NR_MOUNT_SETATTR = 442

MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int) -> None:
    """Join a namespace (``fd``: a namespace file or a pidfd); for CLONE_NEWNET, this thread only."""
    _check(_libc.setns(fd, nstype), "setns")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    ret = _libc.mount(
        os.fsencode(source) if source else None,
        os.fsencode(target),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    _check(ret, f"mount {source or fstype} on {target}")


def mount_setattr_recursive(target: str, attr_set: int) -> None:
    """Set ``attr_set`` (MOUNT_ATTR_*) on the mount at ``target`` and every mount below it, and
    clear nothing (Linux 5.12: ENOSYS before)."""
    attr = ctypes.create_string_buffer(struct.pack("QQQQ", attr_set, 0, 0, 0), 32)
    ret = _libc.syscall(_NR_MOUNT_SETATTR, _AT_FDCWD, os.fsencode(target), _AT_RECURSIVE, attr, ctypes.c_size_t(32))
    _check(ret, f"mount_setattr {target}")


def mountinfo_path(field: str) -> str:
    """A path as mountinfo writes it: space, tab, newline and backslash octal-escaped."""
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field


def mount_table() -> list[tuple[str, str, str, str]]:
    """This thread's mounts (a thread may have unshared its namespace), in mountinfo's order:
    (device, its root mounted, mount point, filesystem type) each."""
    with open("/proc/thread-self/mountinfo", "rb") as f:
        lines = f.read().decode(errors="surrogateescape").splitlines()
    table = []
    for line in lines:
        fields = line.split(" ")
        kind = fields[fields.index("-", 6) + 1]  # after the optional fields, which end with "-"
        table.append((fields[2], mountinfo_path(fields[3]), mountinfo_path(fields[4]), kind))
    return table


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(os.fsencode(target), flags), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(_NR_PIVOT_ROOT, os.fsencode(new_root), os.fsencode(put_old)), "pivot_root")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), "sethostname")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    args = (ctypes.c_ulong(a) for a in (arg2, arg3, arg4, arg5))
    return _check(_libc.prctl(option, *args), f"prctl({option})")


def drop_bounding_set(keep: tuple[int, ...] = ()) -> None:
    """Empty the bounding set but for ``keep`` (needs CAP_SETPCAP: a no-op without it)."""
    cap = 0
    while True:
        if cap not in keep and _libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) < 0:
            break  # EINVAL past the last capability the kernel knows
        cap += 1


def drop_all_capabilities() -> None:
    """Empty the bounding, ambient, effective, permitted and inheritable sets."""
    drop_bounding_set()
    _libc.prctl(PR_CAP_AMBIENT, ctypes.c_ulong(PR_CAP_AMBIENT_CLEAR_ALL), 0, 0, 0)
    # struct __user_cap_header_struct {u32 version; int pid}; version 3 = 64-bit sets.
    header = struct.pack("Ii", _CAP_V3, 0)
    data = bytes(24)  # two zeroed {effective, permitted, inheritable} u32 triples
    _check(_libc.capset(header, data), "capset")


_NR_OPENAT2 = 437
RESOLVE_NO_XDEV, RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, RESOLVE_BENEATH = 0x01, 0x02, 0x04, 0x08


def open_beneath(dirfd: int, path: str, flags: int) -> int:
    """``path`` opened below the directory ``dirfd`` and on its mount, through no symlink and no
    /proc magic link (openat2 with RESOLVE_BENEATH, NO_SYMLINKS, NO_MAGICLINKS, NO_XDEV)."""
    resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV
    how = ctypes.create_string_buffer(struct.pack("QQQ", flags | os.O_CLOEXEC, 0, resolve), 24)
    fd = _libc.syscall(_NR_OPENAT2, dirfd, os.fsencode(path), how, ctypes.c_size_t(24))
    return _check(fd, f"openat2 {path}")


CAP_KILL = 5
PR_SET_KEEPCAPS = 8


def become_user_keeping(uid: int, gid: int, groups: list[int], keep: tuple[int, ...]) -> None:
    """As root: become ``uid``/``gid`` (with ``groups``) for good, keeping only the capabilities
    ``keep`` (in this thread, and in the threads it starts afterwards); nothing inheritable or ambient."""
    prctl(PR_SET_KEEPCAPS, 1)
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    prctl(PR_SET_KEEPCAPS, 0)
    mask = 0
    for cap in keep:
        mask |= 1 << cap
    header = struct.pack("Ii", _CAP_V3, 0)
    data = struct.pack("6I", mask & 0xFFFFFFFF, mask & 0xFFFFFFFF, 0, mask >> 32, mask >> 32, 0)
    _check(_libc.capset(header, data), "capset")
    _libc.prctl(PR_CAP_AMBIENT, ctypes.c_ulong(PR_CAP_AMBIENT_CLEAR_ALL), 0, 0, 0)


def keep_capabilities_across_exec() -> None:
    """Make every permitted capability inheritable and ambient, so that it survives execve.

    An exec as a non-root uid would otherwise empty the permitted set; the
    capabilities meant here are those of the isolate's own user namespace.
    """
    header = ctypes.create_string_buffer(struct.pack("Ii", _CAP_V3, 0), 8)
    data = ctypes.create_string_buffer(24)
    _check(_libc.capget(header, data), "capget")
    eff0, perm0, _inh0, eff1, perm1, _inh1 = struct.unpack("6I", data.raw)
    _check(_libc.capset(header, struct.pack("6I", eff0, perm0, perm0, eff1, perm1, perm1)), "capset")
    permitted = perm0 | (perm1 << 32)
    for cap in range(64):
        if permitted >> cap & 1:
            prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)


def seccomp_install_listener(program: bytes) -> int:
    """Load a classic-BPF seccomp filter and return its user-notification fd."""
    return seccomp_install(program, SECCOMP_FILTER_FLAG_NEW_LISTENER)


def seccomp_install(program: bytes, flags: int = 0) -> int:
    """Load a classic-BPF seccomp filter on the calling thread (and what it starts from then on)."""
    count = len(program) // 8
    buf = ctypes.create_string_buffer(program, len(program))
    # struct sock_fprog {unsigned short len; struct sock_filter *filter;}
    fprog = struct.pack("HxxxxxxQ", count, ctypes.addressof(buf))
    fbuf = ctypes.create_string_buffer(fprog, len(fprog))
    return _check(_libc.syscall(_NR_SECCOMP, SECCOMP_SET_MODE_FILTER, flags, fbuf), "seccomp")


SECCOMP_IOCTL_NOTIF_RECV = 0xC0502100  # _IOWR('!', 0, struct seccomp_notif)
SECCOMP_IOCTL_NOTIF_SEND = 0xC0182101  # _IOWR('!', 1, struct seccomp_notif_resp)
_NOTIF = struct.Struct("<QIIIIQ6Q")  # id, pid, flags, nr, arch, ip, args[6]
_NOTIF_RESP = struct.Struct("<QqiI")  # id, val, error, flags
AUDIT_ARCH_X86_64 = 0xC000003E


def seccomp_notif_recv(listener: int) -> tuple[int, int, int, tuple[int, ...]] | None:
    """The next blocked call on ``listener`` (waits for one): (id, pid, call, args).

    ``call`` names the call across ABIs: an x86_64 call's number as the kernel
    saw it, unsigned (x32's have bit 30 set, a negative one is 2**31 or more);
    a call through another ABI (i386's ``int 0x80``) is ``arch << 32 | number``,
    so that its number is never read as the x86_64 call it equals
    (runtimes/process/seccomp.py names them). None when the caller died before
    it could be read (ENOENT), or the listener is gone.
    """
    import fcntl

    buf = bytearray(_NOTIF.size)
    try:
        fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, buf, True)
    except OSError:
        return None
    notif_id, pid, _flags, nr, arch, _ip, *args = _NOTIF.unpack(buf)
    call = nr if arch == AUDIT_ARCH_X86_64 else arch << 32 | nr
    return notif_id, pid, call, tuple(args)


def seccomp_notif_deny(listener: int, notif_id: int, err: int) -> None:
    """Make the blocked call ``notif_id`` fail with ``err`` (never run it). Quiet if its caller is gone."""
    import fcntl

    try:
        fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, bytearray(_NOTIF_RESP.pack(notif_id, 0, -err, 0)), True)
    except OSError:
        pass


SECCOMP_IOCTL_NOTIF_ID_VALID = 0x40082102  # _IOW('!', 2, __u64)
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1


def seccomp_notif_continue(listener: int, notif_id: int) -> None:
    """Let the blocked call ``notif_id`` run as if it had not been stopped. Quiet if its caller is gone."""
    import fcntl

    response = _NOTIF_RESP.pack(notif_id, 0, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE)
    try:
        fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, bytearray(response), True)
    except OSError:
        pass


def seccomp_notif_id_valid(listener: int, notif_id: int) -> bool:
    """Whether the call ``notif_id`` still waits: what was read of its memory was its caller's."""
    import fcntl

    try:
        fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_ID_VALID, bytearray(struct.pack("<Q", notif_id)), True)
    except OSError:
        return False
    return True


# ---- Landlock ----------------------------------------------------------------

LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
LL_EXECUTE = 1 << 0
LL_WRITE_FILE = 1 << 1
LL_READ_FILE = 1 << 2
LL_READ_DIR = 1 << 3
LL_REMOVE_DIR = 1 << 4
LL_REMOVE_FILE = 1 << 5
LL_MAKE_CHAR = 1 << 6
LL_MAKE_DIR = 1 << 7
LL_MAKE_REG = 1 << 8
LL_MAKE_SOCK = 1 << 9
LL_MAKE_FIFO = 1 << 10
LL_MAKE_BLOCK = 1 << 11
LL_MAKE_SYM = 1 << 12
LL_REFER = 1 << 13  # ABI 2
LL_TRUNCATE = 1 << 14  # ABI 3
LL_IOCTL_DEV = 1 << 15  # ABI 5
# The rights that apply to a file (the others are about a directory's entries).
LL_FILE_RIGHTS = LL_EXECUTE | LL_WRITE_FILE | LL_READ_FILE | LL_TRUNCATE | LL_IOCTL_DEV
LL_NET_BIND_TCP = 1 << 0  # ABI 4
LL_NET_CONNECT_TCP = 1 << 1
LL_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
LL_SCOPE_SIGNAL = 1 << 1


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 where Landlock is absent or disabled."""
    ret = _libc.syscall(_NR_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), LANDLOCK_CREATE_RULESET_VERSION)
    return max(int(ret), 0)


def landlock_fs_rights(abi: int) -> int:
    rights = (1 << 13) - 1  # EXECUTE .. MAKE_SYM (ABI 1)
    if abi >= 2:
        rights |= LL_REFER
    if abi >= 3:
        rights |= LL_TRUNCATE
    if abi >= 5:
        rights |= LL_IOCTL_DEV
    return rights


def landlock_restrict(abi: int, rules: list[tuple[str, int]], deny_tcp: bool, scope: bool) -> None:
    """Restrict this thread and its future children to ``rules`` (path, rights)."""
    handled_fs = landlock_fs_rights(abi)
    handled_net = (LL_NET_BIND_TCP | LL_NET_CONNECT_TCP) if (deny_tcp and abi >= 4) else 0
    scoped = (LL_SCOPE_ABSTRACT_UNIX_SOCKET | LL_SCOPE_SIGNAL) if (scope and abi >= 6) else 0
    if abi >= 6:
        attr = struct.pack("QQQ", handled_fs, handled_net, scoped)
    elif abi >= 4:
        attr = struct.pack("QQ", handled_fs, handled_net)
    else:
        attr = struct.pack("Q", handled_fs)
    ruleset = _check(
        _libc.syscall(_NR_LANDLOCK_CREATE_RULESET, attr, ctypes.c_size_t(len(attr)), 0),
        "landlock_create_ruleset",
    )
    try:
        for path, rights in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                # The kernel refuses directory rights on a file (EINVAL).
                applicable = handled_fs if stat.S_ISDIR(os.fstat(fd).st_mode) else handled_fs & LL_FILE_RIGHTS
                # struct landlock_path_beneath_attr is packed: u64 allowed_access; s32 parent_fd
                rule = struct.pack("=Qi", rights & applicable, fd)
                _check(
                    _libc.syscall(_NR_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, rule, 0),
                    f"landlock_add_rule {path}",
                )
            finally:
                os.close(fd)
        _check(_libc.syscall(_NR_LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
    finally:
        os.close(ruleset)
