"""A held sandbox whose caller went away mid-call: the call is left to finish in the isolate,
and the next call in line is served once it has, not refused because the agent is busy."""

from __future__ import annotations

import asyncio
import base64
import shutil
import tempfile

from stockade.daemon.config import DaemonConfig
from stockade.daemon.controller import Controller
from stockade.protocol.models import ReadFile, SandboxCreate, SandboxExec, WriteFile, unix_caller
from stockade.runtimes.manager import RuntimeManager

FAKE = {"policy": {"runtime": "fake", "timeout_seconds": 60}}


def test_the_call_after_a_given_up_one_waits_for_it_and_the_sandbox_keeps_its_state() -> None:
    cleanup: list[str] = []

    async def scenario() -> None:
        config = DaemonConfig(max_sandboxes=2, pool_size=0, allow_unisolated=True)  # the fake runtime
        controller = Controller(config, manager=RuntimeManager(pool_size=0))
        try:
            caller = unix_caller(0)
            created = await controller.create(SandboxCreate(**FAKE), caller)
            ref = {"sandbox_id": created.sandbox_id}
            scratch = tempfile.mkdtemp()  # the fake runtime writes the host's files
            cleanup.append(scratch)
            path = f"{scratch}/given-up-{created.sandbox_id}"
            command = ["sh", "-c", f"sleep 0.8; echo ran > {path}"]
            gone = asyncio.create_task(controller.sandbox_run(SandboxExec(command=command, **ref), caller))
            await asyncio.sleep(0.3)
            gone.cancel()  # its client went away
            await asyncio.gather(gone, return_exceptions=True)
            # Queued behind the given-up run (its answer still to come), not refused.
            data = base64.b64encode(b"state").decode()
            await asyncio.wait_for(controller.write_file(WriteFile(path=f"{path}.kept", data=data, **ref), caller), 20)
            ran = await controller.read_file(ReadFile(path=path, **ref), caller)
            assert base64.b64decode(ran.data) == b"ran\n"  # the run went on to its end
            result = await controller.sandbox_run(SandboxExec(command=["cat", f"{path}.kept"], **ref), caller)
            assert result.stdout == "state"
        finally:
            await controller.shutdown(0.0)

    try:
        asyncio.run(scenario())
    finally:
        for path in cleanup:
            shutil.rmtree(path, ignore_errors=True)
