"""What `threads:` (torch's CPU threads for generation) buys: 1, 2, ... threads, idle and beside a busy CPU.

    .venv/bin/python bench/threads.py [--threads 1,2] [--calls 20] [--rounds 2]

Each case runs in fresh processes, alternating, timing `generate()` calls on a worker thread as
the daemon makes them (test model, 64 px, 4 steps, the model loaded on that thread, torch's
threads set there as daemon/worker.py does). "busy" runs one process beside it that keeps one CPU
busy (what the writer's stamping, a second daemon or any other service does to a small machine).
The ratio is each case's median call against 1 thread in the same run and the same load.
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

os.environ["HF_HUB_OFFLINE"] = "1"
BURN = "import time\nwhile True:\n    sum(range(10000))\n"


def child(threads: int, calls: int, models: Path) -> None:
    """One process: load the test model on a worker thread, then time `calls` generations there."""
    import torch

    from diffusiond.daemon.threads import set_torch_threads
    from diffusiond.pipeline.backend import Job
    from diffusiond.pipeline.families import ModelEntry, ModelKind
    from diffusiond.pipeline.generate import DiffusersGenerator
    from diffusiond.pipeline.job import Txt2ImgJob
    from diffusiond.pipeline.models import ModelCache

    times: list[float] = []

    def work() -> None:
        set_torch_threads(threads)  # torch is imported above: this sets it
        cache = ModelCache(
            {"test": ModelEntry("test", models / "sd", ModelKind.SD1)}, device="cpu", dtype=torch.float32
        )
        generator = DiffusersGenerator(cache)
        spec = Txt2ImgJob(model="test", prompt="a lighthouse", size=(64, 64), steps=4, seed=1)
        generator.generate([Job("warm", "w.yaml", 1, spec)])
        for n in range(calls):
            started = time.perf_counter()
            generator.generate([Job(f"j{n}", "j.yaml", 1, spec)])
            times.append(time.perf_counter() - started)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    print(statistics.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(int(args.child[0]), args.calls, Path(args.child[1]))
        return
    counts = [int(n) for n in args.threads.split(",")]
    with tempfile.TemporaryDirectory() as scratch:
        models = Path(scratch) / "models"
        from diffusiond.pipeline.testmodel import make_test_model

        make_test_model(models)
        results: dict[tuple[str, int], list[float]] = {}
        for load in ("idle", "busy"):
            for _ in range(args.rounds):
                for threads in counts:
                    burner = subprocess.Popen([sys.executable, "-c", BURN]) if load == "busy" else None
                    try:
                        out = subprocess.run(
                            [
                                sys.executable,
                                __file__,
                                "--calls",
                                str(args.calls),
                                "--child",
                                str(threads),
                                str(models),
                            ],
                            capture_output=True,
                            text=True,
                            check=True,
                        ).stdout
                    finally:
                        if burner is not None:
                            burner.kill()
                            burner.wait()
                    results.setdefault((load, threads), []).append(float(out.split()[-1]))
    print(f"CPUs: {len(os.sched_getaffinity(0))}; median generate() call, test model 64 px 4 steps")
    for load in ("idle", "busy"):
        base = statistics.median(results[(load, counts[0])])
        for threads in counts:
            median = statistics.median(results[(load, threads)])
            print(f"  {load:4}  threads {threads}: {median * 1000:7.1f} ms  ({median / base:.2f}x of {counts[0]})")


if __name__ == "__main__":
    main()
