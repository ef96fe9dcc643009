"""``stockade k8s manifests``: RuntimeClasses, agent-sandbox SandboxTemplates and SandboxWarmPools.

Seed 003 maps isolation levels to Kubernetes RuntimeClasses; the kubernetes-sigs
agent-sandbox project (``extensions.agents.x-k8s.io/v1beta1``) is where a
cluster keeps warm sandbox pods to claim. Each stockade isolation level becomes
one SandboxTemplate whose pod is one isolate:

- ``gvisor`` runs under the ``gvisor`` RuntimeClass (handler ``runsc``);
- ``microvm`` under a Kata Containers one (``kata-qemu``, or ``kata-fc`` for Firecracker);
- ``process`` under the node's default runtime, confined by the pod's own
  securityContext (no capabilities, non-root, no privilege escalation, the
  runtime's default seccomp profile, a read-only root).

The pod's one container is the stockade agent, speaking the agent protocol on
its standard input and output exactly as it does as a gVisor container's init
(``runtimes/gvisor.py``): a client reaches it through the API server's
``attach`` (``stdin: true``), so the pod takes no connection at all and its
NetworkPolicy denies every ingress, and for ``network_policy`` ``none`` (the
default) every egress too. The Policy's limits become the container's
resources (requests equal to limits: the Guaranteed class) and the size of its
``/work`` and ``/tmp``.
"""

from __future__ import annotations

import re
from typing import Any

from ..policy import Policy
from ..runtimes.base import BASE_ENV

AGENT_SANDBOX_GROUP = "extensions.agents.x-k8s.io/v1beta1"
LEVELS = ("process", "gvisor", "microvm")
MICROVM_CLASSES = ("kata-qemu", "kata-fc")
AGENT_UID = 1000
# What each Kata VM costs its node beyond the pod's containers (Kata's own documented defaults);
# the scheduler adds it to the pod's requests.
_KATA_OVERHEAD = {"kata-qemu": {"memory": "160Mi", "cpu": "250m"}, "kata-fc": {"memory": "130Mi", "cpu": "250m"}}
_HANDLERS = {"gvisor": "runsc", "kata-qemu": "kata-qemu", "kata-fc": "kata-fc"}
# The label kata-deploy puts on each node it installs Kata on (and its own RuntimeClasses select):
# a Kata pod scheduled elsewhere would fail at its sandbox's creation, after the scheduler chose it.
_KATA_NODES = {"katacontainers.io/kata-runtime": "true"}
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")  # RFC 1123, as Kubernetes names namespaces
_HOST_PORT = re.compile(r"([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})")
# Namespaces the output must not relabel: applied, its Namespace object's Pod Security label would
# merge into theirs (a shared namespace made privileged, or its pods refused under restricted).
_SHARED_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


def runtime_classes() -> list[dict[str, Any]]:
    """``gvisor`` (runsc), ``kata-qemu`` and ``kata-fc``, each with the overhead the scheduler must count."""
    classes = []
    for name, handler in _HANDLERS.items():
        rc: dict[str, Any] = {
            "apiVersion": "node.k8s.io/v1",
            "kind": "RuntimeClass",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "stockade"}},
            "handler": handler,
        }
        if name in _KATA_OVERHEAD:
            rc["overhead"] = {"podFixed": dict(_KATA_OVERHEAD[name])}
            rc["scheduling"] = {"nodeSelector": dict(_KATA_NODES)}
        classes.append(rc)
    return classes


def _quantity_cpu(cores: float) -> str:
    return f"{round(cores * 1000)}m"


def _container(policy: Policy, image: str) -> dict[str, Any]:
    from ..runtimes.gvisor_bundle import CONTAINER_BOOT

    limits = {
        "cpu": _quantity_cpu(policy.cpu_limit),
        "memory": f"{policy.memory_mb}Mi",
        "ephemeral-storage": f"{policy.disk_mb}Mi",
    }
    env = {**BASE_ENV, "STOCKADE_AGENT_FD": "stdio"}
    return {
        "name": "agent",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python3", "-I", "-S", "-c", CONTAINER_BOOT],
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "workingDir": "/work",
        "stdin": True,  # the agent protocol, through the API server's attach
        "stdinOnce": False,
        "tty": False,
        "resources": {"requests": dict(limits), "limits": limits},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": AGENT_UID,
            "runAsGroup": AGENT_UID,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": "work", "mountPath": "/work"}, {"name": "tmp", "mountPath": "/tmp"}],
    }


