"""Start-up cost of an isolate, against references measured in the same run.

Everything is started from this one Python process, N times each, and reported
as p50/p95 in milliseconds with ratios to ``bwrap + python`` (the reference for
the process runtime). Targets (issue 2): warm one-shot run_code p50 <= 0.25x
bwrap+python; cold one-shot run p50 <= 1.2x bwrap+python (the two measured in
alternation; back-to-back cold runs, whose background teardown overlaps the
next run, are printed too).

The command line, ``stockade run -- python3 -I -S -c pass`` as a user types it,
is timed twice: with no daemon (the run in the CLI's own process), and through
a daemon this bench starts on a temporary socket (``STOCKADE_SOCKET``). The two
alternate with a bwrap+python run of their own, and their ratios are to that
reference, 0.1 s apart (the daemon's pool refills in between, as it does
between a user's commands). Targets: through a daemon <= 2x, without one <= 4x.
The CLI runs with its bytecode written (a first, untimed run writes it), as
when installed.

    .venv/bin/python bench/startup.py [--runs 50]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import stockade
from stockade.runtimes.manager import RuntimeManager

PY_ARGV = ["/usr/bin/python3", "-I", "-S", "-c", "pass"]
SETTLE_S = 0.01
# Between the CLI rows' runs: the daemon refills its warm pool after each run through it,
# and that refill would otherwise compete with the next run on the cores.
CLI_SETTLE_S = 0.1
COLD_ROW = "stockade.run(python3) cold, no pool"
CLI_REF_ROW = "bwrap + python3, alternated with the CLI rows"
CLI_DAEMON_ROW = "`stockade run -- python3` CLI, through a daemon"
CLI_LOCAL_ROW = "`stockade run -- python3` CLI, no daemon"
STOCKADE_CLI = os.path.join(os.path.dirname(sys.executable), "stockade")
BWRAP = [
    "bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr",
    "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
    "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
]  # fmt: skip


def measure(fn: Callable[[], object], runs: int, between: Callable[[], object] | None = None) -> list[float]:
    times = []
    for _ in range(runs):
        if between is not None:
            between()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return times


def interleaved(
    first: Callable[[], object], second: Callable[[], object], runs: int
) -> tuple[list[float], list[float]]:
    """Time two things in alternation: A, B, A, B, ..."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(runs):
        for fn, out in ((first, times[0]), (second, times[1])):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1000)
    return times


