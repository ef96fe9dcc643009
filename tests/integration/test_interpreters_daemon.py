"""Stateful interpreters through the daemon (``Client``, ``AsyncClient``) and its HTTP API."""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Iterator

import httpx
import pytest

from stockade.client import AsyncClient, Client
from stockade.errors import InvalidRequestError
from stockade.result import ExecResult, validate
from tests.daemon_harness import Daemon, start_daemon

HTML = "class Table:\n    def _repr_html_(self): return '<table></table>'\n"


@pytest.fixture
def daemon(process_runtime: str) -> Iterator[Daemon]:
    d = start_daemon(http="127.0.0.1:0")
    yield d
    assert d.stop() == 0, d.logs()


def test_a_client_keeps_an_interpreter_across_calls(daemon: Daemon) -> None:
    with Client(daemon.socket_path) as client, client.sandbox() as sb:
        py = sb.interpreter("nb")
        assert py.run("import math\nradius = 2").execution_count == 1
        area = py.run(f"{HTML}display(Table())\nmath.pi * radius ** 2")
        shown, value = area.results
        assert shown.html == "<table></table>" and value.kind == "execute_result"
        assert float(value.text or "") == pytest.approx(12.566, abs=1e-3) and area.execution_count == 2
        failed = py.run("radius / 0")
        assert failed.exception is not None and failed.exception.name == "ZeroDivisionError"
        assert '"<cell-3>", line 1' in failed.exception.traceback
        assert py.run("radius").results[0].text == "2"  # the state survived the exception
        py.restart()
        assert py.run("'radius' in dir()").results[0].text == "False"
        with pytest.raises(InvalidRequestError, match="session runs Python"):
            sb.run_code("echo", "bash", session="nb")
        with pytest.raises(TypeError, match="sesion"):
            sb.run_code("1", sesion="nb")  # type: ignore[call-arg]


def test_a_cell_is_interrupted_from_another_thread_and_keeps_its_state(daemon: Daemon) -> None:
    with Client(daemon.socket_path) as client, client.sandbox() as sb:
        py = sb.interpreter()
        py.run("kept = 'yes'")
        assert not py.interrupt()  # nothing runs
        started = threading.Event()
        interrupted: list[bool] = []

        def interrupt_once_started() -> None:
            if started.wait(30):
                interrupted.append(sb.interpreter("other").interrupt())  # not its cell: left alone
                interrupted.append(py.interrupt())

        helper = threading.Thread(target=interrupt_once_started)
        helper.start()
        r = py.run(
            "print('looping', flush=True)\nwhile True:\n    pass\n", timeout=25, on_output=lambda s, d: started.set()
        )
        helper.join()
        assert interrupted == [False, True]
        assert r.exception is not None and r.exception.name == "KeyboardInterrupt"
        assert (r.termination_reason, r.error) == (
            "killed",
            "interrupted (the cell raised KeyboardInterrupt; its interpreter keeps its state)",
        )
        assert py.run("kept").results[0].text == "'yes'"


def test_the_async_client_runs_cells_too(daemon: Daemon) -> None:
    async def scenario() -> None:
        async with AsyncClient(daemon.socket_path) as client, client.sandbox() as sb:
            await sb.run_code("total = 40", session="s")
            r = await sb.run_code("total + 2", session="s")
            assert r.results[0].text == "42" and r.execution_count == 2
            assert await sb.close_interpreter("s") is True
            assert await sb.close_interpreter("s") is False

    asyncio.run(scenario())


