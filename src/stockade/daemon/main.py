"""``stockade serve``: start the controller and the RPC server, stop cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from types import ModuleType

from .. import settings
from ..protocol.models import Caller
from ..rpc.codec import JsonLines
from ..rpc.server import RPCServer
from .config import DaemonConfig
from .controller import Controller
from .methods import METHODS
from .observers import Observers
from .privileges import KEEP_ROOT, drop_root, prepare_audit_dir

log = logging.getLogger("stockade.daemon")


async def run(config: DaemonConfig, ready: asyncio.Event | None = None) -> None:
    if config.daemon_user == KEEP_ROOT:
        config = config.replace(daemon_user=None)
    settings.install(config)  # read once, at the start: the whole process uses these
    settings.serve_callers()  # a secret with no hosts, a private network: the operator's to allow, not a caller's
    prepare_audit_dir(config)
    http_door: ModuleType | None = None
    if config.http is not None:
        from ..server import http as http_door
    controller = Controller(config)
    observers = _observers(config, controller)
    controller.listeners.append(observers)
    try:
        rpc_settings = config.server_settings()
        # The HTTP port first: one this user may not bind, or a busy one, is refused before anything listens.
        http_sock = http_door.bind(config) if http_door is not None else None
    except BaseException:
        await controller.shutdown(0.0)
        observers.close()
        raise
    server = RPCServer(rpc_settings, METHODS, JsonLines(), controller, observers, answers=controller.answers)

    async def abandon() -> None:
        """A start that failed (or was interrupted) before serving: nothing of it is left."""
        if http_sock is not None:
            http_sock.close()
        await server.close(0.0)  # its socket file only if it made it
        await controller.shutdown(0.0)
        observers.close()

    try:
        if config.daemon_user is not None:
            # Bound as root (in root's /run/stockade), then root goes, before any request is read.
            if config.unix_socket:
                await server.start()
            drop_root(config, controller)
        # Reach where isolates run now: on this host, the default runtime's zygote, its pool, and the
        # sweep of whatever a previous daemon killed with SIGKILL left behind; on a cluster, its
        # nodes' actors. One that cannot be reached is said at the start (and the daemon still serves).
        described = await controller.connect_placement()
    except BaseException:
        await abandon()
        raise
    if controller.placement.remote:
        if described.get("reachable", True):
            log.info("placement %s: %d node(s)", controller.placement.name, len(described.get("nodes", [])))
        else:
            log.warning("placement %s: %s", controller.placement.name, described.get("error"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    http = None
    started = False
    try:
        if config.unix_socket and config.daemon_user is None:
            await server.start()  # a live daemon's socket is never claimed: nothing of this start to undo
    except BaseException:
        await abandon()
        raise
    try:
        if http_door is not None and http_sock is not None:
            try:
                http = await http_door.start(config, controller, observers, http_sock)
            except BaseException:
                http_sock.close()  # uvicorn's, once it serves: closed with it
                raise
        where = config.socket if config.unix_socket else None
        log.info("daemon instance %s", controller.instance_id)
        for problem in settings.unknown_variables():
            log.warning("%s", problem)
        from ..doctor import kernel_budgets

        for problem in kernel_budgets(config.max_sandboxes):  # what `stockade doctor` says of them too
            log.warning("%s", problem)
        observers.admin(
            _DAEMON, "daemon.start", where or "", http=http.url if http else None, instance=controller.instance_id
        )
        started = True
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("stopping: finishing running work for up to %.0f s", config.shutdown_grace)
    finally:
        # Both doors refuse new work from here, and the work under way has one grace
        # period, whichever door it came by; then what is left is cut.
        server.stopping = True
        if http is not None:
            http.stop_accepting()
        if not await controller.wait_idle(config.shutdown_grace):
            # Past the grace: what still runs is ended, and its callers are told why.
            controller.cancel_all("the daemon stopped during this run")
            await controller.wait_idle(1.0)
        if http is not None:
            await http.close(1.0)
        await server.close(0.0)
        await controller.shutdown(0.0)
        if started:  # a start that failed was never recorded: neither is its end
            observers.say_unrecorded()  # what the daemon heard before it stopped, said before the stop
            observers.admin(_DAEMON, "daemon.stop", config.socket if config.unix_socket else "")
        observers.close()
        settings.install(None)
        log.info("stopped")


_DAEMON = Caller("daemon", "local", admin=True)


def _observers(config: DaemonConfig, controller: Controller) -> Observers:
    """Metrics (with the server extra), the audit log (unless turned off), the dashboard's history."""
    metrics = None
    try:
        from ..metrics import Metrics

        metrics = Metrics(active=controller.active_count)
    except ImportError as exc:
        log.info("no metrics: %s", exc)
    audit = None
    if config.audit_log is not None:
        from ..audit import AuditLog, AuditLogBusy

        os.makedirs(os.path.dirname(config.audit_log) or ".", mode=0o700, exist_ok=True)
        try:
            audit = AuditLog(config.audit_log, max_bytes=config.audit_max_bytes)
        except AuditLogBusy as exc:
            raise AuditLogBusy(f"{exc}: is another daemon running? STOCKADE_AUDIT_LOG gives this one its own") from None
        log.info("audit log: %s", config.audit_log)
    return Observers(metrics, audit, pools=controller.placement.pool_statistics)


def serve(config: DaemonConfig) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s stockade %(levelname)s %(message)s")
    from ..agent import linux

    # Not dumpable: no other process of its uid may read its memory or environment (/proc/PID/mem,
    # environ, fds) or attach to it. Without root, its egress workers run as its own uid: one taken
    # over through the proxy it serves would otherwise read its token and every sandbox's secrets.
    linux.prctl(linux.PR_SET_DUMPABLE, 0)
    with asyncio.Runner() as runner:
        try:
            runner.run(run(config))
        except BaseException:
            _exit_within(EXIT_GRACE_S, status=1)
            raise
        _exit_within(EXIT_GRACE_S)  # what is left: the runner's close, then the interpreter's thread joins
    return 0


# How long a daemon that has stopped (every isolate closed, "stopped" logged) may take to exit.
EXIT_GRACE_S = 10.0


def _exit_within(grace_s: float, status: int = 0) -> None:
    """Exit with ``status`` ``grace_s`` from now if the process has not by then.

    Everything the daemon started is closed when this is called; what could still hold its
    exit is a thread left blocked (one given up on by a call that was cancelled) that the
    interpreter would join for ever, leaving a stopped daemon that a service manager has to
    kill. Such a thread is a defect: it is named, with every thread's stack, on stderr (the
    log), written straight to the descriptor: a thread blocked in a log handler holds its lock.
    """

    def watch() -> None:
        time.sleep(grace_s)
        left = [t.name for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()]
        said = f"stockade WARNING the daemon stopped {grace_s:.0f} s ago and has not exited (threads left: {left})"
        with contextlib.suppress(OSError):
            os.write(2, f"{said}; their stacks:\n".encode())
            faulthandler.dump_traceback(sys.stderr, all_threads=True)
        os._exit(status)

    threading.Thread(target=watch, name="stockade-exit-watch", daemon=True).start()
