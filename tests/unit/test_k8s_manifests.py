"""``stockade k8s manifests``: every object valid against the Kubernetes schemas (kubernetes-validate)
and against agent-sandbox's own CRD schemas (vendored, tests/data/agent-sandbox), and each sandbox
pod as closed as the isolation it stands for."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from typing import Any

import pytest

from stockade.k8s.controller import ISOLATION_HOST_LABEL, TOKEN_SECRET
from stockade.k8s.manifests import LEVELS, manifests, sandbox_template
from stockade.policy import Policy

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="the dev extra installs kubernetes-validate")
jsonschema = pytest.importorskip("jsonschema", reason="kubernetes-validate brings jsonschema")
yaml = pytest.importorskip("yaml", reason="the k8s extra installs PyYAML")

K8S_VERSION = "1.33"
DATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data")
CRD_DIRS = [os.path.join(DATA, "agent-sandbox"), os.path.join(DATA, "prometheus-operator")]
IMAGE = "registry.example/stockade-agent:0.1.0"
CONTROLLER_IMAGE = "registry.example/stockade:0.1.0"
CRD_GROUPS = ("extensions.agents.x-k8s.io/", "monitoring.coreos.com/")


def _crd_schema(kind: str, version: str) -> dict[str, Any]:
    for folder in CRD_DIRS:
        for name in os.listdir(folder):
            if not name.endswith(".yaml"):
                continue
            with open(os.path.join(folder, name)) as f:
                crd = yaml.safe_load(f)
            if crd["spec"]["names"]["kind"] == kind:
                served = next(v for v in crd["spec"]["versions"] if v["name"] == version)
                schema: dict[str, Any] = served["schema"]["openAPIV3Schema"]
                return schema
    raise LookupError(kind)


def _strict(schema: Any) -> Any:
    """The CRD's schema with unknown fields refused, as the API server prunes and kubectl warns."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out:
            if not out.get("x-kubernetes-preserve-unknown-fields"):
                out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _validate(doc: dict[str, Any]) -> None:
    if doc["apiVersion"].startswith(CRD_GROUPS):
        jsonschema.validate(doc, _strict(_crd_schema(doc["kind"], doc["apiVersion"].rsplit("/", 1)[1])))
        if doc["kind"] == "SandboxTemplate":  # its pod, against the Kubernetes PodTemplateSpec schema too
            pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                   "template": doc["spec"]["podTemplate"]}  # fmt: skip
            kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        return
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_every_manifest_is_valid() -> None:
    docs = manifests(IMAGE)
    kinds = [d["kind"] for d in docs]
    assert kinds == ["Namespace"] + ["RuntimeClass"] * 3 + ["SandboxTemplate", "SandboxWarmPool"] * 3
    for doc in docs:
        _validate(doc)
    handlers = {d["metadata"]["name"]: d["handler"] for d in docs if d["kind"] == "RuntimeClass"}
    assert handlers == {"gvisor": "runsc", "kata-qemu": "kata-qemu", "kata-fc": "kata-fc"}
    # Kata pods go only to the nodes kata-deploy installed it on (and labelled so).
    selectors = {d["metadata"]["name"]: d.get("scheduling") for d in docs if d["kind"] == "RuntimeClass"}
    kata = {"nodeSelector": {"katacontainers.io/kata-runtime": "true"}}
    assert selectors == {"gvisor": None, "kata-qemu": kata, "kata-fc": kata}


def test_the_validation_catches_a_wrong_field() -> None:
    # The checks above can fail: a misspelt field of the template, and one of its pod.
    template = sandbox_template("gvisor", Policy(), IMAGE)
    template["spec"]["networkPolicyManagment"] = "Managed"
    with pytest.raises(jsonschema.ValidationError, match="networkPolicyManagment"):
        _validate(template)
    template = sandbox_template("gvisor", Policy(), IMAGE)
    template["spec"]["podTemplate"]["spec"]["containers"][0]["securityContex"] = {}
    with pytest.raises(jsonschema.ValidationError, match="securityContex"):
        _validate(template)  # the CRD's own schema of the pod
    pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
           "template": template["spec"]["podTemplate"]}  # fmt: skip
    with pytest.raises(kubernetes_validate.ValidationError, match="securityContex"):
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)  # and Kubernetes' own


