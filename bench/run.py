"""diffusiond's benchmark: every figure a ratio of two things measured side by side in this run.

    .venv/bin/python bench/run.py [--quick] [--jobs N] [--flood N] [--no-sd15] [--compile]

On the tiny test model (64 px, 4 steps), with a real `diffusiond run` subprocess on a temp spool:
1. Overhead: rounds of N jobs, direct `generate()` calls in this process (model warm) against the
   same N jobs dropped at once into the daemon (first drop -> last manifest); one-at-a-time latency.
2. Reaction: drop -> `claimed` event, by rename and written in place, inotify and polling.
3. Warm vs cold: N one-shot `python -c` processes (import, load, generate, save) against the daemon;
   3b. the same on the SD 1.5 architecture (random weights, one LDM .safetensors made here, 2.1 GB).
4. Flood (bench/flood.py): 10,000 job files at once: claim/validate time, jobs/s, RSS over the run.
5. Batching: batch_size 4 against 1 on the test model (on GPU also SD 1.5 at 512², in 6).
6. GPU (bench/sd15.py, only with CUDA): plain diffusers against diffusiond's settings at 512², fp16.
7. CPU: fp32 against bf16 and channels_last, SD 1.5 UNet step at 128 px.

The daemon and the direct calls never run at the same time (2-core machines). `--quick` takes
about 4 minutes (flood of 1,000), the full run about 15.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    POLL_INTERVAL_S,
    PY,
    SETTLE_S,
    SIZE,
    STEPS,
    DaemonProc,
    cpu_by_thread_name,
    cpu_since,
    machine,
    median,
    p95,
)
from flood import batching_section, flood_section
from sd15 import cpu_precision, file_section, gpu_section, warm_cold_sd15

# --------------------------------------------------------------------------- the three measurements


BIG = 256
"""The bigger size of the overhead figure: the daemon's cost per job stays, the job's grows."""


class Direct:
    """The same jobs as plain `generate()` calls in this process, with the model loaded once."""

    def __init__(self, models: Any) -> None:
        import torch

        from diffusiond.pipeline.families import ModelEntry, kind_of_path
        from diffusiond.pipeline.models import ModelCache

        t0 = time.monotonic()
        self.cache = ModelCache(
            {"test": ModelEntry("test", models.sd, kind_of_path(models.sd))}, device="cpu", dtype=torch.float32
        )
        self.cache.preload(["test"])
        self.run(1)  # warm-up, as the daemon gets one
        self.load_s = time.monotonic() - t0

    def run(self, n: int, size: int = SIZE) -> list[float]:
        from diffusiond.pipeline.generate import DiffusersGenerator
        from diffusiond.pipeline.job import Job, Txt2ImgJob

        generator = DiffusersGenerator(self.cache)
        times = []
        for i in range(n):
            spec = Txt2ImgJob(model="test", prompt=f"a hamster number {i}", size=(size, size), steps=STEPS, seed=i)
            t = time.perf_counter()
            generator.generate([Job(f"direct-{i}", f"direct-{i}.yaml", 1, spec)])
            times.append(time.perf_counter() - t)
        return times


COLD_SCRIPT = """
import sys, torch
from diffusers import StableDiffusionPipeline
p = StableDiffusionPipeline.from_pretrained(sys.argv[1], safety_checker=None, requires_safety_checker=False,
                                            local_files_only=True)
p.set_progress_bar_config(disable=True)
g = torch.Generator("cpu").manual_seed(int(sys.argv[3]))
image = p(sys.argv[4], height=64, width=64, num_inference_steps=4, guidance_scale=7.5, generator=g).images[0]
image.save(sys.argv[2])
"""


def cold_times(models: Any, out: Path, n: int) -> list[float]:
    out.mkdir(parents=True, exist_ok=True)
    times = []
    for i in range(n):
        t = time.monotonic()
        subprocess.run(
            [PY, "-c", COLD_SCRIPT, str(models.sd), str(out / f"cold-{i}.png"), str(1000 + i), f"a hamster number {i}"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=os.environ | {"TRANSFORMERS_VERBOSITY": "error"},
        )
        times.append(time.monotonic() - t)
    return times


Drops = list[dict[str, float]]
"""`DaemonProc.run_one` results: seconds from the drop to each event, and the manifest's timings."""


