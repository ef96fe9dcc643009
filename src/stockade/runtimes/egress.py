"""An isolate's egress under ``network_policy: "allowlist"``: its worker, given it at hand-over.

The isolate's proxy and name service run in an egress worker of its own
(egress/worker.py), started when the isolate is built; it is handed the
caller's allow-list and secrets when the caller's policy is applied (a fresh
isolate, or one from the warm pool: the allow-list and the secrets are the
proxy's, not the isolate's, so they never force a cold start). The runtime
makes the listening sockets inside the isolate's network namespace
(``AgentSandbox._take_egress``); the worker serves them. This process keeps
what it needs to redact the values from what leaves the isolate through it.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from typing import TYPE_CHECKING, Any

from ..egress.redact import Redactor
from ..errors import ConfigError, PolicyError
from ..policy import Policy
from ..result import EgressRequest, SecurityViolation

if TYPE_CHECKING:
    from ..broker.client import SecretSource
    from ..egress.workers import EgressWorker
    from .sandbox import AgentSandbox

MAX_SETTING_FILE = 1 << 20  # a CA bundle, a hosts file


class Egress:
    def __init__(self, sandbox: AgentSandbox, worker: EgressWorker, values: dict[str, str],
                 source: SecretSource | None, sandbox_id: str) -> None:  # fmt: skip
        self._sandbox = sandbox
        self.worker = worker
        self.redactor = Redactor.markers(values)
        self._source = source
        self.sandbox_id = sandbox_id
        self._closed = False
        self._lost_reported = False

    def refused(self, request: EgressRequest, times: int = 1) -> None:
        """The worker refused a request (before the isolate heard so), ``times`` such requests
        (a burst, said once): violations of the run."""
        from ..egress.gate import refused_violation

        self._sandbox._count_violation("network_egress", True, lambda: refused_violation(request), times=times)

    def take(self) -> tuple[list[EgressRequest], int]:
        """The run's egress requests; the secret values its proxy redacted are counted in ``redactor``.
        A worker that ended is reported once, as what it is: the isolate's way out is gone."""
        from ..egress.workers import EgressWorkerLost

        try:
            records, dropped, redacted = self.worker.take()
        except EgressWorkerLost as exc:
            if not self._lost_reported:
                self._lost_reported = True
                why = str(exc)
                self._sandbox._count_violation("egress_worker_lost", False, lambda: SecurityViolation(
                    violation_type="egress_worker_lost", detection_layer="NETWORK",
                    description=f"the egress worker serving this sandbox is gone ({why}): its requests since "
                    "the last run are unrecorded, and the isolate has no way out any more"))  # fmt: skip
            return [], 0
        self.redactor.add(redacted)
        return records, dropped

    def redact_fields(self, fields: dict[str, Any]) -> dict[str, Any]:
        """A cell's result fields (error, results, exception) with every secret value taken out."""
        if not self.redactor:
            return fields
        out = dict(fields)
        if isinstance(out.get("error"), str):
            out["error"] = self.redactor.text(out["error"])
        for name in ("results", "exception"):
            value = out.get(name)
            if isinstance(value, list):
                out[name] = [self._redacted(v) for v in value]
            elif value is not None:
                out[name] = self._redacted(value)
        return out

    def _redacted(self, value: Any) -> Any:
        # A CellOutput or CellException through its JSON, where the redactor finds every value.
        return type(value)(**json.loads(self.redactor.json_text(value.to_json())))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.worker.close()
        finally:
            if self._source is not None:
                self._source.close(self.sandbox_id)


def check_networks(policy: Policy, networks: tuple[str, ...] | None, unset: bool = False) -> None:
    """``STOCKADE_EGRESS_NETWORKS``: what a policy names beyond public addresses that are not the
    host's own (``allowed_cidrs``, an address in ``allowed_hosts``) lies inside the host's networks.
    The proxy connects from the host's own network: named there, the host's loopback (the daemon's
    ports, other sandboxes' published ones) or the cloud's metadata service would be any caller's to
    reach. ``unset``: the setting is (``networks`` is then what a process serving callers takes)."""
    if networks is None:
        return
    import ipaddress

    from ..egress.allowlist import host_address, parse_rule, public

    allowed = [ipaddress.ip_network(n) for n in networks]
    named = "=" + (",".join(networks) or "none")
    if unset:
        named = " unset: none for a daemon's callers"

    def inside(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
        return any(network.version == a.version and network.subnet_of(a) for a in allowed)  # type: ignore[arg-type]

    for cidr in policy.allowed_cidrs:
        if not inside(ipaddress.ip_network(cidr, strict=False)):
            raise PolicyError(f"allowed_cidrs {cidr} is outside the networks this host lets sandboxes reach "
                              f"(STOCKADE_EGRESS_NETWORKS{named})")  # fmt: skip
    for host in policy.allowed_hosts:
        address = parse_rule(host).address
        if address is None:
            continue
        if (not public(address) or host_address(address)) and not inside(ipaddress.ip_network(address)):
            raise PolicyError(f"allowed_hosts {host} is outside the networks this host lets sandboxes reach "
                              f"(STOCKADE_EGRESS_NETWORKS{named})")  # fmt: skip


def attach_egress(sandbox: AgentSandbox, policy: Policy) -> None:
    """Give ``sandbox`` (about to serve ``policy``) its allow-list, its handles and its CA bundle."""
    if policy.network_policy != "allowlist":
        return
    # Here, not at the top: a runtime that never serves an allowlist never loads the CA's code.
    from ..egress.allowlist import peers
    from ..egress.ca import ca_entry, trust_bundle
    from ..egress.gate import CA_BUNDLE_PATH
    from ..settings import current, egress_networks

    settings = current()
    check_networks(policy, egress_networks(settings), unset=settings.egress_networks is None)
    sandbox_id = uuid.uuid4().hex
    sockets, worker = sandbox._take_egress()
    source = None
    try:
        if policy.secrets:
            from ..broker.client import secret_source

            source = secret_source(settings)
        values = source.open(sandbox_id, sandbox.isolate_pid(), policy.secrets) if source is not None else {}
        egress = Egress(sandbox, worker, values, source, sandbox_id)
        worker.on_refused = egress.refused
        upstream_ca = _setting_file("STOCKADE_EGRESS_CA_FILE", settings.egress_ca_file)
        pinned_hosts = _setting_file("STOCKADE_EGRESS_HOSTS_FILE", settings.egress_hosts_file)
        env, ca = worker.serve(policy, values, sockets, upstream_ca, pinned_hosts, peers())
    except BaseException:
        worker.close()
        if source is not None:
            source.close(sandbox_id)
        raise
    finally:
        for sock in sockets:  # the worker has its own copies now
            sock.close()
    sandbox.egress = egress
    sandbox.environment_env = {**sandbox.environment_env, **env}
    if ca is not None:
        try:
            if sandbox.roots_written:  # a pooled isolate: only this sandbox's CA goes after the roots
                sandbox.write_file(CA_BUNDLE_PATH, ca_entry(ca), append=True)
            else:
                sandbox.write_file(CA_BUNDLE_PATH, trust_bundle(ca), 0o444)
        except BaseException:
            with contextlib.suppress(Exception):
                egress.close()
            sandbox.egress = None
            raise


def _setting_file(name: str, path: str | None) -> str | None:
    """The text of the file a setting names, read here: its worker may not read it (workers.py)."""
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_SETTING_FILE + 1)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{name}={path}: cannot read it: {exc}") from None
    if len(text) > MAX_SETTING_FILE:
        raise ConfigError(f"{name}={path}: larger than {MAX_SETTING_FILE} bytes")
    return text
