"""Where the daemon's events go: metrics, the audit log, the dashboard's history.

One ``Observers`` object per daemon, shared by both doors and the
controller (as its ``ExecutionListener``). Each sink is optional: without
the ``server`` extra there are no metrics, and with ``STOCKADE_AUDIT_LOG=off``
no audit log (it is written by default). Nothing here blocks the event
loop: metrics are counters, the audit log queues to its writer thread, the
history is a few bounded deques.

What reaches the audit log is metadata only: who (the owner, the agent id),
what (method, policy digest, outcome), never code, input, output, file data
or a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..audit import MAX_AUDITED_EGRESS, short_text
from ..protocol.models import Caller
from ..ratelimit import TokenBucket, peer_network
from ..result import EgressRequest, ExecResult, SecurityViolation, validate
from ..runtimes.violations import Leftovers, ViolationReport
from ..server.history import History

if TYPE_CHECKING:
    from ..audit import AuditLog
    from ..metrics import Metrics

log = logging.getLogger("stockade.daemon")
# What one run may write to the audit log: listed one by one up to these, counted past them. (Its
# code chooses how many it makes: listed without end, a loop of refused syscalls wrote 2 MB a
# second and aged every other tenant's history out of the rotated files within minutes.)
MAX_AUDITED_VIOLATIONS = 16
AUTH_RECORDS_PER_S, AUTH_RECORDS_BURST = 1.0, 60.0  # auth_failure records of a door, from all its peers
REFUSED_PER_S, REFUSED_BURST = 1.0, 60.0  # records of refused administrative acts, per owner


class Observers:
    def __init__(
        self,
        metrics: Metrics | None = None,
        audit: AuditLog | None = None,
        pools: Callable[[], dict[str, dict[str, int]]] | None = None,
    ) -> None:
        self.metrics = metrics
        self.audit = audit
        self.history = History()
        self._pools = pools  # each runtime's warm pool statistics, read at each scrape
        self._missed: dict[str, int] = {}
        self._pending: list[tuple[Caller, str | None, ExecResult, bool, bool]] = []
        self._timer: asyncio.TimerHandle | None = None
        # (door, peer's network) -> (when its last auth_failure record was written, failures since)
        self._auth_failures: dict[tuple[str, str], tuple[float, int]] = {}
        # Each door's budget of records from all its peers together: many addresses (an IPv6 /48 holds
        # 65,536 networks) must not rotate the log away either, and a flood at one door leaves the
        # other's records. Past it, failures are counted in the next record written.
        self._auth_records: dict[str, TokenBucket] = {}
        self._auth_unrecorded = 0
        self._refusals: dict[str, tuple[TokenBucket, int]] = {}  # owner -> its budget, refusals not written
        self._auth_timer: asyncio.TimerHandle | None = None  # when counted failures are next said (_say_later)

    DELAY_S = 0.002
    AUTH_WINDOW_S = 10.0

    # ---- the controller's listener -------------------------------------------------------

    def execution(
        self, caller: Caller, agent_id: str | None, result: ExecResult, held: bool = False, cold_start: bool = True
    ) -> None:
        """Note a finished run, taken in a moment: its answer is on its way first.

        Counting it costs tens of µs (metrics, an audit record), and a client just
        answered often wakes on the daemon's own CPU: every step before the daemon
        sleeps is one the client waits for. Whatever reads the counts flushes first.
        """
        self._pending.append((caller, agent_id, result, held, cold_start))
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a test driving it directly): at once
                self.flush()
                return
            self._timer = loop.call_later(self.DELAY_S, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, []
        for event in pending:
            try:
                self._record(*event)
            except Exception:
                log.exception("recording an execution failed")

    def _record(self, caller: Caller, agent_id: str | None, result: ExecResult, held: bool, cold_start: bool) -> None:
        try:  # the audit record is written whatever became of the counts
            if self.metrics is not None:
                self.metrics.observe_execution(result, cold_start=cold_start)
            self.history.execution(caller.owner, agent_id, result, cold_start)
        except Exception:
            log.exception("counting an execution failed")
        if self.audit is None:
            return
        self.audit.record(
            "execution",
            owner=caller.owner,
            door=caller.door,
            peer=caller.peer,
            agent_id=agent_id,
            execution_id=result.execution_id,
            held=held,
            runtime=result.runtime_used,
            policy_digest=result.policy_digest,
            outcome=result.termination_reason,
            success=result.success,
            exit_code=result.exit_code,
            seconds=round(result.execution_time_seconds, 6),
            violations=sum(result.violation_counts.values()) or len(result.security_violations),
            **_egress_fields(result.egress_requests, result.egress_requests_dropped, result.secrets_redacted),
        )
        self._violations(
            caller, agent_id, {"execution_id": result.execution_id}, result.security_violations,
            result.violation_counts, result.violations_dropped,
        )  # fmt: skip

    def _violations(
        self,
        caller: Caller,
        agent_id: str | None,
        where: dict[str, Any],
        records: list[SecurityViolation],
        counts: dict[str, int],
        dropped: int,
    ) -> None:
        """A report's violation records, the first MAX_AUDITED_VIOLATIONS; the rest counted."""
        assert self.audit is not None
        listed = records[:MAX_AUDITED_VIOLATIONS]
        for v in listed:
            self.audit.record(
                "violation",
                owner=caller.owner,
                agent_id=agent_id,
                **where,
                violation_type=v.violation_type,
                syscall=v.syscall,
                severity=v.severity,
                detection_layer=v.detection_layer,
                blocked=v.blocked,
                between_runs=v.between_runs,
            )
        unlisted = dropped + len(records) - len(listed)
        if unlisted:
            self.audit.record("violations_uncounted", **where, counts=dict(counts), dropped=unlisted)

    # ---- a held sandbox's life -------------------------------------------------------------

    def sandbox_event(self, caller: Caller, event: str, **fields: Any) -> None:
        if self.audit is not None:
            self.audit.record(event, owner=caller.owner, door=caller.door, **fields)

    def sandbox_ended(
        self, caller: Caller, agent_id: str | None, sandbox_id: str, ended: str, runs: int, leftovers: Leftovers | None
    ) -> None:
        """A held sandbox's end, and what it did after its last run: no run's record has it."""
        taken = leftovers if leftovers is not None else Leftovers(ViolationReport())
        report = taken.report
        # Reported as a run's are, marked as made while no run was going.
        records = [dataclasses.replace(v, between_runs=True) for v in report.records]
        try:  # the audit record is written whatever became of the counts, as a run's is
            if self.metrics is not None:
                self.metrics.observe_violations(records, report.counts)
            self.history.violations(caller.owner, agent_id, None, records)
        except Exception:
            log.exception("counting a sandbox's end failed")
        if self.audit is None:
            return
        self.audit.record(
            "sandbox.end",
            owner=caller.owner,
            door=caller.door,
            agent_id=agent_id,
            sandbox_id=sandbox_id,
            ended=ended,
            runs=runs,
            leftovers_taken=leftovers is not None,
            violations=sum(report.counts.values()),
            **_egress_fields(taken.egress, taken.egress_dropped, 0),
        )
        self._violations(caller, agent_id, {"sandbox_id": sandbox_id}, records, report.counts, report.dropped)

    # ---- the doors -----------------------------------------------------------------------

    def request(self, door: str, method: str, code: int | str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.observe_request("http" if door == "http" else "unix", method, code, seconds)

    def auth_failure(self, door: str, peer: str, method: str) -> None:
        """One record per door and peer's network (an IPv4 /24, an IPv6 /64) per AUTH_WINDOW_S,
        the ones in between counted in the next; and at most AUTH_RECORDS_PER_S of them from all
        peers together, the others counted in the next written (``unrecorded_elsewhere``): a
        flood of bad tokens, from one address or many, must not rotate the log's real records away."""
        if self.audit is None:
            return
        now = time.monotonic()
        key = (door, peer_network(peer))
        window = self._auth_failures.get(key)
        if window is not None and now - window[0] < self.AUTH_WINDOW_S:
            self._auth_failures[key] = (window[0], window[1] + 1)
            self._say_later()
            return
        budget = self._auth_records.setdefault(door, TokenBucket(AUTH_RECORDS_PER_S, AUTH_RECORDS_BURST, now))
        if not budget.take(1.0, now):
            self._auth_unrecorded += 1
            return
        elsewhere, self._auth_unrecorded = self._auth_unrecorded, 0
        self.audit.record(
            "auth_failure", door=door, peer=peer, method=method[:128], unrecorded_before=window[1] if window else 0,
            unrecorded_elsewhere=elsewhere,
        )  # fmt: skip
        self._auth_failures[key] = (now, 0)
        if len(self._auth_failures) > 4096:  # peers that went quiet: forgotten, their counts said in the next
            for quiet, (since, count) in list(self._auth_failures.items()):
                if now - since >= self.AUTH_WINDOW_S:
                    del self._auth_failures[quiet]
                    self._auth_unrecorded += count

    def _say_later(self) -> None:
        """Failures counted in a window are said once it is over, not only with that peer's next
        record: a burst of bad tokens and then quiet was one record (the rest held in memory, lost
        with the process)."""
        if self._auth_timer is None:
            with contextlib.suppress(RuntimeError):  # no loop (a test driving it directly): said at close
                self._auth_timer = asyncio.get_running_loop().call_later(self.AUTH_WINDOW_S, self._say_ended)

    def _say_ended(self) -> None:
        self._auth_timer = None
        self.say_unrecorded(everything=False)
        if any(count for _, count in self._auth_failures.values()):
            self._say_later()

    def say_unrecorded(self, everything: bool = True) -> None:
        """Write the auth failures counted and not yet recorded: those whose window is over, or all.
        Each door's budget of records holds for these too (a flood from many networks), what is
        past it said together, once."""
        if self.audit is None:
            return
        now = time.monotonic()
        for (door, peer), (since, count) in list(self._auth_failures.items()):
            if not count or not (everything or now - since >= self.AUTH_WINDOW_S):
                continue
            self._auth_failures[(door, peer)] = (since, 0)
            budget = self._auth_records.setdefault(door, TokenBucket(AUTH_RECORDS_PER_S, AUTH_RECORDS_BURST, now))
            if budget.take(1.0, now):
                self.audit.record("auth_failures_unrecorded", door=door, peer=peer, count=count)
            else:
                self._auth_unrecorded += count
        if self._auth_unrecorded:
            self.audit.record("auth_failures_unrecorded", door="any", peer="any", count=self._auth_unrecorded)
            self._auth_unrecorded = 0

    def mcp_event(self, caller: Caller, event: str, record: dict[str, Any], verdict: dict[str, Any]) -> None:
        """One MCP tool call the daemon made for ``caller`` (``mcp.call``: ``mcp/records.call_record``), or
        what a server's isolate did outside one (``mcp.report``); ``verdict``'s violations counted."""
        records = [validate(SecurityViolation, v) for v in verdict.get("security_violations") or []]
        counts = verdict.get("violation_counts") or {}
        if self.metrics is not None and (records or counts):
            self.metrics.observe_violations(records, counts)
        if self.audit is not None:
            self.audit.record(event, owner=caller.owner, door=caller.door, **record)

    def admin(self, caller: Caller, action: str, target: str, **details: Any) -> None:
        """An administrative act, or one refused (``refused``): those at most REFUSED_PER_S an owner
        (REFUSED_BURST at once), the rest counted in its next one written (``unrecorded_before``),
        so that a loop of made-up ids cannot rotate the log's real records away."""
        if self.audit is None:
            return
        if "refused" in details:
            now = time.monotonic()
            budget = self._refusals.get(caller.owner)
            if budget is None:
                if len(self._refusals) >= 4096:  # owners that went quiet: their unrecorded counts said now
                    for quiet, (_, count) in list(self._refusals.items())[:1024]:
                        del self._refusals[quiet]
                        if count:
                            self.audit.record("admin_refusals_unrecorded", owner=quiet, count=count)
                budget = self._refusals[caller.owner] = (TokenBucket(REFUSED_PER_S, REFUSED_BURST, now), 0)
            bucket, unrecorded = budget
            if not bucket.take(1.0, now):
                self._refusals[caller.owner] = (bucket, unrecorded + 1)
                return
            self._refusals[caller.owner] = (bucket, 0)
            details["unrecorded_before"] = unrecorded
        self.audit.record("admin", owner=caller.owner, door=caller.door, action=action, target=target, **details)

    def exposition(self) -> tuple[bytes, str]:
        self.flush()
        if self.metrics is None:
            return b"# metrics need the server extra: pip install 'stockade[server]'\n", "text/plain; charset=utf-8"
        for runtime, stats in (self._pools() if self._pools is not None else {}).items():
            missed = stats["missed"] - self._missed.get(runtime, 0)
            self._missed[runtime] = stats["missed"]
            self.metrics.observe_pool(runtime, stats["warm"], max(0, missed))
        return self.metrics.exposition()

    def snapshot(self, caller: Caller) -> dict[str, Any]:
        """The dashboard's history, up to this moment, of what ``caller`` may see (its own)."""
        self.flush()
        return self.history.snapshot(lambda owner: caller.admin or owner == caller.owner)

    def close(self) -> None:
        self.flush()
        if self._auth_timer is not None:
            self._auth_timer.cancel()
            self._auth_timer = None
        if self.audit is not None:
            self.say_unrecorded()  # what was counted since the daemon said it, before the log closes
            for owner, (_, count) in self._refusals.items():
                if count:
                    self.audit.record("admin_refusals_unrecorded", owner=owner, count=count)
            self.audit.close()


def _egress_fields(requests: list[EgressRequest], dropped: int, redactions: int) -> dict[str, Any]:
    """A run's egress (or a held sandbox's after its last run), for its record: each request
    (allowed or refused) and the names of the secrets put into it, never a value.
    (``substituted``, ``redactions``: the audit log blanks any field named like a secret.)"""
    if not requests and not dropped and not redactions:
        return {}
    listed = requests[:MAX_AUDITED_EGRESS]
    kept = [
        {
            "host": short_text(r.host),
            "port": r.port,
            "method": short_text(r.method),
            "path": short_text(r.path),
            "scheme": r.scheme,
            "allowed": r.allowed,
            "reason": short_text(r.reason) or None,
            "status": r.status,
            "bytes_sent": r.bytes_sent,
            "bytes_received": r.bytes_received,
            "substituted": r.secrets_used,
            "open": r.open,
        }
        for r in listed
    ]
    return {"egress": kept, "egress_dropped": dropped + len(requests) - len(listed), "redactions": redactions}
