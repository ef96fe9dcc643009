"""The stockade controller in a cluster: its Deployment, audit volume, Service and ServiceMonitor.

The controller is ``stockade serve`` with its HTTP API (``--http 0.0.0.0:8002
--no-socket``), its bearer token from a Secret the operator makes, and its
``/metrics`` scraped by Prometheus with a token of its own that reads nothing else (a prometheus-operator
ServiceMonitor; a bare Prometheus reads the Service's ``prometheus.io/*``
annotations and needs the token in its scrape config). Where it places
isolates decides what its pod may do:

- ``ray`` (``--ray-address``): isolates on a Ray cluster's nodes; the pod
  joins the cluster as a node that offers nothing (a Ray driver must run on a
  node) and places isolates elsewhere, so it meets the ``restricted`` Pod
  Security Standard (non-root, no capability, read-only root). Its image needs
  the ``ray`` extra (``--build-arg EXTRAS=server,ray``);
- ``local``: isolates in the controller's own pod, which then needs what any
  nesting sandbox needs (namespaces, cgroups, seccomp notifications, runsc):
  a privileged pod, on nodes the operator labels ``stockade.dev/isolation-host``,
  in a namespace of its own that admits it.
"""

from __future__ import annotations

import json
from typing import Any

NAME = "stockade-controller"
PORT = 8002
# The Secret holding the API's bearer token, which the operator makes (docs/kubernetes.md): names, not values.
TOKEN_SECRET = "stockade-api-token"  # noqa: S105
TOKEN_KEY = "token"  # noqa: S105
# Prometheus's own token, which reads /metrics and nothing else (STOCKADE_METRICS_TOKEN): a scraper
# never holds the one that runs code. The operator makes it too.
METRICS_SECRET = "stockade-metrics-token"  # noqa: S105
STATE_DIR = "/var/lib/stockade"
# The audit log on a volume of its own that outlives the pod (the state dir is an emptyDir: a rollout,
# an eviction or a reschedule would take the whole hash chain with it). Its size: the log's default
# rotation (10 backups of 64 MiB, and the file being written) and room to spare.
AUDIT_DIR = f"{STATE_DIR}/audit"
AUDIT_CLAIM = f"{NAME}-audit"
AUDIT_SIZE = "1Gi"
VENV = "/opt/stockade/.venv"  # deploy/docker/Dockerfile's
ISOLATION_HOST_LABEL = "stockade.dev/isolation-host"
_LABELS = {"app.kubernetes.io/name": NAME, "app.kubernetes.io/part-of": "stockade"}


def _env(ray_address: str | None) -> list[dict[str, Any]]:
    placement = json.dumps({"type": "ray", "address": ray_address}) if ray_address else "local"
    env: list[dict[str, Any]] = [
        {"name": "STOCKADE_API_TOKEN", "valueFrom": {"secretKeyRef": {"name": TOKEN_SECRET, "key": TOKEN_KEY}}},
        # Optional: without it the controller still starts (only its scrapes fail, naming the Secret).
        {
            "name": "STOCKADE_METRICS_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": METRICS_SECRET, "key": TOKEN_KEY, "optional": True}},
        },
        {"name": "STOCKADE_PLACEMENT", "value": placement},
        {"name": "HOME", "value": STATE_DIR},
        {"name": "STOCKADE_AUDIT_LOG", "value": f"{AUDIT_DIR}/audit.log"},
    ]
    if ray_address:
        env.append({"name": "RAY_ADDRESS", "value": ray_address})
    else:
        env += [
            {"name": "STOCKADE_DAEMON_USER", "value": "root"},  # the pod is the isolation host
            # Said, though a daemon's default: callers share none of the pod's files, and their sandboxes'
            # egress reaches public addresses only (not the cloud's metadata, the cluster's services).
            {"name": "STOCKADE_MOUNT_ROOTS", "value": "none"},
            {"name": "STOCKADE_EGRESS_NETWORKS", "value": "none"},
        ]
    return env


def _command(ray_address: str | None) -> list[str]:
    serve = [f"{VENV}/bin/stockade", "serve", "--http", f"0.0.0.0:{PORT}", "--no-socket"]
    if not ray_address:
        return serve
    # A Ray driver runs on a node of its cluster: the pod joins it first as a node that offers
    # nothing (no CPU, no stockade_* resource: no isolate is ever placed on it).
    # No API token in the node's environment: Ray's workers on the node would inherit it (memory,
    # resources none either: nothing is ever scheduled there).
    join = (
        f'env -u STOCKADE_API_TOKEN {VENV}/bin/ray start --address="$RAY_ADDRESS" --num-cpus=0 --num-gpus=0 '
        "--memory=0 --disable-usage-stats"
    )
    return ["/bin/sh", "-c", f"{join} && exec {' '.join(serve)}"]


