"""Why only the daemon's worker thread may run torch: one parallel op elsewhere slows CPU generation.

    .venv/bin/python bench/torch_threads.py

Each case runs in a fresh process (the effect lasts for the process): load the test model and
time 40 `generate()` calls (64 px, 4 steps) on a worker thread, after
  1. nothing else: the daemon's case (the main thread loads, only the worker runs torch);
  2. one parallel torch op (a 1000x1000 sum) on the main thread first.
With two OS threads that have each run a parallel region, libgomp manages more threads than
there are CPUs and stops spinning between regions, so every region pays a futex wake-up.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"


def case(mode: str, models_dir: Path) -> float:
    """Median ms per generate() call on a worker thread, in this process."""
    import torch

    from diffusiond.pipeline.catalog import ModelEntry, kind_of_path
    from diffusiond.pipeline.generate import generate
    from diffusiond.pipeline.job import Job, Txt2ImgJob
    from diffusiond.pipeline.models import ModelCache
    from diffusiond.pipeline.testmodel import make_test_model

    models = make_test_model(models_dir)
    entry = ModelEntry("test", models.sd, kind_of_path(models.sd))
    cache = ModelCache({"test": entry}, device="cpu", dtype=torch.float32)
    cache.preload(["test"])
    if mode == "op-on-main":
        torch.ones(1000, 1000).sum()
    times: list[float] = []

    def work() -> None:
        for i in range(40):
            spec = Txt2ImgJob(model="test", prompt=f"a hamster {i}", size=(64, 64), steps=4, seed=i)
            started = time.perf_counter()
            generate(cache, [(Job(f"t{i}", "t.yaml", 1, spec), None)])
            times.append(time.perf_counter() - started)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    return statistics.median(times[3:]) * 1e3


def main() -> None:
    if len(sys.argv) == 3:  # one case, in a child process
        print(case(sys.argv[1], Path(sys.argv[2])))
        return
    models_dir = Path(tempfile.mkdtemp(prefix="diffusiond-torch-threads-")) / "models"
    results = {}
    for mode in ("worker-only", "op-on-main", "worker-only", "op-on-main"):
        out = subprocess.run([sys.executable, __file__, mode, str(models_dir)], capture_output=True, text=True)
        results.setdefault(mode, []).append(float(out.stdout.split()[-1]))
    alone, after_op = (statistics.median(results[m]) for m in ("worker-only", "op-on-main"))
    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} cores, test model 64 px, 4 steps, 2 processes each")
    print(f"| case | ms per generate() on a worker thread |\n|---|---|\n| only the worker runs torch | {alone:.1f} |")
    print(f"| one parallel op on the main thread first | {after_op:.1f} |")
    print(f"slowdown {after_op / alone:.2f}x")


if __name__ == "__main__":
    main()