def alternated(fns: list[Callable[[], object]], runs: int, settle: float = 0.0) -> list[list[float]]:
    """Time several things in turn, ``settle`` seconds apart: A, B, C, A, B, C, ..."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, out in zip(fns, times, strict=True):
            time.sleep(settle)
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1000)
    return times


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI run: no STOCKADE_* setting but ``extra``'s, and bytecode
    written as an installed package has it (this bench's own run may forbid it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKADE_") and k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, **extra}


@contextmanager
def daemon(directory: str) -> Iterator[str]:
    """A `stockade serve` on a socket in ``directory`` (its audit log beside it); its socket."""
    path = os.path.join(directory, "d.sock")
    audit = os.path.join(directory, "audit.log")
    env = cli_env(STOCKADE_SOCKET=path, STOCKADE_AUDIT_LOG=audit, STOCKADE_DAEMON_USER="root")
    with open(os.path.join(directory, "daemon.log"), "wb") as log:
        proc = subprocess.Popen([STOCKADE_CLI, "serve"], env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                with open(os.path.join(directory, "daemon.log")) as f:
                    raise SystemExit(f"the daemon did not start: {f.read()}")
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(path)
                break
            except OSError:
                time.sleep(0.02)
        yield path
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def check(result: stockade.ExecResult) -> None:
    if not result.success:
        raise SystemExit(f"benchmark run failed: {result.summary()}\n{result.stderr}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    n = args.runs
    rows: dict[str, list[float]] = {}

    rows["python3 -I -S -c pass (subprocess)"] = measure(lambda: subprocess.run(PY_ARGV, check=True), n)

    cold_manager = RuntimeManager(pool_size=0)
    t0 = time.perf_counter()
    check(stockade.run(PY_ARGV, manager=cold_manager))
    first = (time.perf_counter() - t0) * 1000

    def cold_run() -> None:
        check(stockade.run(PY_ARGV, manager=cold_manager))

    if shutil.which("bwrap"):
        # Alternate the reference and the cold run, so that both see the same
        # machine (these hosts drift), and each cold run finds the previous
        # isolate's background teardown done, as a call to a service that is
        # not saturated does. The back-to-back row below shows the other case.
        ref_times, cold_times = interleaved(lambda: subprocess.run([*BWRAP, *PY_ARGV], check=True), cold_run, n)
        rows["bwrap --unshare-all + python3 (subprocess)"] = ref_times
        rows[COLD_ROW] = cold_times
    else:
        rows[COLD_ROW] = measure(cold_run, n)
    rows["stockade.run(python3) cold, back-to-back"] = measure(cold_run, n)
    cold_runtime = cold_manager.get("process")
    cold_manager.close()

    warm_manager = RuntimeManager(pool_size=2)
    warm_runtime = warm_manager.get("process")
    stockade.warm_up(manager=warm_manager)

    def refill() -> None:
        # "Served by the warm pool": the previous isolate is torn down, the pool
        # is full again, and the new isolate has settled (its builder processes
        # have exited) before the timed call, as between requests of a service.
        warm_runtime.wait_idle()  # type: ignore[attr-defined]
        warm_runtime.wait_ready()  # type: ignore[attr-defined]
        time.sleep(SETTLE_S)

    rows["stockade.run_code('pass') warm pool, fresh isolate"] = measure(
        lambda: check(stockade.run_code("pass", manager=warm_manager)), n, between=refill
    )
    with stockade.Sandbox(manager=warm_manager) as sb:
        rows["Sandbox.run_code('pass') held sandbox"] = measure(lambda: check(sb.run_code("pass")), n)
    warm_manager.close()
    del cold_runtime

    # The command line, as a user runs it: alone, and through a daemon, each in turn with
    # a reference of its own (the CLI rows come last, when the machine may be in another phase).
    cli_runs = max(10, n // 2)
    cli = [STOCKADE_CLI, "run", "--", *PY_ARGV]
    with tempfile.TemporaryDirectory(prefix="stockade-bench-") as directory, daemon(directory) as daemon_socket:
        local_env, daemon_env = cli_env(), cli_env(STOCKADE_SOCKET=daemon_socket)
        for env in (local_env, daemon_env):  # untimed: writes the bytecode, fills the page cache
            subprocess.run(cli, check=True, env=env)
        fns: list[Callable[[], object]] = [
            lambda: subprocess.run(cli, check=True, env=daemon_env),
            lambda: subprocess.run(cli, check=True, env=local_env),
        ]
        names = [CLI_DAEMON_ROW, CLI_LOCAL_ROW]
        if shutil.which("bwrap"):
            fns.insert(0, lambda: subprocess.run([*BWRAP, *PY_ARGV], check=True))
            names.insert(0, CLI_REF_ROW)
        rows.update(zip(names, alternated(fns, cli_runs, CLI_SETTLE_S), strict=True))
    rows["`python -c 'import stockade.cli'` (import cost)"] = measure(
        lambda: subprocess.run([sys.executable, "-c", "import stockade.cli"], check=True, env=cli_env()), cli_runs
    )

    ref_name = "bwrap --unshare-all + python3 (subprocess)"
    ref = statistics.median(rows[ref_name]) if ref_name in rows else None
    cli_ref = statistics.median(rows[CLI_REF_ROW]) if CLI_REF_ROW in rows else None
    print(
        f"\nstart-up, {n} runs each (CLI rows {cli_runs}), one Python process;"
        f" first cold call incl. zygote: {first:.1f} ms\n"
    )
    print(f"| {'what':<52} | {'p50 ms':>7} | {'p95 ms':>7} | {'x bwrap+py':>10} |")
    print(f"|{'-' * 54}|{'-' * 9}|{'-' * 9}|{'-' * 12}|")
    for name, values in rows.items():
        p50 = statistics.median(values)
        base = cli_ref if name in (CLI_REF_ROW, CLI_DAEMON_ROW, CLI_LOCAL_ROW) else ref
        ratio = f"{p50 / base:.2f}" if base else "n/a"
        print(f"| {name:<52} | {p50:7.2f} | {pct(values, 0.95):7.2f} | {ratio:>10} |")
    if ref:
        warm = statistics.median(rows["stockade.run_code('pass') warm pool, fresh isolate"]) / ref
        cold = statistics.median(rows[COLD_ROW]) / ref
        print(f"\ntarget warm <= 0.25x: {warm:.2f}x {'OK' if warm <= 0.25 else 'MISSED'}")
        print(f"target cold <= 1.20x: {cold:.2f}x {'OK' if cold <= 1.2 else 'MISSED'}")
    if cli_ref:
        via = statistics.median(rows[CLI_DAEMON_ROW]) / cli_ref
        local = statistics.median(rows[CLI_LOCAL_ROW]) / cli_ref
        print(f"target CLI through a daemon <= 2x: {via:.2f}x {'OK' if via <= 2 else 'MISSED'}")
        print(f"target CLI without a daemon <= 4x: {local:.2f}x {'OK' if local <= 4 else 'MISSED'}")


if __name__ == "__main__":
    main()