def _container(image: str, ray_address: str | None) -> dict[str, Any]:
    probe = {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 10, "timeoutSeconds": 5}
    container: dict[str, Any] = {
        "name": "controller",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": _command(ray_address),
        "env": _env(ray_address),
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        # /ready answers 503 while its Ray cluster is unreachable (no traffic then: a request would only
        # be refused).
        "readinessProbe": {**probe, "initialDelaySeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/v1/ping", "port": "http"}, "periodSeconds": 20, "failureThreshold": 6},
        # Its start (joining the Ray cluster, filling the warm pool) may take minutes on a busy node: the
        # liveness probe waits for it, or would restart a pod that is only starting, again and again.
        "startupProbe": {"httpGet": {"path": "/v1/ping", "port": "http"}, "periodSeconds": 5, "failureThreshold": 120},
        "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}},
        "volumeMounts": [
            {"name": "state", "mountPath": STATE_DIR},
            {"name": "audit", "mountPath": AUDIT_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    if ray_address:
        container["securityContext"] = {
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        }
    else:
        container["securityContext"] = {"privileged": True, "runAsUser": 0}
        container["resources"]["requests"] = {"cpu": "2", "memory": "4Gi"}  # its isolates run in it
        container["resources"]["limits"] = {"cpu": "8", "memory": "16Gi"}
    return container


def deployment(namespace: str, image: str, ray_address: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "serviceAccountName": NAME,
        "automountServiceAccountToken": False,  # it calls no Kubernetes API
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 30,  # STOCKADE_SHUTDOWN_GRACE (10 s) for running work, then teardown
        "containers": [_container(image, ray_address)],
        "volumes": [
            {"name": "state", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "audit", "persistentVolumeClaim": {"claimName": AUDIT_CLAIM}},
        ],
    }
    if ray_address:
        # fsGroup: the audit volume is made writable for the controller's non-root user.
        spec["securityContext"] = {"runAsNonRoot": True, "fsGroup": 1000,
                                   "seccompProfile": {"type": "RuntimeDefault"}}  # fmt: skip
    else:
        spec["nodeSelector"] = {ISOLATION_HOST_LABEL: "true"}
        spec["tolerations"] = [{"key": ISOLATION_HOST_LABEL, "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": NAME, "namespace": namespace, "labels": dict(_LABELS)},
        "spec": {
            "replicas": 1,  # held sandboxes live in one controller: more replicas need sticky routing
            "selector": {"matchLabels": dict(_LABELS)},
            "strategy": {"type": "Recreate"},
            "template": {"metadata": {"labels": dict(_LABELS)}, "spec": spec},
        },
    }


def audit_claim(namespace: str) -> dict[str, Any]:
    """The audit log's volume: the cluster's default StorageClass, one node's at a time (the
    Deployment's one replica, recreated, never two at once)."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": AUDIT_CLAIM, "namespace": namespace, "labels": dict(_LABELS)},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": AUDIT_SIZE}}},
    }


def service(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": NAME,
            "namespace": namespace,
            "labels": dict(_LABELS),
            # For a Prometheus that discovers by annotation (its scrape config must add the bearer token).
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(PORT),
                "prometheus.io/path": "/metrics",
            },
        },
        "spec": {
            "type": "ClusterIP",
            "selector": dict(_LABELS),
            "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def service_monitor(namespace: str) -> dict[str, Any]:
    """prometheus-operator's scrape of ``/metrics``, with the metrics token (it runs nothing)."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": NAME, "namespace": namespace, "labels": dict(_LABELS)},
        "spec": {
            "selector": {"matchLabels": dict(_LABELS)},
            "namespaceSelector": {"matchNames": [namespace]},
            "endpoints": [
                {
                    "port": "http",
                    "path": "/metrics",
                    "interval": "30s",
                    "authorization": {"type": "Bearer", "credentials": {"name": METRICS_SECRET, "key": TOKEN_KEY}},
                }
            ],
        },
    }


def controller(namespace: str, image: str, ray_address: str | None = None) -> list[dict[str, Any]]:
    """The controller's namespace, service account, audit volume, Deployment, Service and ServiceMonitor."""
    level = "restricted" if ray_address else "privileged"
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": {
            "app.kubernetes.io/part-of": "stockade", "pod-security.kubernetes.io/enforce": level}}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": NAME, "namespace": namespace,
            "labels": dict(_LABELS)}, "automountServiceAccountToken": False},
        audit_claim(namespace),
        deployment(namespace, image, ray_address),
        service(namespace),
        service_monitor(namespace),
    ]  # fmt: skip