def sandbox_template(level: str, policy: Policy, image: str, microvm_class: str = "kata-qemu") -> dict[str, Any]:
    """The SandboxTemplate of one isolation level, its pod sized by ``policy``."""
    if level not in LEVELS:
        raise ValueError(f"isolation level {level!r}: one of {', '.join(LEVELS)}")
    if microvm_class not in MICROVM_CLASSES:
        raise ValueError(f"microVM runtime class {microvm_class!r}: one of {', '.join(MICROVM_CLASSES)}")
    if policy.network_policy not in ("none", "loopback"):
        raise ValueError(
            f"network_policy {policy.network_policy!r}: a pod's NetworkPolicy cannot filter by host name, "
            "and stockade's egress proxy does not run in the cluster: only none or loopback"
        )
    scratch = {"sizeLimit": f"{policy.disk_mb}Mi"}
    spec: dict[str, Any] = {
        "automountServiceAccountToken": False,  # code in the pod gets no credentials to the API server
        "enableServiceLinks": False,
        "hostNetwork": False,
        "hostPID": False,
        "hostIPC": False,
        "shareProcessNamespace": False,
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": 5,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": AGENT_UID,
            "runAsGroup": AGENT_UID,
            "fsGroup": AGENT_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(policy, image)],
        "volumes": [{"name": "work", "emptyDir": dict(scratch)}, {"name": "tmp", "emptyDir": dict(scratch)}],
    }
    if level == "gvisor":
        spec["runtimeClassName"] = "gvisor"
    elif level == "microvm":
        spec["runtimeClassName"] = microvm_class
    labels = {"app.kubernetes.io/part-of": "stockade", "stockade.dev/isolation": level}
    return {
        "apiVersion": AGENT_SANDBOX_GROUP,
        "kind": "SandboxTemplate",
        "metadata": {"name": f"stockade-{level}", "labels": labels},
        "spec": {
            "podTemplate": {"metadata": {"labels": dict(labels)}, "spec": spec},
            # Managed, with no rule: every ingress and every egress denied (the agent is attached to).
            "networkPolicyManagement": "Managed",
            "networkPolicy": {"ingress": [], "egress": []},
            "envVarsInjectionPolicy": "Disallowed",
            "volumeClaimTemplatesPolicy": "Disallowed",
        },
    }


def warm_pool(level: str, replicas: int) -> dict[str, Any]:
    spec = {
        "replicas": replicas,
        "sandboxTemplateRef": {"name": f"stockade-{level}"},
        "updateStrategy": {"type": "OnReplenish"},
    }
    labels = {"app.kubernetes.io/part-of": "stockade"}
    return {
        "apiVersion": AGENT_SANDBOX_GROUP,
        "kind": "SandboxWarmPool",
        "metadata": {"name": f"stockade-{level}", "labels": labels},
        "spec": spec,
    }


def manifests(
    image: str,
    namespace: str = "stockade",
    levels: tuple[str, ...] = LEVELS,
    warm: int = 2,
    policy: Policy | None = None,
    microvm_class: str = "kata-qemu",
    controller_image: str | None = None,
    ray_address: str | None = None,
    controller_namespace: str | None = None,
) -> list[dict[str, Any]]:
    """Everything, in the order to apply it: the namespace, the RuntimeClasses, then per level
    a template and its pool; with ``controller_image``, the controller (k8s/controller.py) last."""
    if warm < 0:
        raise ValueError(f"warm pool size {warm}: at least 0")
    if ray_address is not None and controller_image is None:
        raise ValueError("a Ray address is the controller's placement: give the controller's image too")
    if controller_namespace is not None and controller_image is None:
        raise ValueError("a controller namespace is the controller's: give the controller's image too")
    derived = f"{namespace}-system" if controller_image is not None and controller_namespace is None else None
    for what, value in (("namespace", namespace), ("controller namespace", controller_namespace or derived)):
        if value is not None and not _DNS_LABEL.fullmatch(value):
            raise ValueError(
                f"{what} {value!r} is not a Kubernetes namespace name (1-63 of a-z, 0-9, '-', "
                "starting and ending with a letter or digit)"
            )
        if value is not None and (value in _SHARED_NAMESPACES or value.startswith("kube-")):
            raise ValueError(
                f"{what} {value!r} is one the cluster shares: the output labels its namespaces for Pod Security "
                "admission, which would change what that namespace admits; name one of stockade's own"
            )
    for what, value in (("image", image), ("controller image", controller_image)):
        if value is not None and (not value or any(c.isspace() for c in value)):
            raise ValueError(f"{what} {value!r} is not an image reference (such as registry.example/stockade:1)")
    if ray_address is not None:
        matched = _HOST_PORT.fullmatch(ray_address)
        if matched is None or not 0 < int(matched.group(2)) < 65536:
            raise ValueError(
                f"Ray address {ray_address!r} is not HOST:PORT (the cluster's GCS, such as ray-head:6379; the pod "
                "joins the cluster there, so 'auto' cannot find it)"
            )
    policy = policy or Policy()
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": {
            "app.kubernetes.io/part-of": "stockade",
            # The pods of the templates meet the restricted Pod Security Standard; say so to the admission.
            "pod-security.kubernetes.io/enforce": "restricted",
        }}},
    ]  # fmt: skip
    docs += runtime_classes()
    for level in levels:
        template = sandbox_template(level, policy, image, microvm_class)
        template["metadata"]["namespace"] = namespace
        pool = warm_pool(level, warm)
        pool["metadata"]["namespace"] = namespace
        docs += [template, pool]
    if controller_image is not None:
        from .controller import controller

        system = controller_namespace or f"{namespace}-system"
        if system == namespace:
            raise ValueError(f"the controller's namespace must not be {namespace!r}, the sandboxes' own")
        docs += controller(system, controller_image, ray_address)
    return docs


def to_yaml(docs: list[dict[str, Any]]) -> str:
    import yaml  # type: ignore[import-untyped, unused-ignore]

    return "".join("---\n" + yaml.safe_dump(doc, sort_keys=False, width=120) for doc in docs)