def test_http_cells_interrupts_and_restarts(daemon: Daemon) -> None:
    assert daemon.http_url is not None
    with httpx.Client(base_url=daemon.http_url, timeout=60) as http:
        created = http.post("/api/v1/sandboxes", json={})
        assert created.status_code == 201, created.text
        sandbox = created.json()["sandbox_id"]
        cell = f"/api/v1/sandboxes/{sandbox}/run_code"
        pixel = base64.b64encode(b"\x89PNG fake").decode()
        first = http.post(
            cell,
            json={
                "session": "web",
                "code": "class P:\n    def _repr_png_(self): return " + repr(b"\x89PNG fake") + "\nP()",
            },
        )
        assert first.status_code == 200, first.text
        result = validate(ExecResult, first.json())
        assert result.results[0].data["image/png"] == pixel and result.execution_count == 1
        assert http.post(cell, json={"session": "web", "code": "P.__name__"}).json()["results"][0]["data"] == {
            "text/plain": "'P'"
        }
        for asked in ("", "?session=web"):
            assert http.post(f"/api/v1/sandboxes/{sandbox}/interrupt{asked}").json() == {
                "sandbox_id": sandbox,
                "interrupted": False,
            }
        closed = http.delete(f"/api/v1/sandboxes/{sandbox}/interpreters/web")
        assert closed.json() == {"sandbox_id": sandbox, "session": "web", "closed": True}
        again = http.post(cell, json={"session": "web", "code": "'P' in dir()"}).json()
        assert again["results"][0]["data"]["text/plain"] == "False" and again["execution_count"] == 1
        refused = http.post(cell, json={"session": "web", "code": "echo", "language": "bash"})
        assert refused.status_code == 422 and "session runs Python" in refused.text
        bad_name = http.post(cell, json={"session": "", "code": "1"})
        assert bad_name.status_code in (400, 422), bad_name.text
        assert http.delete(f"/api/v1/sandboxes/{sandbox}").status_code == 200


# What code inside can make its results hold: text UTF-8 cannot carry (a lone surrogate), JSON nested
# deeper than any encoder recurses, a file name that is not UTF-8.
ODD = (
    "import json\n"
    "class Odd:\n"
    "    def _repr_html_(self): return '<b>\\udcff</b>'\n"
    "class Deep:\n"
    "    def __init__(self, n, tuples=False): self.n, self.tuples = n, tuples\n"
    "    def _repr_json_(self):\n"
    "        v = 0\n"
    "        for _ in range(self.n): v = (v,) if self.tuples else [v]\n"
    "        return v\n"
    "open(b'/tmp/name-\\xff', 'w').close()\n"
)


def test_what_utf8_or_an_encoder_cannot_carry_is_answered_not_lost(daemon: Daemon) -> None:
    with Client(daemon.socket_path, timeout=60) as client, client.sandbox() as sb:
        py = sb.interpreter("odd")
        py.run(ODD)
        odd = py.run("Odd()")
        assert odd.results[0].html == "<b>\\xff</b>"  # the surrogate as its byte's escape, not a lost answer
        for depth, tuples in ((64, False), (65, False), (200, False), (975, False), (100, True), (5000, True)):
            deep = py.run(f"Deep({depth}, {tuples})")  # answered (not a hang, not a dropped connection)
            assert deep.success and deep.results[0].text is not None
            # Deeper than 64 levels: left out by the agent (the host would not take it), its repr stays.
            assert ("application/json" in deep.results[0].data) == (depth <= 64), depth
        names = [e["name"] for e in sb.list_dir("/tmp")]
        assert "name-\\xff" in names, names  # a name that is not UTF-8, as its byte's escape
        assert py.run("1 + 1").results[0].text == "2"  # the sandbox and its session are still there
    assert daemon.http_url is not None
    with httpx.Client(base_url=daemon.http_url, timeout=60) as http:
        sandbox = http.post("/api/v1/sandboxes", json={}).json()["sandbox_id"]
        cell = f"/api/v1/sandboxes/{sandbox}/run_code"
        assert http.post(cell, json={"session": "odd", "code": ODD}).status_code == 200
        html = http.post(cell, json={"session": "odd", "code": "Odd()"})
        assert html.status_code == 200 and html.json()["results"][0]["data"]["text/html"] == "<b>\\xff</b>"
        deep = http.post(cell, json={"session": "odd", "code": "Deep(975)"})
        assert deep.status_code == 200 and "application/json" not in deep.json()["results"][0]["data"]
        listing = http.get(f"/api/v1/sandboxes/{sandbox}/files/list", params={"path": "/tmp"})
        assert listing.status_code == 200 and "name-\\xff" in [e["name"] for e in listing.json()["entries"]]
        assert http.delete(f"/api/v1/sandboxes/{sandbox}").status_code == 200
