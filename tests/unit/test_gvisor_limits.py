"""What the gvisor runtime asks of the host for a policy: its cgroup, its container's rlimits.

gVisor itself (the Sentry, the gofer) and the agent live inside the sandbox's limits,
so a limit the policy accepts but gVisor could not start under is raised to what it
needs, and the result says so (``unenforced_limits``).
"""

from __future__ import annotations

import json
import os

from stockade.agent.commands import AGENT_FDS
from stockade.policy import Policy
from stockade.runtimes import gvisor, gvisor_bundle


class _Group:
    """An isolate's cgroup that records what it is asked to hold."""

    def __init__(self) -> None:
        self.written: tuple[int, int, float] | None = None
        self.setup: bool | None = None

    def apply_limits(self, memory_mb: int, pids: int, cpu: float, *, setup: bool = False) -> list[str]:
        self.written, self.setup = (memory_mb, pids, cpu), setup
        return []


def test_memory_below_what_gvisor_itself_needs_is_raised_and_reported() -> None:
    group = _Group()
    missing = gvisor._apply_limits(group, Policy(memory_mb=16))  # type: ignore[arg-type]
    assert group.written is not None and group.written[0] == gvisor.GVISOR_MIN_MB == 64
    assert missing == ["memory_mb below 64: the sandbox gets 64 MB (gVisor itself counts)"]
    group = _Group()
    assert gvisor._apply_limits(group, Policy(memory_mb=64)) == []  # type: ignore[arg-type]
    assert group.written is not None and group.written[0] == 64


def _rlimits(bundle: str, policy: Policy) -> dict[str, int]:
    gvisor_bundle.write_bundle(bundle, policy, warm=False)
    with open(os.path.join(bundle, "config.json")) as f:
        config = json.load(f)
    return {r["type"]: r["hard"] for r in config["process"]["rlimits"]}


def test_the_agent_keeps_the_descriptors_it_needs(tmp_path: os.PathLike[str]) -> None:
    # The container's init is the agent: below its own need it could not serve (EMFILE);
    # each command still gets the policy's limit from the agent (a runner when lower).
    assert _rlimits(os.path.join(tmp_path, "a"), Policy(max_open_files=16))["RLIMIT_NOFILE"] == AGENT_FDS
    assert _rlimits(os.path.join(tmp_path, "b"), Policy(max_open_files=1000))["RLIMIT_NOFILE"] == 1000


def test_with_mapped_uids_a_read_only_share_is_bound_by_the_host_and_a_writable_one_as_it_is(
    tmp_path: os.PathLike[str],
) -> None:
    # The gofer binds a source as the spec says, and Linux ignores "ro" on a first bind: a read-only
    # share's source is a place in the bundle, which the host binds read-only before runsc starts.
    shares = os.path.join(tmp_path, "shares")
    os.makedirs(os.path.join(shares, "ro"))
    os.makedirs(os.path.join(shares, "rw"))
    with open(os.path.join(shares, "one.txt"), "w") as f:
        f.write("x")
    policy = Policy(filesystem_access=[f"{shares}/ro:/work/ro", f"{shares}/rw:/mnt/rw:rw", f"{shares}/one.txt:/one"])
    for ids, expected in ((None, 0), (gvisor_bundle.HostIds(1879048193, 1879048195), 2)):
        bundle = os.path.join(tmp_path, f"bundle-{expected}")
        os.makedirs(bundle)
        read_only = gvisor_bundle.write_bundle(bundle, policy, warm=False, ids=ids)
        with open(os.path.join(bundle, "config.json")) as f:
            sources = {m["destination"]: m["source"] for m in json.load(f)["mounts"]}
        assert len(read_only) == expected
        assert sources["/mnt/rw"] == os.path.join(shares, "rw")  # written through the gofer, as it was
        if ids is None:  # rootless: runsc and the code are the caller; nothing to bind
            assert sources["/work/ro"] == os.path.join(shares, "ro") and sources["/one"] == os.path.join(
                shares, "one.txt"
            )
            continue
        assert read_only == [
            (os.path.join(shares, "ro"), sources["/work/ro"]),
            (os.path.join(shares, "one.txt"), sources["/one"]),
        ]
        assert os.path.isdir(sources["/work/ro"]) and os.path.isfile(sources["/one"])  # places of the right kind
        assert all(place.startswith(os.path.join(bundle, "shares") + "/") for _, place in read_only)
        assert os.path.isdir(os.path.join(bundle, "rootfs", "work", "ro"))  # its mount point, made below /work too
