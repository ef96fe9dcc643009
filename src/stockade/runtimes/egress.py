"""An isolate's egress under ``network_policy: "allowlist"``: its gate, opened and closed with it.

Opened when a caller's policy is applied to an isolate (a fresh one, or one
from the warm pool at hand-over: the allow-list and the secrets are the
proxy's, not the isolate's, so they never force a cold start). The runtime
makes the listening socket inside the isolate's network namespace
(``AgentSandbox._egress_listener``); the host's proxy serves it.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..policy import Policy

if TYPE_CHECKING:
    from ..broker.client import SecretSource
    from ..egress.gate import Gate
    from ..egress.redact import Redactor
    from .base import AgentSandbox

log = logging.getLogger("stockade.egress")


class Egress:
    def __init__(self, gate: Gate, sockets: list[socket.socket], stop: Callable[[], None],
                 source: SecretSource | None, sandbox_id: str) -> None:  # fmt: skip
        self.gate = gate
        self.redactor: Redactor = gate.redactor
        self._sockets = sockets
        self._stop: Callable[[], None] | None = stop
        self._source = source
        self.sandbox_id = sandbox_id

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
                out[name] = [type(v).model_validate_json(self.redactor.json_text(v.model_dump_json())) for v in value]
            elif value is not None:
                out[name] = type(value).model_validate_json(self.redactor.json_text(value.model_dump_json()))
        return out

    def close(self) -> None:
        stop, self._stop = self._stop, None
        if stop is None:
            return
        stop()
        for sock in self._sockets:
            sock.close()
        if self._source is not None:
            self._source.close(self.sandbox_id)


def attach_egress(sandbox: AgentSandbox, policy: Policy) -> None:
    """Give ``sandbox`` (about to serve ``policy``) its proxy, its handles and its CA bundle."""
    if policy.network_policy != "allowlist":
        return
    # Here, not at the top: a runtime that never serves an allowlist never loads h11 or dnspython (nor,
    # without secrets, cbor2 and cryptography).
    from ..egress.ca import ca_entry, trust_bundle
    from ..egress.gate import CA_BUNDLE_PATH, Gate
    from ..egress.proxy import proxy
    from ..settings import current

    settings = current()
    sandbox_id = uuid.uuid4().hex
    source = None
    if policy.secrets:
        from ..broker.client import secret_source

        source = secret_source(settings)
    values = source.open(sandbox_id, sandbox.isolate_pid(), policy.secrets) if source is not None else {}
    sockets: list[socket.socket] = []
    try:
        gate = Gate(policy, values, sandbox._count_violation, settings.egress_ca_file, settings.egress_hosts_file)
        sockets = sandbox._take_egress_sockets()
        egress = Egress(gate, sockets, proxy().serve(gate, *sockets), source, sandbox_id)
    except BaseException:
        for sock in sockets:
            sock.close()
        if source is not None:
            source.close(sandbox_id)
        raise
    sandbox.egress = egress
    sandbox.environment_env = {**sandbox.environment_env, **gate.env()}
    if gate.ca is not None:
        try:
            if sandbox.roots_written:  # a pooled isolate: only this sandbox's CA goes after the roots
                sandbox.write_file(CA_BUNDLE_PATH, ca_entry(gate.ca.pem), append=True)
            else:
                sandbox.write_file(CA_BUNDLE_PATH, trust_bundle(gate.ca.pem), 0o444)
        except BaseException:
            with contextlib.suppress(Exception):
                egress.close()
            sandbox.egress = None
            raise
