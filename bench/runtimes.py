"""Cold start and warm exec per runtime, next to the raw tool, in one run.

- gvisor: `runsc --network=none do /usr/bin/python3 -I -c pass` (raw) against
  stockade's cold start of a gVisor sandbox (runsc run + the agent answering)
  and a one-shot `run_code("pass")` on it; exec of `true` in a held sandbox.
- process: the same rows, for comparison.
- microvm: a bare QEMU boot of the same kernel and initramfs (raw), a cold
  boot, a start from the warm pool, a start restored from a snapshot, and
  exec in a warm VM.

Targets (issue 3): gvisor cold start <= 1.15x raw `runsc do`; microvm start from
the pool or snapshot <= 0.2x a cold boot; exec in a warm microVM <= 50 ms.

    .venv/bin/python bench/runtimes.py [--runs 15]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable

import stockade
from stockade import Policy
from stockade.runtimes.manager import RuntimeManager


def measure(fn: Callable[[], object], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def raw_qemu_boot(accel: str) -> float:
    """QEMU started by hand with the guest image, until its agent answers one ping (ms)."""
    from stockade.agent import wire
    from stockade.runtimes.microvm import image, snapshot
    from stockade.runtimes.microvm.runtime import _qemu_command, qemu_binary

    guest = image.find_image()
    qemu = qemu_binary()
    assert guest is not None and qemu is not None
    rundir = tempfile.mkdtemp(prefix="stockade-bench-qemu-")
    path = os.path.join(rundir, "agent.sock")
    started = time.perf_counter()
    proc = subprocess.Popen(_qemu_command(qemu, guest, Policy(), accel, rundir, path),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        while True:
            try:
                sock = socket.socket(socket.AF_UNIX)
                sock.connect(path)
                break
            except OSError:
                sock.close()
                time.sleep(0.01)
        snapshot.wait_for_snapshot_point(sock, time.monotonic() + 120)  # init's "S", then the go line
        sock.sendall(snapshot.go_line(64, "none"))
        sock.sendall(wire.encode_message(wire.request("ping", {}, 1)))
        sock.settimeout(120)
        wire.read_frame(sock)
        elapsed = (time.perf_counter() - started) * 1000
        sock.close()
        return elapsed
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(rundir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    rows: list[tuple[str, list[float]]] = []
    manager = RuntimeManager(pool_size=0)
    notes: list[str] = []

    runsc = shutil.which("runsc")
    gvisor = manager.cached_availability("gvisor")
    if runsc and gvisor.available:
        root = tempfile.mkdtemp(prefix="stockade-bench-runsc-")
        raw = [runsc, f"--root={root}", "--network=none", f"--platform={gvisor.details['platform']}", "do",
               "/usr/bin/python3", "-I", "-c", "pass"]  # fmt: skip
        rows.append(("raw `runsc do python3 -I -c pass`", measure(lambda: subprocess.run(raw, check=True), args.runs)))
        shutil.rmtree(root, ignore_errors=True)
        runtime = manager.get("gvisor")

        def cold() -> None:
            sandbox = runtime.start(Policy())
            sandbox.close()

        starts: list[float] = []

        def cold_recorded() -> None:
            sandbox = runtime.start(Policy())
            starts.append(sandbox.cold_start_ms)
            sandbox.close()

        measure(cold_recorded, args.runs)
        rows.append(("gvisor: stockade cold start (runsc run + agent ready)", starts))
        with runtime.start(Policy()) as held:
            held.exec(["true"])
            rows.append(("gvisor: exec `true` in a warm sandbox", measure(lambda: held.exec(["true"]), args.runs * 2)))
            rows.append(("gvisor: run_code('pass') in a warm sandbox",
                         measure(lambda: held.run_code("pass"), args.runs * 2)))  # fmt: skip
    else:
        notes.append(f"gvisor: {gvisor.reason}")

    process = manager.get("process")
    process.start(Policy()).close()  # the zygote is up
    rows.append(("process: cold start", [process.start(Policy()).cold_start_ms for _ in range(args.runs)]))
    with process.start(Policy()) as held:
        rows.append(("process: exec `true` in a warm sandbox", measure(lambda: held.exec(["true"]), args.runs * 2)))
    microvm = manager.cached_availability("microvm")
    if microvm.available:
        vm_runtime = manager.get("microvm")
        raw_boots = [raw_qemu_boot(str(microvm.details.get("accel"))) for _ in range(max(3, args.runs // 4))]
        rows.append((f"raw QEMU boot of the same kernel+initramfs ({microvm.details.get('accel')})", raw_boots))
        boots: list[float] = []
        vm_runs = max(3, args.runs // 4)  # a TCG boot takes seconds
        for _ in range(vm_runs):
            sandbox = vm_runtime._build(Policy(), restore=False)  # type: ignore[attr-defined]
            boots.append(sandbox.cold_start_ms)
            sandbox.close()
        rows.append((f"microvm ({microvm.details.get('accel')}): cold boot to agent ready", boots))
        try:
            vm_runtime.make_snapshot()  # type: ignore[attr-defined]
            restores: list[float] = []
            for _ in range(vm_runs):
                sandbox = vm_runtime._build(Policy())  # type: ignore[attr-defined]
                assert sandbox.restored, "the start did not use the snapshot"
                restores.append(sandbox.cold_start_ms)
                sandbox.close()
            rows.append(("microvm: start restored from a snapshot", restores))
        except stockade.StockadeError as exc:
            notes.append(f"microvm snapshot: {exc}")
        pooled = RuntimeManager(pool_size=1)
        pool_runtime = pooled.get("microvm")
        handovers: list[float] = []
        for _ in range(vm_runs):
            pool_runtime.warm_up()  # type: ignore[attr-defined]
            pool_runtime.wait_ready(180)  # type: ignore[attr-defined]
            sandbox = pool_runtime.acquire(Policy())  # type: ignore[attr-defined]
            handovers.append(sandbox.cold_start_ms)
            pool_runtime.dispose(sandbox)  # type: ignore[attr-defined]
        pooled.close()
        rows.append(("microvm: start served by the warm pool", handovers))
        with vm_runtime.start(Policy()) as held:
            held.exec(["true"])
            rows.append(("microvm: exec `true` in a warm VM", measure(lambda: held.exec(["true"]), args.runs)))
            rows.append(("microvm: run_code('pass') in a warm VM", measure(lambda: held.run_code("pass"), args.runs)))
    else:
        notes.append(f"microvm: {microvm.reason}")
    manager.close()

    print(f"\n| {'what':<56} | {'p50 ms':>8} | {'p95 ms':>8} |")
    print(f"|{'-' * 58}|{'-' * 10}|{'-' * 10}|")
    for name, values in rows:
        print(f"| {name:<56} | {statistics.median(values):8.2f} | {pct(values, 0.95):8.2f} |")
    table = dict(rows)
    raw_name = "raw `runsc do python3 -I -c pass`"
    if raw_name in table:
        ratio = statistics.median(table["gvisor: stockade cold start (runsc run + agent ready)"]) / statistics.median(
            table[raw_name]
        )
        print(f"\ngvisor cold start <= 1.15x raw runsc do: {ratio:.2f}x {'OK' if ratio <= 1.15 else 'MISSED'}")
    cold_vm = next((v for k, v in table.items() if k.startswith("microvm (")), None)
    if cold_vm is not None:
        ratio = statistics.median(table["microvm: start served by the warm pool"]) / statistics.median(cold_vm)
        print(
            f"microvm start from the warm pool <= 0.2x a cold boot: {ratio:.4f}x {'OK' if ratio <= 0.2 else 'MISSED'}"
        )
        if "microvm: start restored from a snapshot" in table:
            ratio = statistics.median(table["microvm: start restored from a snapshot"]) / statistics.median(cold_vm)
            verdict = "OK" if ratio <= 0.2 else "MISSED"
            print(f"microvm start from a snapshot <= 0.2x a cold boot: {ratio:.3f}x {verdict}")
        warm_exec = statistics.median(table["microvm: exec `true` in a warm VM"])
        print(f"exec in a warm microVM <= 50 ms: {warm_exec:.1f} ms {'OK' if warm_exec <= 50 else 'MISSED'}")
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
