"""A request of countless small JSON values is refused before it is parsed, at both doors: parsed,
each is a Python object (16 MiB of ``[{},{},...]`` took the daemon half a GiB), where a large
request a client means is mostly one string, which is let through whatever it holds."""

from __future__ import annotations

import json

import httpx

from tests.conftest import require
from tests.daemon_harness import raw_exchange, start_daemon

FLOOD = b'{"id": 1, "method": "ping", "params": {"x": [' + b",".join([b"{}"] * 300_000) + b"]}}\n"


def test_a_flood_of_values_is_refused_unparsed_and_text_full_of_commas_is_not() -> None:
    require("process")
    daemon = start_daemon(http="127.0.0.1:0")
    try:
        (answer,) = raw_exchange(daemon.socket_path, FLOOD, timeout=60)
        refused = json.loads(answer)
        assert refused["error_code"] == "invalid_request" and "more than 200000 JSON values" in refused["error"]
        # Code of a million commas is one string: run, not refused.
        code = "x = '" + "," * 1_000_000 + "'\nprint(len(x))"
        request = json.dumps({"id": 2, "method": "execute", "params": {"code": code}}).encode() + b"\n"
        (ran,) = raw_exchange(daemon.socket_path, request, timeout=120)
        assert json.loads(ran)["result"]["stdout"] == "1000000\n", ran[:300]

        url = daemon.http_url + "/api/v1/sandbox/execute"
        body = b'{"agent_id": "a", "code": "1", "extra": [' + b",".join([b"[]"] * 300_000) + b"]}"
        for content_type in ("application/json", "application/JSON", "Application/Json; charset=utf-8"):
            # FastAPI parses a JSON type of any case: a test of the header's text let those through uncounted.
            answer_http = httpx.post(url, content=body, headers={"Content-Type": content_type}, timeout=60)
            assert answer_http.status_code == 422 and "more than 200000 JSON values" in answer_http.text, (
                answer_http.text
            )
        fine = httpx.post(url, json={"agent_id": "a", "code": code}, timeout=120)
        assert fine.status_code == 200 and fine.json()["stdout"] == "1000000\n", fine.text[:300]
        # A file written raw is data, never counted: a CSV of 300,000 commas.
        created = httpx.post(daemon.http_url + "/api/v1/sandboxes", json={}, timeout=120).json()
        csv = b"1,2,3\n" * 150_000
        written = httpx.put(f"{daemon.http_url}/api/v1/sandboxes/{created['sandbox_id']}/files",
                            params={"path": "/work/data.csv"}, content=csv, timeout=120)  # fmt: skip
        assert written.status_code == 200 and written.json()["size"] == len(csv), written.text
        # UTF-16 (json's parser reads it): an escape's NUL half once made the count take a flood for a string.
        hidden = '{"id": 3, "method": "ping", "params": {"x": ["\\"", ' + ", ".join(["{}"] * 300_000) + ', "\\""]}}'
        (answer16,) = raw_exchange(daemon.socket_path, hidden.encode("utf-16-le") + b"\n\x00", timeout=60)
        assert "more than 200000 JSON values" in answer16.decode("utf-8", "replace"), answer16[:300]
    finally:
        daemon.stop()
