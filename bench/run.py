"""Daemon overhead, reaction time and warm-vs-cold, each measured side by side in one run.

    .venv/bin/python bench/run.py [--jobs N] [--quick]

1. Overhead: N txt2img jobs (test model, 64 px, 4 steps) dropped one at a time into a running
   `diffusiond run` subprocess (atomic rename; drop -> manifest), against the same N
   `generate()` calls made directly in this process with the model already loaded.
2. Reaction: drop -> `claimed` event in `<state>/events.jsonl`, by rename and written in place,
   with the inbox watched by inotify and by polling.
3. Warm vs cold: the same N jobs as one-shot `python -c` processes that each import diffusers,
   load the test model, generate one image and save it, against the warm daemon.

The daemon and the direct calls never run at the same time (2-core machines).
Phase timings of the daemon (drop -> claimed -> started -> done) come from its events.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

os.environ["HF_HUB_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
STEPS = 4
SIZE = 64
SETTLE_S = 0.3
POLL_INTERVAL_S = 0.2


# --------------------------------------------------------------------------- helpers


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def p95(xs: list[float]) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, round(0.95 * (len(s) - 1)))]


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return (
        f"CPU {cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"device {device}, Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )


def write_config(root: Path, models: Any, **watch: Any) -> Path:
    """The same knobs as tests/conftest.py's write_config: tiny model, 64 px, 4 steps, small settle."""
    data = {
        "spool": str(root),
        "instance": "bench",
        "state_dir": str(root / "state"),
        "models": {"test": str(models.sd)},
        "defaults": {"all": {"model": "test", "size": f"{SIZE}x{SIZE}", "steps": STEPS}},
        "preload": ["test"],
        "watch": {
            "settle_s": SETTLE_S,
            "pair_wait_s": 2.0,
            "rescan_interval_s": 2.0,
            "poll_interval_s": POLL_INTERVAL_S,
        }
        | watch,
    }
    (root / "inbox").mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def job_text(i: int) -> str:
    return f"prompt: a hamster number {i}\nseed: {1000 + i}\n"


def parse_ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


