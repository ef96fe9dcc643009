"""``stockade k8s manifests``: what a cluster operator applies (k8s/manifests.py, docs/kubernetes.md)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parser(subparsers: Any) -> None:
    from .k8s.manifests import LEVELS, MICROVM_CLASSES

    k8s = subparsers.add_parser("k8s", help="Kubernetes: RuntimeClasses and agent-sandbox templates for isolates")
    k8s_sub = k8s.add_subparsers(dest="k8s_cmd", required=True)
    out = k8s_sub.add_parser(
        "manifests",
        help="print the manifests to apply: RuntimeClasses, a SandboxTemplate and SandboxWarmPool per level",
        description="Write YAML for `kubectl apply -f -`: the namespace, RuntimeClasses gvisor (runsc), kata-qemu "
        "and kata-fc, and per isolation level an agent-sandbox SandboxTemplate (the stockade agent image, "
        "resources from the policy flags, every ingress and egress denied) and its SandboxWarmPool.",
    )
    out.add_argument("--namespace", default="stockade", help="the namespace of the templates and pools")
    out.add_argument(
        "--image", required=True, help="the agent image, built from deploy/agent.Containerfile and pushed by you"
    )
    out.add_argument(
        "--level", action="append", choices=LEVELS, dest="levels", help="an isolation level (repeatable; default: all)"
    )
    out.add_argument("--warm", type=int, default=2, metavar="N", help="warm sandboxes per level (default 2)")
    out.add_argument(
        "--microvm-class", choices=MICROVM_CLASSES, default="kata-qemu", help="the RuntimeClass of microvm"
    )
    out.add_argument(
        "--controller-image",
        metavar="IMAGE",
        help="the stockade image (deploy/docker/Dockerfile, target runtime): adds the controller's Deployment, "
        "Service and ServiceMonitor",
    )
    out.add_argument("--ray-address", metavar="HOST:PORT", help="the controller places isolates on this Ray cluster")
    out.add_argument(
        "--controller-namespace", metavar="NS", help="the controller's namespace (default: NAMESPACE-system)"
    )
    out.add_argument("--cpu", type=float, help="each sandbox's CPU, cores (the Policy's cpu_limit)")
    out.add_argument("--memory-mb", type=int, help="each sandbox's memory (the Policy's memory_mb)")
    out.add_argument("--disk-mb", type=int, help="each sandbox's /work and /tmp, each (the Policy's disk_mb)")
    out.set_defaults(func=cmd_k8s_manifests)


def cmd_k8s_manifests(args: argparse.Namespace) -> int:
    from .errors import PolicyError
    from .k8s.manifests import LEVELS, manifests, to_yaml
    from .policy import Policy

    fields = {"cpu_limit": args.cpu, "memory_mb": args.memory_mb, "disk_mb": args.disk_mb}
    try:
        policy = Policy.build(**{k: v for k, v in fields.items() if v is not None})
        docs = manifests(
            namespace=args.namespace, image=args.image, levels=tuple(args.levels or LEVELS), warm=args.warm,
            policy=policy, microvm_class=args.microvm_class, controller_image=args.controller_image,
            ray_address=args.ray_address, controller_namespace=args.controller_namespace,
        )  # fmt: skip
    except (PolicyError, ValueError) as exc:
        print(f"stockade k8s manifests: {exc}", file=sys.stderr)
        return 2
    try:
        text = to_yaml(docs)
    except ImportError:
        print("stockade k8s manifests: needs PyYAML: pip install 'stockade[k8s]'", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0
