"""What the daemon's own CPU costs generation here: generate() calls beside a thread that burns CPU.

    .venv/bin/python bench/interference.py [--burn-ms 0,2,4,6] [--processes 2] [--calls 60] [--syscalls]

Goal 1 (run.py, section 1) asks the daemon to add at most 5 % to N generate() calls at 64 px. On a
CPU, generation keeps every core busy and holds the GIL between torch ops, so each millisecond of
the daemon's own work (watching, claiming, validating, writing, reporting: bench/own_cpu.py) is
taken from it. This measures that exchange rate alone, with no daemon: `generate()` calls on a
worker thread (test model, 64 px, 4 steps, the model loaded on that thread, as the daemon does)
while a second thread of the same process burns pure-Python CPU in 4 bursts every 64 ms (about one
call), only while the timed calls run. Each burn runs in fresh processes, alternating; ratios are
against no burn in the same run, and "cost" is the time added to a call per millisecond the burner
really used per call.
`--syscalls` burns with `os.stat` calls instead (each lets go of the GIL and takes it back, as
the daemon's file work does hundreds of times a job).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PY, machine
from run import Direct

PERIOD_S = 0.016
"""One burst every 16 ms: four a call, as the daemon's work for a job comes in pieces (claim, start,
progress, write)."""


def child(burn_ms: float, model: Path, calls: int, syscalls: bool) -> None:
    """Runs in a fresh process: prints seconds per call and the burner's CPU seconds per call."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    timing, done = threading.Event(), threading.Event()
    burned: list[float] = []
    times: list[float] = []

    def burner() -> None:  # burns only while the timed calls run, not during the load
        used = 0.0
        timing.wait()
        while not done.is_set():
            time.sleep(PERIOD_S)
            start = time.thread_time()
            while time.thread_time() - start < burn_ms / 4e3:
                if syscalls:
                    os.stat(".")
                else:
                    sum(range(200))
            used += time.thread_time() - start
        burned.append(used)

    def worker() -> None:
        direct = Direct(SimpleNamespace(sd=model))  # loads and warms the model on this thread
        timing.set()
        start = time.perf_counter()
        direct.run(calls)
        times.append(time.perf_counter() - start)
        done.set()

    work = threading.Thread(target=worker)
    work.start()
    threading.Thread(target=burner, daemon=True).start()
    work.join()
    time.sleep(2 * PERIOD_S)
    print(times[0] / calls, (burned[0] if burned else 0.0) / calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--burn-ms", default="0,2,4,6", help="CPU ms burned per 64 ms, comma-separated")
    parser.add_argument("--processes", type=int, default=2, help="fresh processes per burn (default 2)")
    parser.add_argument("--calls", type=int, default=60)
    parser.add_argument("--syscalls", action="store_true", help="burn with os.stat calls, not pure Python")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(float(args.child[0]), Path(args.child[1]), args.calls, args.syscalls)
        return
    from diffusiond.pipeline.testmodel import make_test_model

    model = make_test_model(Path(tempfile.mkdtemp(prefix="diffusiond-interference-"))).sd
    burns = [float(b) for b in args.burn_ms.split(",")]
    if 0.0 not in burns:
        burns.insert(0, 0.0)
    results: dict[float, list[tuple[float, float]]] = {b: [] for b in burns}
    mode = ["--syscalls"] if args.syscalls else []
    for _ in range(args.processes):
        for burn in burns:
            out = subprocess.run(
                [PY, __file__, "--calls", str(args.calls), *mode, "--child", str(burn), str(model)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.split()
            results[burn].append((float(out[-2]), float(out[-1])))
    print(f"machine: {machine()}")
    burning = "os.stat calls" if args.syscalls else "pure Python"
    print(f"{args.calls} generate() calls per process, {args.processes} processes per burn, alternating")
    print(f"burner: {burning}")
    base = statistics.mean(t for t, _ in results[0.0])
    print("| burner CPU per call, ms | ms per call | against no burn | ms added per burner ms |")
    print("|---|---|---|---|")
    for burn in burns:
        seconds = statistics.mean(t for t, _ in results[burn])
        used = statistics.mean(u for _, u in results[burn])
        cost = f"{(seconds - base) / used:.2f}" if used > 0 else "-"
        print(f"| {used * 1e3:.1f} | {seconds * 1e3:.1f} | {seconds / base:.3f} | {cost} |")


if __name__ == "__main__":
    main()
