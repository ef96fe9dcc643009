"""``stockade ray resources``: what this node advertises to a Ray cluster (docs/scale-out.md)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .cli_outcome import whole_number

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
    resources.set_defaults(func=cmd_ray_resources)


def node_resources(isolates: int) -> dict[str, int]:
    """``{"stockade_process": N, ...}`` for every usable runtime of this host (never the fake one)."""
    from .placement.ray import resource_name
    from .runtimes.manager import RuntimeManager

    manager = RuntimeManager(pool_size=0)
    try:
        return {
            resource_name(found.name): isolates
            for found in manager.doctor()
            if found.available and found.name != "fake"
        }  # fmt: skip
    finally:
        manager.close()


def cmd_ray_resources(args: argparse.Namespace) -> int:
    print(json.dumps(node_resources(args.isolates), sort_keys=True))
    return 0