@dataclass
class InotifyRun:
    """What daemon A (inotify) and the direct calls measured, in alternating rounds."""

    direct: list[float] = field(default_factory=list)
    direct_cpu: float = 0.0
    streams: list[float] = field(default_factory=list)
    threads: Counter[str] = field(default_factory=Counter)
    generate_s: list[float] = field(default_factory=list)
    direct_big: list[float] = field(default_factory=list)
    streams_big: list[float] = field(default_factory=list)
    streams_marked: list[float] = field(default_factory=list)
    runs: Drops = field(default_factory=list)
    inplace: Drops = field(default_factory=list)
    startup_s: float = 0.0
    direct_load_s: float = 0.0


def measure_inotify(models: Any, tmp: Path, n: int, rounds: int, m: int) -> InotifyRun:
    """Direct calls in this process and the daemon, in alternating rounds (never at the same time)."""
    direct_proc = Direct(models)
    out = InotifyRun()
    d = DaemonProc(tmp / "spool-inotify", models, mode="inotify")
    try:
        d.run_one("warmup")
        for r in range(rounds):
            cpu0 = time.process_time()
            out.direct += direct_proc.run(n)
            out.direct_cpu += time.process_time() - cpu0
            before = cpu_by_thread_name(d.proc.pid)
            seconds, manifests = d.run_stream([f"r{r}s{i:04d}" for i in range(n)])
            out.streams.append(seconds)
            out.threads.update(cpu_since(d.proc.pid, before))
            out.generate_s += [json.loads(m.read_text())["timings"]["generate_s"] for m in manifests]
        for r in range(rounds):
            out.direct_big += direct_proc.run(n, size=BIG)
            unmarked = f"size: {BIG}x{BIG}\nwatermark: {{invisible: false}}\n"
            out.streams_big.append(d.run_stream([f"r{r}b{i:04d}" for i in range(n)], extra=unmarked)[0])
            marked = f"size: {BIG}x{BIG}\n"
            out.streams_marked.append(d.run_stream([f"r{r}m{i:04d}" for i in range(n)], extra=marked)[0])
        out.runs = [d.run_one(f"job{i:03d}") for i in range(n)]
        out.inplace = [d.run_one(f"inplace{i:03d}", in_place=True) for i in range(m)]
        out.startup_s = d.startup_s
    finally:
        d.stop()
    out.direct_load_s = direct_proc.load_s
    return out


def measure_poll(models: Any, tmp: Path, m: int) -> tuple[Drops, Drops]:
    """Daemon B, polling: drops by rename and written in place."""
    d = DaemonProc(tmp / "spool-poll", models, mode="poll")
    try:
        d.run_one("warmup")
        rename_poll = [d.run_one(f"ren{i:03d}") for i in range(m)]
        inplace_poll = [d.run_one(f"inplace{i:03d}", in_place=True) for i in range(m)]
    finally:
        d.stop()
    return rename_poll, inplace_poll


