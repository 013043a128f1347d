"""Why only the daemon's worker thread may run torch: torch on a second thread slows CPU generation.

    .venv/bin/python bench/torch_threads.py [--processes 2] [--sd15 FILE]

Each case runs in fresh processes (the effect lasts for the process), alternating, and times
`generate()` calls on a worker thread, as the daemon makes them:
  test model (64 px, 4 steps, 40 calls): only the worker runs torch, against one parallel torch
  op (a 1000x1000 sum) on the main thread first;
  with `--sd15 FILE` (128 px, 2 steps, 4 calls; bench/sd15.py makes the file): the model loaded
  on the worker thread, against loaded on the main thread (what the daemon did before it
  preloaded on the worker: loading a single file runs parallel ops).
Once two OS threads have each run a parallel region, libgomp manages more threads than there
are CPUs and stops spinning between regions, so every region pays a futex wake-up.
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

CASES = {
    "test": ("only the worker runs torch", "one parallel op on the main thread first"),
    "sd15": ("the model loaded on the worker thread", "the model loaded on the main thread"),
}


def case(model: str, on_main: bool, where: Path) -> float:
    """Median seconds per generate() call on a worker thread, in this process."""
    import torch

    from diffusiond.pipeline.families import ModelEntry, kind_of_path
    from diffusiond.pipeline.generate import DiffusersGenerator
    from diffusiond.pipeline.job import Job, Txt2ImgJob
    from diffusiond.pipeline.models import ModelCache
    from diffusiond.pipeline.testmodel import make_test_model

    path = make_test_model(where).sd if model == "test" else where
    size, steps, calls = (64, 4, 40) if model == "test" else (128, 2, 4)
    entry = ModelEntry("m", path, kind_of_path(path))
    cache = ModelCache({"m": entry}, device="cpu", dtype=torch.float32, state_dir=Path(tempfile.mkdtemp()))

    def load() -> None:
        cache.preload(["m"])

    if model == "test":
        load()
        if on_main:
            torch.ones(1000, 1000).sum()
    elif on_main:
        load()
    times: list[float] = []

    def work() -> None:
        if model == "sd15" and not on_main:
            load()
        for i in range(calls):
            spec = Txt2ImgJob(model="m", prompt=f"a hamster {i}", size=(size, size), steps=steps, seed=i)
            started = time.perf_counter()
            DiffusersGenerator(cache).generate([Job(f"t{i}", "t.yaml", 1, spec)])
            times.append(time.perf_counter() - started)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    return statistics.median(times[1:])


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--case":  # one case, in a child process
        print(case(sys.argv[2], sys.argv[3] == "main", Path(sys.argv[4])))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2, help="fresh processes per case (default 2)")
    parser.add_argument("--sd15", type=Path, help="also the SD 1.5-architecture file (bench/sd15.py makes it)")
    args = parser.parse_args()
    import torch

    models_dir = Path(tempfile.mkdtemp(prefix="diffusiond-torch-threads-")) / "models"
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, {args.processes} fresh processes per case, alternating")
    print("| model | case | per generate() call, each process | median |\n|---|---|---|---|")
    runs = [("test", models_dir)] + ([("sd15", args.sd15.resolve())] if args.sd15 else [])
    for model, where in runs:
        results: dict[str, list[float]] = {"worker": [], "main": []}
        for _ in range(args.processes):
            for side in results:
                command = [sys.executable, __file__, "--case", model, side, str(where)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(done.stderr[-3000:])
                results[side].append(float(done.stdout.split()[-1]))
        unit, scale = ("ms", 1e3) if model == "test" else ("s", 1.0)
        for side, label in zip(results, CASES[model], strict=True):
            each = ", ".join(f"{t * scale:.{0 if unit == 'ms' else 2}f}" for t in results[side])
            print(f"| {model} | {label} | {each} {unit} | {statistics.median(results[side]) * scale:.2f} {unit} |")
        ratio = statistics.median(results["main"]) / statistics.median(results["worker"])
        print(f"| {model} | slowdown | | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
