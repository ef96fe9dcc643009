"""``stockade ray resources``: what this node advertises to a Ray cluster (docs/scale-out.md)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .cli_outcome import whole_number
from .isolation import RUNTIME_NAMES

DEFAULT_ISOLATES = 64


def add_parser(subparsers: Any) -> None:
    ray = subparsers.add_parser("ray", help="this host as a node of a Ray cluster (the ray placement)")
    ray_sub = ray.add_subparsers(dest="ray_cmd", required=True)
    resources = ray_sub.add_parser(
        "resources",
        help="the custom resources this node offers the ray placement, as JSON for `ray start --resources`",
        description="One stockade_<runtime> resource per runtime `stockade doctor` finds usable here, each worth "
        'the number of such isolates the node holds at once. Use: ray start ... --resources "$(stockade ray '
        'resources)".',
    )
    resources.add_argument(
        "--isolates", type=whole_number(1), default=DEFAULT_ISOLATES, metavar="N",
        help=f"isolates of each runtime at once on this node (default {DEFAULT_ISOLATES})",
    )  # fmt: skip
    resources.add_argument(
        "--runtime", action="append", choices=SERVED, metavar="NAME", dest="runtimes",
        help="offer only this runtime (repeatable; default: every one usable here). The node keeps a warm pool "
             "of each it offers: a microVM's is a QEMU each, ~300 MB without KVM",
    )  # fmt: skip
    resources.set_defaults(func=cmd_ray_resources)


SERVED = tuple(name for name in RUNTIME_NAMES if name != "fake")  # a node never offers the fake one


def node_resources(isolates: int, runtimes: list[str] | None = None) -> dict[str, int]:
    """``{"stockade_process": N, ...}`` for every usable runtime of this host among ``runtimes``
    (default: all it serves); one asked for that is not usable here is refused."""
    from .errors import RuntimeUnavailableError
    from .placement.ray_cluster import resource_name
    from .runtimes.manager import RuntimeManager

    manager = RuntimeManager(pool_size=0)
    try:
        offered = {}
        for name in runtimes or SERVED:
            found = manager.availability(name)
            if found.available:
                offered[resource_name(name)] = isolates
            elif runtimes:
                raise RuntimeUnavailableError(f"--runtime {name}: {found.reason}")
        return offered
    finally:
        manager.close()


def cmd_ray_resources(args: argparse.Namespace) -> int:
    print(json.dumps(node_resources(args.isolates, args.runtimes), sort_keys=True))
    return 0