@pytest.mark.parametrize("level", LEVELS)
def test_each_sandbox_pod_is_closed_and_sized_by_the_policy(level: str) -> None:
    policy = Policy(cpu_limit=0.5, memory_mb=256, disk_mb=128)
    template = sandbox_template(level, policy, IMAGE, microvm_class="kata-fc")
    pod = template["spec"]["podTemplate"]["spec"]
    assert pod.get("runtimeClassName") == {"process": None, "gvisor": "gvisor", "microvm": "kata-fc"}[level]
    assert pod["automountServiceAccountToken"] is False  # no credentials to the API server inside
    assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC", "shareProcessNamespace"))
    (agent,) = pod["containers"]
    security = agent["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["allowPrivilegeEscalation"] is False and security["privileged"] is False
    assert security["runAsNonRoot"] is True and security["readOnlyRootFilesystem"] is True
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    limits = {"cpu": "500m", "memory": "256Mi", "ephemeral-storage": "128Mi"}
    assert agent["resources"] == {"requests": limits, "limits": limits}  # Guaranteed
    assert {v["name"]: v["emptyDir"]["sizeLimit"] for v in pod["volumes"]} == {"work": "128Mi", "tmp": "128Mi"}
    assert agent["stdin"] is True and agent.get("ports") is None  # reached by attach, listening on nothing
    assert {e["name"]: e["value"] for e in agent["env"]}["STOCKADE_AGENT_FD"] == "stdio"
    # Managed with no rule: every ingress and every egress denied.
    assert template["spec"]["networkPolicy"] == {"ingress": [], "egress": []}
    assert template["spec"]["networkPolicyManagement"] == "Managed"
    assert template["spec"]["envVarsInjectionPolicy"] == "Disallowed"


def test_the_agent_serves_a_pods_standard_input_and_output_which_are_pipes() -> None:
    """A pod's container reached by attach has pipes for stdio, not a socket: the agent must serve them."""
    from stockade.agent import wire
    from stockade.runtimes.fake import _BOOT
    from stockade.runtimes.process.zygote import AGENT_PARENT

    (agent,) = sandbox_template("process", Policy(), IMAGE)["spec"]["podTemplate"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in agent["env"]}
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    proc = subprocess.Popen(  # the pod's agent, booted from this checkout instead of the image
        [python, "-I", "-c", _BOOT, AGENT_PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    assert proc.stdin is not None and proc.stdout is not None
    out_fd = proc.stdout.fileno()
    reader: Any = type("Pipe", (), {"recv": lambda _, n, flags=0: os.read(out_fd, n)})()
    try:

        def ask(method: str, params: dict[str, Any], rid: int) -> Any:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(wire.encode_message(wire.request(method, params, rid)))
            proc.stdin.flush()
            while True:  # output notifications come first
                reply = json.loads(wire.read_frame(reader))
                if reply.get("id") == rid:
                    return reply

        assert ask("ping", {}, 1)["result"]["pong"] is True
        ran = ask("exec", {"argv": ["sh", "-c", "echo through-the-pipes; echo oops >&2; exit 3"]}, 2)["result"]
        out, err = (base64.b64decode(ran[k]) for k in ("stdout", "stderr"))
        assert (out, err, ran["exit_code"]) == (b"through-the-pipes\n", b"oops\n", 3)
        # What it runs holds neither end of the channel: it cannot write frames to the host.
        channel = {f"pipe:[{os.fstat(f.fileno()).st_ino}]" for f in (proc.stdin, proc.stdout)}
        ran = ask("exec", {"argv": ["sh", "-c", "for f in /proc/self/fd/*; do readlink $f; done"]}, 3)["result"]
        held = set(base64.b64decode(ran["stdout"]).decode().split())
        assert held and not held & channel, (held, channel)
        proc.stdin.close()  # attach ended: the agent leaves
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


def test_what_a_pod_cannot_enforce_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot filter by host name"):
        sandbox_template("process", Policy(network_policy="allowlist", allowed_hosts=["pypi.org"]), IMAGE)
    with pytest.raises(ValueError, match="isolation level 'kata'"):
        sandbox_template("kata", Policy(), IMAGE)


def test_the_cli_writes_yaml_that_reads_back_as_the_same_objects() -> None:
    cmd = [sys.executable, "-m", "stockade.cli", "k8s", "manifests", "--image", IMAGE, "--level", "microvm",
           "--warm", "5", "--memory-mb", "1024", "--namespace", "sandboxes"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60).stdout
    docs = list(yaml.safe_load_all(out))
    assert docs == manifests(IMAGE, namespace="sandboxes", levels=("microvm",), warm=5, policy=Policy(memory_mb=1024))
    pool = docs[-1]
    assert pool["spec"] == {"replicas": 5, "sandboxTemplateRef": {"name": "stockade-microvm"},
                            "updateStrategy": {"type": "OnReplenish"}}  # fmt: skip
    bad = subprocess.run(
        [*cmd[:5], "--image", IMAGE, "--memory-mb", "99999"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "memory_mb" in bad.stderr
    missing = subprocess.run(cmd[:5], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "--image" in missing.stderr


@pytest.mark.parametrize("ray_address", [None, "ray-head.ray:6379"])
def test_the_controller_is_valid_scraped_and_as_closed_as_its_placement_allows(ray_address: str | None) -> None:
    docs = manifests(IMAGE, levels=("gvisor",), controller_image=CONTROLLER_IMAGE, ray_address=ray_address)
    controller = docs[-6:]
    assert [d["kind"] for d in controller] == [
        "Namespace", "ServiceAccount", "PersistentVolumeClaim", "Deployment", "Service", "ServiceMonitor"
    ]  # fmt: skip
    assert {d["metadata"].get("namespace", d["metadata"]["name"]) for d in controller} == {"stockade-system"}
    for doc in controller:
        _validate(doc)
    namespace, _, claim, deployment, service, monitor = controller
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    # The audit log outlives the pod (its state dir is an emptyDir: a rollout took the whole chain).
    assert env["STOCKADE_AUDIT_LOG"]["value"] == "/var/lib/stockade/audit/audit.log"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["audit"]["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"]}
    assert {"name": "audit", "mountPath": "/var/lib/stockade/audit"} in container["volumeMounts"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and deployment["spec"]["strategy"]["type"] == "Recreate"
    assert env["STOCKADE_API_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": TOKEN_SECRET, "key": "token"}}
    serve = "/opt/stockade/.venv/bin/stockade serve --http 0.0.0.0:8002 --no-socket"
    assert pod["automountServiceAccountToken"] is False
    # Traffic only while its placement is reachable (503 from /ready otherwise); restarted when it stops answering.
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v1/ping", "port": "http"}
    startup = container["startupProbe"]  # the liveness probe waits for a start of up to ten minutes
    assert startup["httpGet"] == {"path": "/v1/ping", "port": "http"}
    assert startup["periodSeconds"] * startup["failureThreshold"] == 600
    # Its metrics are scraped from the port the Service names ...
    assert service["spec"]["ports"] == [{"name": "http", "port": 8002, "targetPort": "http", "protocol": "TCP"}]
    assert service["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    # ... with a token of its own, which reads the metrics and runs nothing.
    assert endpoint["authorization"]["credentials"] == {"name": "stockade-metrics-token", "key": "token"}
    assert env["STOCKADE_METRICS_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "stockade-metrics-token", "key": "token", "optional": True}
    }
    assert monitor["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    enforce = namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
    if ray_address:  # it only talks to the Ray cluster: restricted
        assert json.loads(env["STOCKADE_PLACEMENT"]["value"]) == {"type": "ray", "address": ray_address}
        # A driver runs on a node: the pod joins the cluster (offering nothing), then serves.
        assert container["command"][:2] == ["/bin/sh", "-c"] and env["RAY_ADDRESS"]["value"] == ray_address
        # Ray's workers on the node inherit no API token, and nothing is scheduled there (no memory either).
        assert container["command"][2] == (
            'env -u STOCKADE_API_TOKEN /opt/stockade/.venv/bin/ray start --address="$RAY_ADDRESS" --num-cpus=0 '
            f"--num-gpus=0 --memory=0 --disable-usage-stats && exec {serve}"
        )
        assert enforce == "restricted"
        security = container["securityContext"]
        assert security["capabilities"] == {"drop": ["ALL"]} and security["runAsNonRoot"] is True
        assert security["readOnlyRootFilesystem"] is True and security["privileged"] is False
        assert pod["securityContext"]["fsGroup"] == security["runAsGroup"]  # its audit volume, writable
    else:  # its isolates run in its pod: a privileged one, only on the nodes given to it
        assert env["STOCKADE_PLACEMENT"]["value"] == "local" and enforce == "privileged"
        assert container["command"] == serve.split()
        assert container["securityContext"]["privileged"] is True
        assert pod["nodeSelector"] == {ISOLATION_HOST_LABEL: "true"}
        # Its callers share none of the pod's files, and their sandboxes reach public addresses only.
        assert env["STOCKADE_MOUNT_ROOTS"]["value"] == env["STOCKADE_EGRESS_NETWORKS"]["value"] == "none"
        assert set(container["resources"]["limits"]) == {"cpu", "memory"}
    # The sandboxes' namespace stays restricted either way.
    assert docs[0]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_the_servicemonitor_validation_catches_a_wrong_field() -> None:
    monitor = manifests(IMAGE, controller_image=CONTROLLER_IMAGE)[-1]
    monitor["spec"]["endpoints"][0]["bearerTokenSecrett"] = {"key": "token"}
    with pytest.raises(jsonschema.ValidationError, match="bearerTokenSecrett"):
        _validate(monitor)


def test_a_controller_option_without_its_image_or_in_the_sandboxes_namespace_is_refused() -> None:
    with pytest.raises(ValueError, match="give the controller's image too"):
        manifests(IMAGE, ray_address="head:6379")
    with pytest.raises(ValueError, match="must not be 'stockade'"):
        manifests(IMAGE, controller_image=CONTROLLER_IMAGE, controller_namespace="stockade")
    cmd = [sys.executable, "-m", "stockade.cli", "k8s", "manifests", "--image", IMAGE, "--ray-address", "h:1"]
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "give the controller's image too" in refused.stderr


@pytest.mark.parametrize(
    ("given", "said"),
    [
        ({"namespace": "Bad_NS"}, "namespace 'Bad_NS' is not a Kubernetes namespace name"),
        ({"namespace": "-x"}, "namespace '-x' is not a Kubernetes namespace name"),
        ({"controller_image": "c:1", "controller_namespace": "a" * 64}, "controller namespace 'aaaa"),
        ({"image": ""}, "image '' is not an image reference"),
        ({"namespace": "a" * 60, "controller_image": "c:1"}, "controller namespace 'a{60}-system' is not"),
        ({"image": "a b"}, "image 'a b' is not an image reference"),
        ({"controller_image": "c:1", "ray_address": "notanaddress"}, "Ray address 'notanaddress' is not HOST:PORT"),
        ({"controller_image": "c:1", "ray_address": "auto"}, "'auto' cannot find it"),
        ({"controller_image": "c:1", "ray_address": "h:99999"}, "Ray address 'h:99999' is not HOST:PORT"),
        ({"controller_image": "c:1", "ray_address": "h:0"}, "Ray address 'h:0' is not HOST:PORT"),
        ({"controller_namespace": "ctl"}, "a controller namespace is the controller's: give the controller's image"),
        # Applied, a Namespace object's Pod Security label would merge into a namespace the cluster shares.
        ({"namespace": "default"}, "namespace 'default' is one the cluster shares"),
        ({"namespace": "kube-system"}, "namespace 'kube-system' is one the cluster shares"),
        ({"controller_image": "c:1", "controller_namespace": "kube-node-lease"}, "'kube-node-lease' is one the"),
        ({"controller_image": "c:1", "controller_namespace": "default"}, "controller namespace 'default' is one"),
    ],
)
def test_what_kubernetes_would_refuse_is_refused_here_by_name(given: dict[str, Any], said: str) -> None:
    with pytest.raises(ValueError, match=said):
        manifests(**{"image": "registry.example/stockade-agent:1", **given})


def test_good_names_and_addresses_go_through() -> None:
    for address in ("ray-head:6379", "10.0.0.5:6379", "[fd00::1]:6379", "h:65535"):
        docs = manifests(
            "r.example/a:1", namespace="sandboxes-1", controller_image="r.example/c:1", ray_address=address
        )
        assert docs[0]["metadata"]["name"] == "sandboxes-1"
