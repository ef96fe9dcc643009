"""The reaper: one-shot isolates torn down on a thread of their runtime's, off the caller's path."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sandbox import AgentSandbox


class Reaper:
    """Tears one-shot isolates down in the background, so results return at once.

    ``defer`` runs other housekeeping on the same thread, in order.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[AgentSandbox | None, Callable[[], None] | None]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def put(self, sandbox: AgentSandbox, after: Callable[[], None] | None = None) -> None:
        # Killed here, in the reaper's thread (``close`` kills first), not in the
        # caller's: a kill before returning cost a one-shot's caller 0.2-0.4 ms
        # here (its isolate's exit competing for the cores), 7-14% of a warm
        # run. Nothing runs on for long: a one-shot's agent forks nothing after
        # its answer, and the reaper kills within milliseconds (the GIL's switch
        # interval, 5 ms, at worst).
        self._enqueue(sandbox, after)

    def defer(self, work: Callable[[], None]) -> None:
        self._enqueue(None, work)

    def _enqueue(self, sandbox: AgentSandbox | None, after: Callable[[], None] | None) -> None:
        self._queue.put((sandbox, after))
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="stockade-reaper", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            sandbox, after = self._queue.get()
            try:
                if sandbox is not None:
                    sandbox.close()
                if after is not None:
                    after()
            except Exception:  # noqa: BLE001, S110 - teardown is best effort per isolate; next one goes on
                pass
            finally:
                self._queue.task_done()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.002)