def overhead_lines(r: InotifyRun, n: int, rounds: int) -> list[str]:
    """Section 1: the daemon against direct generate() calls, and where its time and CPU go."""
    direct, streams, runs = r.direct, r.streams, r.runs
    daemon_tot = [run["total"] for run in runs]
    ratio = sum(streams) / sum(direct)
    per_direct = sum(direct) / len(direct) * 1e3
    one_ratio = median(daemon_tot) / median(direct)
    lines = [
        f"1. Overhead: {rounds} rounds of N={n} jobs: direct generate() calls (model warm) vs the same jobs "
        "through the daemon",
        "| | jobs | total s | per job ms | / direct |",
        "|---|---|---|---|---|",
        f"| direct generate(), back to back | {len(direct)} | {sum(direct):.2f} | {per_direct:.1f} | 1.00 |",
        f"| daemon, stream (all N dropped at once; first drop -> last manifest) | {n * rounds} | {sum(streams):.2f} | "
        f"{sum(streams) / (n * rounds) * 1e3:.1f} | {ratio:.3f} |",
        f"| daemon, one at a time (drop, wait for the manifest; median) | {n} | {sum(daemon_tot):.2f} | "
        f"{median(daemon_tot) * 1e3:.1f} | {one_ratio:.3f} |",
        f"daemon stream/direct = {ratio:.3f} ({(ratio - 1) * 100:+.1f} %); goal <= 5 %: "
        f"{'MET' if ratio <= 1.05 else 'NOT MET'}; per round: "
        + ", ".join(f"{st / sum(direct[i * n : (i + 1) * n]):.3f}" for i, st in enumerate(streams)),
    ]
    jobs = n * rounds
    roles = {
        "worker": "worker (generation; torch's OpenMP threads inherit the name)",
        "diffusiond": "diffusiond (main loop: events, pairing, claim, validation)",
        "writer": "writer (stamp, PNG, manifest, archive, report)",
        "watch": "watch (watchdog's threads)",
    }
    threads = r.threads
    lines.append(
        "where the CPU went during the streams, ms per job (/proc/<pid>/task/*/comm): "
        + "; ".join(f"{roles[k]} {threads.get(k, 0.0) / jobs * 1e3:.1f}" for k in roles)
        + f"; other daemon threads {sum(v for k, v in threads.items() if k not in roles) / jobs * 1e3:.1f}"
        + f"; direct generate() (this process) {r.direct_cpu / len(direct) * 1e3:.1f}"
    )
    own = sum(threads.get(k, 0.0) for k in ("diffusiond", "writer", "watch")) / jobs * 1e3
    lines.append(
        f"the daemon's own threads used {own:.1f} ms of CPU per job; generation itself took "
        f"{median(r.generate_s) * 1e3:.1f} ms in the daemon (manifests' timings.generate_s, median) against "
        f"{median(direct) * 1e3:.1f} ms direct: on {os.cpu_count()} cores, work beside generation slows it"
    )
    big_ratio = sum(r.streams_big) / sum(r.direct_big)
    lines += [
        f"| direct generate() at {BIG}x{BIG} | {len(r.direct_big)} | {sum(r.direct_big):.2f} | "
        f"{sum(r.direct_big) / len(r.direct_big) * 1e3:.1f} | 1.00 |",
        f"| daemon, stream at {BIG}x{BIG}, job says `watermark: {{invisible: false}}` | {n * rounds} | "
        f"{sum(r.streams_big):.2f} | {sum(r.streams_big) / (n * rounds) * 1e3:.1f} | {big_ratio:.3f} |",
        f"| daemon, stream at {BIG}x{BIG} with the default invisible mark (tiled, checked in the file) | "
        f"{n * rounds} | {sum(r.streams_marked):.2f} | {sum(r.streams_marked) / (n * rounds) * 1e3:.1f} | "
        f"{sum(r.streams_marked) / sum(r.direct_big):.3f} |",
        f"one job at a time the daemon adds {(median(daemon_tot) - median(direct)) * 1e3:.0f} ms per job "
        f"(latency: nothing to overlap with); at {BIG}x{BIG} the stream adds {(big_ratio - 1) * 100:+.1f} %: "
        f"{'MET' if big_ratio <= 1.05 else 'NOT MET'} for <= 5 %",
    ]
    # where it goes (from events.jsonl and the manifests)
    phases = {
        "drop -> claimed (event)": [run["claimed"] for run in runs if "claimed" in run],
        "claimed -> started": [
            run["started"] - run["claimed"] for run in runs if "started" in run and "claimed" in run
        ],
        "started -> done (event)": [run["done"] - run["started"] for run in runs if "done" in run and "started" in run],
    }
    for k in sorted({k for run in runs for k in run if k.startswith("m_")}):
        phases[f"manifest timings.{k[2:]}"] = [run[k] for run in runs if k in run]
    phases["direct generate() call"] = direct
    lines.append("daemon phases, median ms: " + "; ".join(f"{k} {median(v) * 1e3:.0f}" for k, v in phases.items() if v))
    return lines


def reaction_lines(
    r: InotifyRun, rename_poll: list[dict[str, float]], inplace_poll: list[dict[str, float]]
) -> list[str]:
    """Section 2: drop -> claimed, by rename and in place, inotify and polling."""
    lines = [
        "2. Reaction: drop -> claimed (events.jsonl timestamp), daemon idle at each drop",
        "| watch | arrival | n | median ms | p95 ms | max ms |",
        "|---|---|---|---|---|---|",
    ]
    cases = [
        ("inotify", "rename", [run["claimed"] for run in r.runs if "claimed" in run]),
        ("inotify", f"in place (settle_s {SETTLE_S})", [run["claimed"] for run in r.inplace if "claimed" in run]),
        (f"poll {POLL_INTERVAL_S} s", "rename", [run["claimed"] for run in rename_poll if "claimed" in run]),
        (
            f"poll {POLL_INTERVAL_S} s",
            f"in place (settle_s {SETTLE_S})",
            [run["claimed"] for run in inplace_poll if "claimed" in run],
        ),
    ]
    for watch, arrival, xs in cases:
        lines.append(
            f"| {watch} | {arrival} | {len(xs)} | {median(xs) * 1e3:.0f} | {p95(xs) * 1e3:.0f} | "
            f"{(max(xs) if xs else float('nan')) * 1e3:.0f} |"
        )
    ino = cases[0][2]
    lines.append(
        f"in place minus settle_s (inotify): median {(median(cases[1][2]) - SETTLE_S) * 1e3:.0f} ms; "
        f"goal < 100 ms after a rename with inotify: {'MET' if p95(ino) < 0.1 else 'NOT MET'} "
        f"(median {median(ino) * 1e3:.0f} ms, p95 {p95(ino) * 1e3:.0f} ms)"
    )
    return lines


