"""How fast images are stamped (visible label, tiled mark, check, metadata, PNG encode), per worker count.

    python bench/stamp.py [--images 16] [--sizes 512 1024] [--workers 1 2] [--kinds thread process]

Each image goes through `pipeline.provenance.stamp` exactly as the writer runs it (the config's
default marks: the tiled invisible mark with its check, plus a visible label; metadata on; PNG).
Threads run in this process (numpy, SciPy and Pillow release the GIL in their C loops);
processes are a `ProcessPoolExecutor` started before timing. Prints images per second and
the CPU seconds per image, which is what the GPU arithmetic in bench/README.md multiplies.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.watermark_robustness import synth_image
from diffusiond.pipeline.job import OutputSpec, Txt2ImgJob
from diffusiond.pipeline.metadata import MetadataOptions
from diffusiond.pipeline.provenance import Marks, stamp
from diffusiond.pipeline.watermark import InvisibleMark, VisibleMark

MARKS = Marks(VisibleMark(text="AI generated"), InvisibleMark())


def stamp_one(args: tuple[np.ndarray, int]) -> int:
    pixels, number = args
    spec = Txt2ImgJob(prompt="a benchmark", size=(pixels.shape[1], pixels.shape[0]))
    stamped = stamp(
        Image.fromarray(pixels),
        OutputSpec(),
        MARKS,
        parameters="a benchmark\nSteps: 20, Seed: 1",
        record={"job_id": "bench", "seed": number},
        spec=spec,
        options=MetadataOptions(),
        mark_id=number,
    )
    assert stamped.watermark["invisible"]["verified"], stamped.watermark
    return len(stamped.data)


def cpu_s() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def measure(pool: Executor, images: list[np.ndarray]) -> tuple[float, float]:
    list(pool.map(stamp_one, [(images[0], 0)]))  # warm: imports, caches, the workers' first call
    start, cpu_start = time.perf_counter(), cpu_s()
    list(pool.map(stamp_one, [(image, i) for i, image in enumerate(images)]))
    return time.perf_counter() - start, cpu_s() - cpu_start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--kinds", nargs="+", default=["thread", "process"], choices=["thread", "process"])
    args = parser.parse_args(argv)
    print(f"{os.cpu_count()} CPUs; {args.images} images per cell; PNG, tiled mark + visible label + metadata\n")
    print("| size | pool | workers | images/s | wall s | CPU s per image |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        images = [np.asarray(synth_image(seed, size)) for seed in range(args.images)]
        for kind in args.kinds:
            for workers in args.workers:
                make = ThreadPoolExecutor if kind == "thread" else ProcessPoolExecutor
                with make(max_workers=workers) as pool:
                    if kind == "process":
                        list(pool.map(stamp_one, [(images[0], 0)] * workers))
                    wall, cpu = measure(pool, images)
                print(
                    f"| {size}² | {kind} | {workers} | {len(images) / wall:.1f} | {wall:.2f} "
                    f"| {cpu / len(images):.3f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
