"""Start-up cost of an isolate, against references measured in the same run.

Everything is started from this one Python process, N times each, and reported
as p50/p95 in milliseconds with ratios to ``bwrap + python`` (the reference for
the process runtime). Targets (issue 2): warm one-shot run_code p50 <= 0.25x
bwrap+python; cold one-shot run p50 <= 1.2x bwrap+python (the two measured in
alternation; back-to-back cold runs, whose background teardown overlaps the
next run, are printed too).

    .venv/bin/python bench/startup.py [--runs 50]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import stockade
from stockade.runtimes.manager import RuntimeManager

PY_ARGV = ["/usr/bin/python3", "-I", "-S", "-c", "pass"]
SETTLE_S = 0.01
COLD_ROW = "stockade.run(python3) cold, no pool"
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

    cli = [os.path.join(os.path.dirname(sys.executable), "stockade"), "run", "--", *PY_ARGV]
    rows["`stockade run -- python3` CLI wall time"] = measure(lambda: subprocess.run(cli, check=True), max(10, n // 5))
    rows["`python -c 'import stockade.cli'` (import cost)"] = measure(
        lambda: subprocess.run([sys.executable, "-c", "import stockade.cli"], check=True), max(10, n // 5)
    )

    ref_name = "bwrap --unshare-all + python3 (subprocess)"
    ref = statistics.median(rows[ref_name]) if ref_name in rows else None
    print(
        f"\nstart-up, {n} runs each (CLI rows fewer), one Python process;"
        f" first cold call incl. zygote: {first:.1f} ms\n"
    )
    print(f"| {'what':<52} | {'p50 ms':>7} | {'p95 ms':>7} | {'x bwrap+py':>10} |")
    print(f"|{'-' * 54}|{'-' * 9}|{'-' * 9}|{'-' * 12}|")
    for name, values in rows.items():
        p50 = statistics.median(values)
        ratio = f"{p50 / ref:.2f}" if ref else "n/a"
        print(f"| {name:<52} | {p50:7.2f} | {pct(values, 0.95):7.2f} | {ratio:>10} |")
    if ref:
        warm = statistics.median(rows["stockade.run_code('pass') warm pool, fresh isolate"]) / ref
        cold = statistics.median(rows[COLD_ROW]) / ref
        print(f"\ntarget warm <= 0.25x: {warm:.2f}x {'OK' if warm <= 0.25 else 'MISSED'}")
        print(f"target cold <= 1.20x: {cold:.2f}x {'OK' if cold <= 1.2 else 'MISSED'}")


if __name__ == "__main__":
    main()
