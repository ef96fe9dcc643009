"""A soak of the daemon: many clients at once, every kind of call, and the calls that end others.

Starts a real `stockade serve` and, for ``--seconds``, runs ``--clients``
threads that each pick at random: a one-shot `execute` (some streamed), a held
sandbox's `exec`/`run_code`/files (one sandbox per client, sometimes kept,
sometimes with a short idle timeout), `execute.cancel` of another client's run
seen in `status`, `sandbox.close` of its own sandbox while a call of its may
still run, and dropping its connection mid-call. It then checks what must
hold whatever the interleaving:

- every answer is an answer: a result or a mapped error, never `internal`;
- the daemon logs no traceback and is still answering;
- once the clients are gone and the idle timeouts have passed, `status` is
  empty and no isolate cgroup, process or run directory is left.

    .venv/bin/python bench/soak_daemon.py [--seconds 60] [--clients 12]
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from stockade.client import Client
from stockade.errors import StockadeError

TOKEN = secrets.token_hex(32)


def start_daemon(workdir: str) -> tuple[subprocess.Popen[bytes], str, str]:
    path = os.path.join(workdir, "d.sock")
    log = os.path.join(workdir, "daemon.log")
    env = {
        **os.environ,
        "STOCKADE_SOCKET": path,
        "STOCKADE_DAEMON_USER": "root",  # every runtime
        "STOCKADE_AUTH_TOKEN": TOKEN,
        "STOCKADE_MAX_REQUESTS": "100000",
        "STOCKADE_MAX_SANDBOXES": "8",
        "STOCKADE_QUEUE_LIMIT": "64",
        "STOCKADE_QUEUE_TIMEOUT": "20",
        "STOCKADE_SANDBOX_IDLE_TIMEOUT": "30",
        "STOCKADE_POOL_SIZE": "2",
    }
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "stockade.cli", "serve"], env=env, stdout=out, stderr=out)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            Client(path, auth_token=TOKEN).ping()
            return proc, path, log
        except StockadeError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("the daemon did not start")


class Soak:
    def __init__(self, path: str, seconds: float, seed: int) -> None:
        self.path = path
        self.until = time.monotonic() + seconds
        self.seed = seed
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []
        self.lock = threading.Lock()

    def note(self, what: str) -> None:
        with self.lock:
            self.outcomes[what] += 1

    def fail(self, what: str) -> None:
        with self.lock:
            self.failures.append(what)

    def client(self, number: int) -> None:
        rng = random.Random(self.seed * 1000 + number)
        client = Client(self.path, auth_token=TOKEN, timeout=30)
        sandbox: str | None = None
        while time.monotonic() < self.until:
            action = rng.choice(["execute", "execute", "stream", "held", "held", "files", "cancel", "close", "drop"])
            try:
                if action in ("execute", "stream"):
                    code = rng.choice(["pass", "print(1)", "import time; time.sleep(0.3)", "raise SystemExit(3)"])
                    chunks: list[bytes] = []
                    on_output = (lambda s, d, into=chunks: into.append(d)) if action == "stream" else None
                    r = client.execute(code=code, on_output=on_output)
                    self.note(f"execute:{r.termination_reason}")
                elif action in ("held", "files"):
                    if sandbox is None:
                        sandbox = client.create_sandbox(keep=rng.random() < 0.3, idle_timeout=rng.choice([2, 30]))
                    if action == "held":
                        r = client.sandbox_run_code(sandbox, rng.choice(["pass", "import time; time.sleep(0.2)"]))
                        self.note(f"held:{r.termination_reason}")
                    else:
                        client.sandbox_write_file(sandbox, "/work/f", os.urandom(rng.randint(0, 4096)))
                        client.sandbox_read_file(sandbox, "/work/f")
                        self.note("files:ok")
                elif action == "cancel":
                    running = [s for s in client.status()["active_sandboxes"] if s["kind"] == "execute"]
                    if running:
                        client.cancel_execution(str(rng.choice(running)["execution_id"]))
                        self.note("cancel:ok")
                elif action == "close" and sandbox is not None:
                    closing, sandbox = sandbox, None
                    threading.Thread(target=self._call_during_close, args=(closing,)).start()
                    time.sleep(rng.random() * 0.2)
                    client.close_sandbox(closing)
                    self.note("close:ok")
                elif action == "drop":
                    doomed = Client(self.path, auth_token=TOKEN, timeout=0.2)
                    try:
                        doomed.execute(code="import time; time.sleep(2)")
                    except StockadeError:
                        pass  # it gave up waiting and hung up, mid-run
                    doomed.close()
                    self.note("drop:ok")
            except StockadeError as exc:
                message = str(exc)
                if "Internal error" in message:
                    self.fail(f"{action}: {message}")
                else:
                    self.note(f"{action}:{type(exc).__name__}")
                    if "no sandbox" in message or "closed after" in message:
                        sandbox = None
        if sandbox is not None:
            try:
                client.close_sandbox(sandbox)
            except StockadeError:
                pass
        client.close()

    def _call_during_close(self, sandbox: str) -> None:
        try:
            r = Client(self.path, auth_token=TOKEN, timeout=30).sandbox_exec(sandbox, ["sleep", "1"])
            self.note(f"call-during-close:{r.termination_reason}")
        except StockadeError as exc:
            if "Internal error" in str(exc):
                self.fail(f"call during close: {exc}")
            else:
                self.note(f"call-during-close:{type(exc).__name__}")


def leftovers(daemon_pid: int) -> list[str]:
    found = []
    for root, dirs, _files in os.walk("/sys/fs/cgroup"):
        found += [os.path.join(root, d) for d in dirs if d.startswith(f"stockade-{daemon_pid}-")]
        if root.count("/") > 5:
            dirs.clear()
    found += [n for n in os.listdir(tempfile.gettempdir()) if n.startswith(f"stockade-vm-{daemon_pid}-")]
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="stockade-soak-")
    proc, path, log = start_daemon(workdir)
    try:
        soak = Soak(path, args.seconds, args.seed)
        threads = [threading.Thread(target=soak.client, args=(n,)) for n in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.seconds + 120)
        hung = sum(t.is_alive() for t in threads)
        watcher = Client(path, auth_token=TOKEN)
        deadline = time.monotonic() + 60  # kept sandboxes' idle timeouts (30 s at most) included
        while watcher.status()["total_count"] and time.monotonic() < deadline:
            time.sleep(0.5)
        status = watcher.status()
        alive = watcher.ping() == "pong"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    with open(log, errors="replace") as f:
        logged = f.read()
    left = leftovers(proc.pid)
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"{sum(soak.outcomes.values())} calls by {args.clients} clients in {args.seconds:g} s")
    for what, count in sorted(soak.outcomes.items()):
        print(f"  {what:40} {count}")
    problems = list(soak.failures)
    problems += [f"{hung} clients hung"] if hung else []
    problems += [] if alive else ["the daemon stopped answering"]
    problems += [f"status not empty at the end: {status['active_sandboxes']}"] if status["total_count"] else []
    problems += ["the daemon logged a traceback"] if "Traceback" in logged else []
    problems += [f"daemon exit status {code}"] if code != 0 else []
    problems += [f"left behind: {left}"] if left else []
    print("\n".join(f"PROBLEM: {p}" for p in problems) or "OK: every answer was an answer, nothing left behind")
    if "Traceback" in logged:
        print(logged[-3000:])
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
