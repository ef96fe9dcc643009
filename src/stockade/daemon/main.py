"""``stockade serve``: start the controller and the RPC server, stop cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from .config import DaemonConfig
from .controller import Controller
from .rpc_server import RPCServer

log = logging.getLogger("stockade.daemon")


async def run(config: DaemonConfig, ready: asyncio.Event | None = None) -> None:
    controller = Controller(config)
    # Start the default runtime now: its zygote, its pool, and the sweep of
    # whatever a previous daemon killed with SIGKILL left behind.
    try:
        await asyncio.get_running_loop().run_in_executor(None, _warm, controller)
    except Exception as exc:  # noqa: BLE001 - the daemon still serves other runtimes and says why
        log.warning("default runtime unavailable: %s", exc)
    server = RPCServer(config, controller)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
        log.info("stopping: finishing running work for up to %.0f s", config.shutdown_grace_s)
    finally:
        await server.close(config.shutdown_grace_s)
        await controller.shutdown(0.0)
        log.info("stopped")


def _warm(controller: Controller) -> None:
    from ..sdk import warm_up

    warm_up(manager=controller.manager)


def serve(config: DaemonConfig) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s stockade %(levelname)s %(message)s")
    asyncio.run(run(config))
    return 0
