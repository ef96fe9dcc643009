"""A flood of bad tokens from many addresses cannot rotate the audit log's real records away.

Found by attack: the records were limited per (door, address), so 3,000 bad requests from
3,000 addresses of 127/8 wrote 3,000 records in 4 s (the loopback is one network since; 3,000
networks of 10/8 stand for them here) (the 10 x 64 MB of history would rotate away
within the hour, and an IPv6 /64 holds more addresses than that)."""

from __future__ import annotations

import json
from pathlib import Path

from stockade.audit import AuditLog
from stockade.daemon.observers import AUTH_RECORDS_BURST, Observers


def _records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_failures_from_many_addresses_are_counted_not_each_recorded(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    observers = Observers(audit=AuditLog(str(path)))
    for i in range(3000):
        observers.auth_failure("http", f"10.{i // 256 % 256}.{i % 256}.{i % 7}", "/api/v1/sandbox/execute")
    for i in range(50):  # one network's addresses share its window: one record for all of them
        observers.auth_failure("http", f"192.168.5.{i}", "/health")
    observers.close()
    records = _records(path)
    failures = [r for r in records if r["event"] == "auth_failure"]
    # The burst, and perhaps a token or two refilled while the loop ran; not one per address.
    assert AUTH_RECORDS_BURST <= len(failures) <= AUTH_RECORDS_BURST + 5, len(failures)
    (rest,) = [r for r in records if r["event"] == "auth_failures_unrecorded" and r["peer"] == "any"]
    counted = sum(int(r["unrecorded_before"]) + int(r["unrecorded_elsewhere"]) for r in failures)  # type: ignore[call-overload]
    counted += sum(int(r["count"]) for r in records if r["event"] == "auth_failures_unrecorded")  # type: ignore[call-overload]
    assert counted + len(failures) == 3050  # every failure recorded or counted, none lost
    assert int(rest["count"]) > 2900  # type: ignore[call-overload]


def test_refused_administrative_acts_are_recorded_within_a_budget_and_the_rest_counted(tmp_path: Path) -> None:
    # Each refused close of a made-up sandbox id was a record: a loop of them rotated the log in minutes.
    from stockade.daemon.observers import REFUSED_BURST
    from stockade.protocol.models import Caller

    path = tmp_path / "audit.log"
    observers = Observers(audit=AuditLog(str(path)))
    flooder, other = Caller("uid 1000", "unix"), Caller("uid 1001", "unix")
    for i in range(3000):
        observers.admin(flooder, "sandbox.close", f"sb-made-up-{i}", refused="not_found")
    observers.admin(other, "execute.cancel", "e-1", refused="not_found")  # another owner's budget is its own
    observers.admin(flooder, "sandbox.close", "sb-real")  # and acts done are never held back
    observers.close()
    records = _records(path)
    refused = [r for r in records if r["event"] == "admin" and r.get("refused") and r["owner"] == "uid 1000"]
    assert REFUSED_BURST <= len(refused) <= REFUSED_BURST + 5, len(refused)
    assert [r["target"] for r in records if r["event"] == "admin" and r["owner"] == "uid 1001"] == ["e-1"]
    assert any(r["event"] == "admin" and r["target"] == "sb-real" and "refused" not in r for r in records)
    (rest,) = [r for r in records if r["event"] == "admin_refusals_unrecorded"]
    counted = sum(int(r["unrecorded_before"]) for r in refused) + int(rest["count"])  # type: ignore[call-overload]
    assert counted + len(refused) == 3000 and rest["owner"] == "uid 1000"  # every one recorded or counted


def test_failures_counted_in_a_window_are_said_once_it_is_over(tmp_path: Path) -> None:
    # A burst of bad tokens and then quiet was one record: the rest were held in memory until that
    # network failed again or the log closed (lost with the process, were it killed).
    import asyncio

    from stockade.protocol.models import Caller

    path = tmp_path / "audit.log"
    observers = Observers(audit=AuditLog(str(path)))
    observers.AUTH_WINDOW_S = 0.2

    async def burst_then_quiet() -> None:
        for _ in range(5):
            observers.auth_failure("http", "203.0.113.9", "/metrics")
        await asyncio.sleep(1.0)
        observers.admin(Caller("uid 0", "unix", admin=True), "marker", "after the quiet")

    asyncio.run(burst_then_quiet())
    observers.close()
    events = [(r["event"], r.get("count"), r.get("target")) for r in _records(path)]
    assert events == [("auth_failure", None, None), ("auth_failures_unrecorded", 4, None),
                      ("admin", None, "after the quiet")], events  # fmt: skip