def warm_cold_lines(r: InotifyRun, cold: list[float]) -> list[str]:
    """Section 3: one-shot processes against the warm daemon."""
    daemon_tot = [run["total"] for run in r.runs]
    return [
        "3. Warm vs cold: N one-shot processes (import diffusers, load, generate, save) vs the warm daemon",
        "| | total s | median per job s |",
        "|---|---|---|",
        f"| cold one-shot python -c | {sum(cold):.1f} | {median(cold):.2f} |",
        f"| warm daemon | {sum(daemon_tot):.1f} | {median(daemon_tot):.2f} |",
        f"cold/warm = {sum(cold) / sum(daemon_tot):.1f}x; daemon startup to ready (not in the warm total) "
        f"{r.startup_s:.1f} s; direct model load + warm-up {r.direct_load_s:.1f} s",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=None, help="N jobs for overhead and warm/cold (default 20, quick 5)")
    ap.add_argument("--reaction", type=int, default=None, help="drops per reaction case (default 10, quick 4)")
    ap.add_argument("--quick", action="store_true", help="fewer jobs and a flood of 1,000: about 4 minutes")
    ap.add_argument("--flood", type=int, default=None, help="job files in the flood (default 10,000, quick 1,000)")
    ap.add_argument("--no-sd15", action="store_true", help="skip the SD 1.5-architecture sections (2.1 GB file)")
    ap.add_argument(
        "--sd15-folder",
        type=Path,
        default=Path(tempfile.gettempdir()) / "diffusiond-bench-sd15",
        help="where the random SD 1.5 checkpoint is kept between runs (default: %(default)s)",
    )
    ap.add_argument("--compile", action="store_true", help="GPU: also torch.compile the UNet (warm-up reported)")
    args = ap.parse_args()
    n = args.jobs or (5 if args.quick else 20)
    rounds = 2 if args.quick else 3
    flood_n = args.flood or (1000 if args.quick else 10_000)
    m = args.reaction or (4 if args.quick else 10)
    t_start = time.monotonic()

    from diffusiond.pipeline.testmodel import make_test_model

    tmp = Path(tempfile.mkdtemp(prefix="diffusiond-bench-"))
    models = make_test_model(tmp / "models")
    print(f"diffusiond bench, {datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"machine: {machine()}")
    print(
        f"jobs: txt2img, test model, {SIZE}x{SIZE}, {STEPS} steps; N={n}, reaction drops per case={m}; "
        f"settle_s={SETTLE_S}, poll_interval_s={POLL_INTERVAL_S}"
    )
    print()

    # The measurements first (the daemons and the direct calls one after the other), then the report.
    inotify = measure_inotify(models, tmp, n, rounds, m)
    rename_poll, inplace_poll = measure_poll(models, tmp, m)
    cold = cold_times(models, tmp / "cold", n)
    for lines in (
        overhead_lines(inotify, n, rounds),
        reaction_lines(inotify, rename_poll, inplace_poll),
        warm_cold_lines(inotify, cold),
    ):
        print("\n".join(lines))
        print()

    def section(number: str, run: Callable[[], list[str]]) -> None:
        """Print a section of flood.py / sd15.py under this bench's numbering, with its wall time."""
        started = time.monotonic()
        lines = run()
        print("\n".join([re.sub(r"^\d+[a-z]?\. ", f"{number}. ", lines[0]), *lines[1:]]))
        print(f"(section {number}: {time.monotonic() - started:.0f} s)")
        print()

    if not args.no_sd15:
        path: Path | None = None

        def make_file() -> list[str]:
            nonlocal path
            path, lines = file_section(args.sd15_folder)
            return lines

        section("3b", make_file)
        section("3c", lambda: warm_cold_sd15(path, tmp / "sd15", n=3, size=128, steps=2))
    section("4", lambda: flood_section(models, tmp / "flood", flood_n))
    section("5", lambda: batching_section(models, tmp / "batching"))
    if not args.no_sd15:
        section("6", lambda: gpu_section(path, tmp / "gpu", compile_unet=args.compile))
        section("7", lambda: cpu_precision(path, 128))
    print(f"bench wall time {time.monotonic() - t_start:.0f} s; spool and logs in {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