class Events:
    """Reads `<state>/events.jsonl` incrementally."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pos = 0
        self.items: list[dict[str, Any]] = []

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n")
        if end < 0:
            return
        self.pos += end + 1
        for line in data[: end + 1].splitlines():
            if line.strip():
                self.items.append(json.loads(line))

    def find(self, event: str, **match: Any) -> dict[str, Any] | None:
        for item in self.items:
            if item.get("event") == event and all(item.get(k) == v for k, v in match.items()):
                return item
        return None


class DaemonProc:
    def __init__(self, root: Path, models: Any, **watch: Any) -> None:
        self.root = root
        self.config = write_config(root, models, **watch)
        self.inbox = root / "inbox"
        self.outbox = root / "outbox"
        self.events = Events(root / "state" / "events.jsonl")
        self.log = open(root / "daemon.log", "w")  # noqa: SIM115 (the daemon writes to it until stop())
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [PY, "-m", "diffusiond.daemon.cli", "run", "--config", str(self.config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=os.environ | {"PYTHONUNBUFFERED": "1"},
        )
        while not self.events.find("state", state="ready"):
            if self.proc.poll() is not None:
                raise SystemExit(f"daemon exited: see {root / 'daemon.log'}")
            if time.monotonic() - t0 > 120:
                raise SystemExit("daemon not ready after 120 s")
            time.sleep(0.05)
            self.events.poll()
        self.startup_s = time.monotonic() - t0

    def drop(self, name: str, text: str, *, in_place: bool) -> float:
        """Returns the wall-clock time of the drop (after the rename, or after the in-place write)."""
        target = self.inbox / name
        if in_place:
            with open(target, "w") as f:
                f.write(text)
            return time.time()
        tmp = self.inbox / f".{name}.part"
        tmp.write_text(text)
        os.rename(tmp, target)
        return time.time()

    def run_one(self, stem: str, *, in_place: bool = False, timeout: float = 60) -> dict[str, float]:
        """Drop one job and wait for its manifest. Times in seconds relative to the drop."""
        name = f"{stem}.yaml"
        t_drop = self.drop(name, job_text(hash(stem) % 10000), in_place=in_place)
        m_drop = time.monotonic()
        prefix = f"{stem}-"
        manifest = None
        while manifest is None:
            if time.monotonic() - m_drop > timeout:
                raise SystemExit(f"no manifest for {name} after {timeout} s; see {self.root / 'daemon.log'}")
            for entry in os.listdir(self.outbox):
                if entry.startswith(prefix) and entry.endswith(".json") and not entry.startswith("."):
                    manifest = entry
                    break
            else:
                time.sleep(0.002)
        total = time.monotonic() - m_drop
        # wait for the events of this job (the done event is written after the manifest)
        deadline = time.monotonic() + 10
        job_id = manifest[:-5]
        while True:
            self.events.poll()
            claimed = self.events.find("claimed", source=name)
            started = self.events.find("started", job_id=job_id)
            done = self.events.find("done", job_id=job_id)
            if (claimed and started and done) or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        out = {"total": total}
        if claimed:
            out["claimed"] = parse_ts(claimed["time"]) - t_drop
        if started:
            out["started"] = parse_ts(started["time"]) - t_drop
        if done:
            out["done"] = parse_ts(done["time"]) - t_drop
        try:
            data = json.loads((self.outbox / manifest).read_text())
            timings = data.get("timings") or {}
            for k, v in timings.items():
                if isinstance(v, (int, float)):
                    out[f"m_{k}"] = float(v)
        except (OSError, ValueError):
            pass
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# --------------------------------------------------------------------------- the three measurements


def direct_times(models: Any, n: int) -> tuple[list[float], float]:
    import torch

    from diffusiond.pipeline.catalog import ModelEntry, kind_of_path
    from diffusiond.pipeline.generate import generate
    from diffusiond.pipeline.job import Job, Txt2ImgJob
    from diffusiond.pipeline.models import ModelCache

    t0 = time.monotonic()
    cache = ModelCache(
        {"test": ModelEntry("test", models.sd, kind_of_path(models.sd))}, device="cpu", dtype=torch.float32
    )
    cache.preload(["test"])

    def job(i: int) -> Job:
        spec = Txt2ImgJob(model="test", prompt=f"a hamster number {i}", size=(SIZE, SIZE), steps=STEPS, seed=1000 + i)
        return Job(f"direct-{i}", f"direct-{i}.yaml", 1, spec)

    generate(cache, [(job(-1), None)])  # warm-up, as the daemon gets one
    load_s = time.monotonic() - t0
    times = []
    for i in range(n):
        t = time.perf_counter()
        generate(cache, [(job(i), None)])
        times.append(time.perf_counter() - t)
    return times, load_s


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=None, help="N jobs for overhead and warm/cold (default 20, quick 5)")
    ap.add_argument("--reaction", type=int, default=None, help="drops per reaction case (default 10, quick 4)")
    ap.add_argument("--quick", action="store_true", help="fewer jobs: under a minute")
    args = ap.parse_args()
    n = args.jobs or (5 if args.quick else 20)
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

    # --- direct, in this process (no daemon running)
    direct, direct_load = direct_times(models, n)

    # --- daemon A: inotify
    d = DaemonProc(tmp / "spool-inotify", models, mode="inotify")
    try:
        d.run_one("warmup")
        runs = [d.run_one(f"job{i:03d}") for i in range(n)]
        inplace_inotify = [d.run_one(f"inplace{i:03d}", in_place=True) for i in range(m)]
        startup_a = d.startup_s
    finally:
        d.stop()

    # --- daemon B: poll
    d = DaemonProc(tmp / "spool-poll", models, mode="poll")
    try:
        d.run_one("warmup")
        rename_poll = [d.run_one(f"ren{i:03d}") for i in range(m)]
        inplace_poll = [d.run_one(f"inplace{i:03d}", in_place=True) for i in range(m)]
    finally:
        d.stop()

    # --- cold one-shot processes
    cold = cold_times(models, tmp / "cold", n)

    # ------------------------------------------------------------------ report
    daemon_tot = [r["total"] for r in runs]
    per_job_over = [dt - gt for dt, gt in zip(daemon_tot, direct, strict=True)]
    ratio = sum(daemon_tot) / sum(direct)
    print("1. Overhead: daemon (drop -> manifest, one job at a time) vs direct generate() (model warm)")
    print("| | total s | median per job ms | p95 per job ms |")
    print("|---|---|---|---|")
    print(f"| direct generate() | {sum(direct):.2f} | {median(direct) * 1e3:.0f} | {p95(direct) * 1e3:.0f} |")
    print(f"| daemon | {sum(daemon_tot):.2f} | {median(daemon_tot) * 1e3:.0f} | {p95(daemon_tot) * 1e3:.0f} |")
    print(
        f"daemon/direct = {ratio:.2f} ({(ratio - 1) * 100:+.0f} %); median per-job overhead "
        f"{median(per_job_over) * 1e3:.0f} ms; goal <= 5 %: {'MET' if ratio <= 1.05 else 'NOT MET'}"
    )
    # where it goes (from events.jsonl and the manifests)
    phases = {
        "drop -> claimed (event)": [r["claimed"] for r in runs if "claimed" in r],
        "claimed -> started": [r["started"] - r["claimed"] for r in runs if "started" in r and "claimed" in r],
        "started -> done (event)": [r["done"] - r["started"] for r in runs if "done" in r and "started" in r],
    }
    mkeys = sorted({k for r in runs for k in r if k.startswith("m_")})
    for k in mkeys:
        phases[f"manifest timings.{k[2:]}"] = [r[k] for r in runs if k in r]
    phases["direct generate() call"] = direct
    print("daemon phases, median ms: " + "; ".join(f"{k} {median(v) * 1e3:.0f}" for k, v in phases.items() if v))
    print()

    print("2. Reaction: drop -> claimed (events.jsonl timestamp), daemon idle at each drop")
    print("| watch | arrival | n | median ms | p95 ms | max ms |")
    print("|---|---|---|---|---|---|")
    cases = [
        ("inotify", "rename", [r["claimed"] for r in runs if "claimed" in r]),
        ("inotify", f"in place (settle_s {SETTLE_S})", [r["claimed"] for r in inplace_inotify if "claimed" in r]),
        (f"poll {POLL_INTERVAL_S} s", "rename", [r["claimed"] for r in rename_poll if "claimed" in r]),
        (
            f"poll {POLL_INTERVAL_S} s",
            f"in place (settle_s {SETTLE_S})",
            [r["claimed"] for r in inplace_poll if "claimed" in r],
        ),
    ]
    for watch, arrival, xs in cases:
        print(
            f"| {watch} | {arrival} | {len(xs)} | {median(xs) * 1e3:.0f} | {p95(xs) * 1e3:.0f} | "
            f"{(max(xs) if xs else float('nan')) * 1e3:.0f} |"
        )
    ino = cases[0][2]
    print(
        f"in place minus settle_s (inotify): median {(median(cases[1][2]) - SETTLE_S) * 1e3:.0f} ms; "
        f"goal < 100 ms after a rename with inotify: {'MET' if p95(ino) < 0.1 else 'NOT MET'} "
        f"(median {median(ino) * 1e3:.0f} ms, p95 {p95(ino) * 1e3:.0f} ms)"
    )
    print()

    print("3. Warm vs cold: N one-shot processes (import diffusers, load, generate, save) vs the warm daemon")
    print("| | total s | median per job s |")
    print("|---|---|---|")
    print(f"| cold one-shot python -c | {sum(cold):.1f} | {median(cold):.2f} |")
    print(f"| warm daemon | {sum(daemon_tot):.1f} | {median(daemon_tot):.2f} |")
    print(
        f"cold/warm = {sum(cold) / sum(daemon_tot):.1f}x; daemon startup to ready (not in the warm total) "
        f"{startup_a:.1f} s; direct model load + warm-up {direct_load:.1f} s"
    )
    print()
    print(f"bench wall time {time.monotonic() - t_start:.0f} s; spool and logs in {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
