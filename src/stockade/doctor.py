"""``stockade doctor``: every runtime, whether it works here, and exactly why not."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict
from typing import Any

from .agent import linux
from .isolation import LEVEL_INFO, NOT_OFFERED, trust_map
from .runtimes.manager import RuntimeManager
from .runtimes.process.cgroup_layout import detect_layout
from .settings import current, unknown_variables


def _user_namespaces() -> str:
    try:
        with open("/proc/sys/user/max_user_namespaces") as f:
            if int(f.read()) == 0:
                return "disabled (user.max_user_namespaces = 0)"
    except OSError:
        pass
    try:
        with open("/proc/sys/kernel/unprivileged_userns_clone") as f:
            if f.read().strip() == "0" and os.getuid() != 0:
                return "disabled for unprivileged users (kernel.unprivileged_userns_clone = 0)"
    except OSError:
        pass
    return "enabled"


# What one isolate may hold of two host-wide counts, at the most a policy allows (pids_limit 4096,
# max_open_files 65536): both are kernel-wide, no cgroup, uid or namespace shares them out.
MOST_PIDS, MOST_FILES = 4096, 4096 * 65536


def kernel_budgets(max_sandboxes: int) -> list[str]:
    """Host-wide counts too small for what isolates may hold: filled, processes outside any isolate
    (unprivileged ones first, for files) and new isolates of every runtime fail."""
    checks = (
        ("fs.file-max", "every open file", MOST_FILES, "one isolate (max_open_files x pids_limit)",
         "9223372036854775807"),
        ("kernel.pid_max", "every task", (max_sandboxes + 1) * MOST_PIDS,
         "STOCKADE_MAX_SANDBOXES isolates (x pids_limit), and the host", "4194304"),
    )  # fmt: skip
    said = []
    for name, counts, need, holder, advice in checks:
        try:
            with open(f"/proc/sys/{name.replace('.', '/')}") as f:
                have = int(f.read())
        except (OSError, ValueError):
            continue
        if have < need:
            said.append(
                f"{name} = {have} counts {counts} on the host, and {holder} may take {need}: "
                f"set it higher (sysctl -w {name}={advice}, as systemd does at boot)"
            )
    return said


def collect() -> dict[str, Any]:
    layout = detect_layout()
    manager = RuntimeManager(pool_size=0)
    try:
        runtimes = [asdict(a) for a in manager.doctor()]
    finally:
        manager.close()
    for entry in runtimes:
        info = LEVEL_INFO[entry["isolation"]]
        entry["score"] = info.score
        entry["boundary"] = info.boundary
        entry["tradeoff"] = info.tradeoff
    return {
        "trust_map": trust_map(),
        "not_offered": NOT_OFFERED,
        "host": {
            "kernel": platform.release(),
            "arch": platform.machine(),
            "uid": os.getuid(),
            "mode": "root" if os.getuid() == 0 else "rootless",
            "user_namespaces": _user_namespaces(),
            "cgroup_version": layout.version,
            "cgroup_limits": sorted(layout.limits),
            # Where isolates' groups are made (STOCKADE_CGROUP_PARENT, or beside this process's own)
            "cgroup_parents": {**layout.v1_parents, **({"v2": layout.v2_parent} if layout.v2_parent else {})},
            "cgroup_problems": layout.problems,
            "landlock_abi": linux.landlock_abi(),
            "settings_problems": unknown_variables(),
            "kernel_budget_problems": kernel_budgets(current().max_sandboxes),
        },
        "runtimes": runtimes,
    }


def render(report: dict[str, Any]) -> str:
    host = report["host"]
    lines = [
        f"host      kernel {host['kernel']} ({host['arch']}), uid {host['uid']} ({host['mode']})",
        f"userns    {host['user_namespaces']}",
        f"cgroups   {host['cgroup_version']}; limits enforceable: {', '.join(host['cgroup_limits']) or 'none'}",
    ]
    parents = host["cgroup_parents"]
    if parents:
        lines.append("          isolates' groups under: " + ", ".join(f"{k} {v}" for k, v in sorted(parents.items())))
    lines += [f"          ! {p}" for p in host["cgroup_problems"]]
    lines += [f"settings  ! {p}" for p in host["settings_problems"]]
    lines += [f"kernel    ! {p}" for p in host["kernel_budget_problems"]]
    abi = host["landlock_abi"]
    lines.append(f"landlock  {'ABI ' + str(abi) if abi else 'not available (an extra layer only)'}")
    lines.append("")
    lines.append(f"{'runtime':<9} {'isolation':<9} {'score':>5}  {'status':<11} detail")
    for r in report["runtimes"]:
        status = "available" if r["available"] else "unavailable"
        detail = r["reason"] or ", ".join(f"{k}={v}" for k, v in r["details"].items() if k != "cgroup_problems")
        lines.append(f"{r['name']:<9} {r['isolation']:<9} {r['score']:>5}  {status:<11} {detail}")
    lines.append("")
    lines.append("trust     " + ", ".join(f"{t} -> {level} or stronger" for t, level in report["trust_map"].items()))
    for level, why in report["not_offered"].items():
        lines.append(f"no {level}: {why}")
    return "\n".join(lines)
