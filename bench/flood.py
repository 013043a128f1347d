"""Flood and batching: many job files dropped at once into a running daemon.

    .venv/bin/python bench/flood.py [--files N] [--jobs M] [--section flood|batching|both]

1. Flood: N job files (default 10 000) renamed into the inbox of a `diffusiond run` subprocess as
   fast as one loop can, on a no-op configuration (test model, 8x8 px: the smallest size
   pipeline/job.py accepts, 1 step). Measured from the first rename: all claimed (`claimed`
   events), all validated and started (`started` events; validation, `load_jobs` on the claimed
   copy, has no event of its own: it runs in the claim step, or before `started` in older
   versions), all manifests in the outbox, all inputs in archive/; jobs per second over the lifecycle
   and per tenth of the run (a per-job cost that grows with the backlog shows as falling rates);
   the daemon's VmRSS/VmHWM at ready, every tenth and the end (goal: flat between middle and end);
   the sizes of events.jsonl and status.json.
2. Batching: the same M jobs (test model, 64 px, 4 steps) dropped at once into a daemon with
   `batch_size: 1` and one with `batch_size: B`, drop of the first -> last manifest, and the
   `batch_size` each manifest records (to show the batches really formed).

Event times come from `<state>/events.jsonl`; the times a manifest and an archived input
appeared are their inode change times (set by the daemon's rename), so the bench does not
have to poll 20 000-entry folders. Both are wall clock, like the drop times.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DaemonProc, Events, OtherLoad, batch_sizes, cpu_s, machine, median, parse_ts, stage_and_drop

MIN_SIDE = 8
"""pipeline/job.py `_check_size`: width and height at least 8 and multiples of 8."""
FLAT_MIB = 20.0
FLAT_FRACTION = 0.05
"""Memory counts as flat when end RSS exceeds middle RSS by at most 20 MiB or 5 %, whichever is larger."""
STALL_S = 120.0
"""Give up when no job has been claimed or finished for this long."""
PREFIX = "flood-"


# --------------------------------------------------------------------------- helpers


def memory_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def entries(folder: Path, prefix: str, suffix: str = "") -> list[os.DirEntry[str]]:
    try:
        return [e for e in os.scandir(folder) if e.name.startswith(prefix) and e.name.endswith(suffix)]
    except FileNotFoundError:
        return []


def last_change(found: list[os.DirEntry[str]]) -> float:
    """The latest inode change time: when the daemon renamed the last of these files into place."""
    return max((e.stat().st_ctime for e in found), default=float("nan"))


def size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def kib(n: int) -> str:
    return f"{n / 1024:,.0f} KiB" if n < 10 * 1024 * 1024 else f"{n / 1024 / 1024:,.1f} MiB"


# --------------------------------------------------------------------------- 1. flood


def flood_section(models: Any, root: Path, n: int = 10_000) -> list[str]:
    """Drop N no-op jobs at once and follow them to archive/; returns the report lines."""
    size = f"{MIN_SIDE}x{MIN_SIDE}"
    d = DaemonProc(root, models, extra={"defaults": {"all": {"model": "test", "size": size, "steps": 1}}})
    pid = d.proc.pid
    tail = Events(root / "state" / "events.jsonl", keep=False)
    try:
        d.run_one("warmup")  # the first call's one-time costs stay out of the flood
        tail.poll()
        rss0, hwm0 = memory_mib(pid)
        cpu0, main0 = cpu_s(pid), cpu_s(pid, pid)
        samples = [("ready (after 1 warm-up job)", 0, rss0, hwm0, 0.0)]
        other = OtherLoad((pid,))
        names = [f"{PREFIX}{i:05d}.yaml" for i in range(n)]
        t0, drop_s = stage_and_drop(root, d.inbox, names)

        claimed: list[float] = []
        started: list[float] = []
        done: list[float] = []
        failed: list[dict[str, Any]] = []
        queue_max = 0
        marks = [max(1, round(n * k / 10)) for k in range(1, 11)]
        last_progress = time.monotonic()
        stalled = False
        while len(done) + len(failed) < n:
            before = len(claimed) + len(done)
            for ev in tail.poll():
                kind, source = ev.get("event"), str(ev.get("source", ""))
                if kind == "queue":
                    queue_max = max(queue_max, int(ev.get("length", 0)))
                if not source.startswith(PREFIX):
                    continue
                when = parse_ts(ev["time"]) - t0
                if kind == "claimed":
                    claimed.append(when)
                elif kind == "started":
                    started.append(when)
                elif kind == "done":
                    done.append(when)
                elif kind == "failed":
                    failed.append(ev)
            if marks and len(done) >= marks[0]:
                rss, hwm = memory_mib(pid)
                samples.append((f"{len(done) * 100 // n} % done", len(done), rss, hwm, time.time() - t0))
                marks = [k for k in marks if k > len(done)]
            if len(claimed) + len(done) > before:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > STALL_S:
                stalled = True
                break
            if d.proc.poll() is not None:
                raise SystemExit(f"daemon exited during the flood; see {root / 'daemon.log'}")
            time.sleep(0.2)
        # The inputs are archived after the done event: wait for the last of them.
        deadline = time.monotonic() + 60
        while not stalled and len(entries(root / "archive", PREFIX)) < n - len(failed):
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        rss, hwm = memory_mib(pid)
        samples.append(("end (all archived)", len(done), rss, hwm, time.time() - t0))
        cpu_total, cpu_main = cpu_s(pid) - cpu0, cpu_s(pid, pid) - main0
        other_cores = other.cores()
    finally:
        d.stop()

    manifests = [e for e in entries(d.outbox, PREFIX, ".json") if not e.name.startswith(".")]
    archived = entries(root / "archive", PREFIX)
    failed_files = entries(root / "failed", "")
    left_inbox = [e.name for e in os.scandir(d.inbox) if not e.name.startswith(".")]
    left_work = [e.name for e in os.scandir(root / "work" / "bench") if not e.name.startswith(".")]  # not the lock
    t_manifests = last_change(manifests)
    t_archived = last_change(archived)
    events_bytes = size_of(root / "state" / "events.jsonl")
    events_old = size_of(root / "state" / "events.jsonl.1")
    status_bytes = size_of(root / "state" / "status.json")

    done.sort()
    claimed.sort()
    lines = [
        f"1. Flood: {n} job files renamed into the inbox at once (test model, {size}, 1 step, batch_size 1, "
        f"inotify); times from the first rename",
        f"drop: {n} renames in {drop_s:.2f} s ({n / drop_s:,.0f} files/s)" if drop_s > 0 else f"drop: {n} renames",
    ]
    if stalled:
        lines.append(
            f"STALLED: no claim or result for {STALL_S:.0f} s after {len(claimed)} claims, {len(done)} done; "
            f"see {root / 'daemon.log'}"
        )
    lines += [
        "| milestone | count | s after first rename |",
        "|---|---|---|",
        f"| first claimed | {min(1, len(claimed))} | {min(claimed, default=float('nan')):.2f} |",
        f"| all claimed (`claimed` events) | {len(claimed)} | {max(claimed, default=float('nan')):.2f} |",
        f"| all validated and started (`started` events) | {len(started)} | {max(started, default=float('nan')):.2f} |",
        f"| all manifests in outbox/ | {len(manifests)} | {t_manifests - t0:.2f} |",
        f"| all done (`done` events) | {len(done)} | {max(done, default=float('nan')):.2f} |",
        f"| all inputs in archive/ | {len(archived)} | {t_archived - t0:.2f} |",
    ]
    lifecycle_s = t_archived - t0
    ok = len(archived) == n and not failed_files and not left_inbox and not left_work and not failed
    lines.append(
        f"lifecycle: {n / lifecycle_s:.1f} jobs/s drop -> archived ({lifecycle_s / n * 1e3:.1f} ms per job); "
        f"inbox left {len(left_inbox)}, work/ left {len(left_work)}, archive/ {len(archived)}, "
        f"failed/ {len(failed_files)} files ({len(failed)} failed events): {'OK' if ok else 'NOT OK'}"
    )
    if len(done) >= 10:
        tenths = [done[round(len(done) * k / 10) - 1] if k else 0.0 for k in range(11)]
        rates = [
            (round(len(done) * (k + 1) / 10) - round(len(done) * k / 10)) / max(1e-9, tenths[k + 1] - tenths[k])
            for k in range(10)
        ]
        lines.append("jobs/s per tenth of the run (by `done` events): " + ", ".join(f"{r:.1f}" for r in rates))
        gaps = [b - a for a, b in pairwise(done)]
        tenth = len(gaps) // 10
        lines.append(
            f"between consecutive done events: median {median(gaps) * 1e3:.1f} ms, first tenth "
            f"{median(gaps[:tenth]) * 1e3:.1f} ms, last tenth {median(gaps[-tenth:]) * 1e3:.1f} ms"
        )
    lines.append(
        f"daemon CPU during the flood: {cpu_total:.1f} s in all, main thread (watch, pair, claim loop) "
        f"{cpu_main:.1f} s ({cpu_main / max(cpu_total, 1e-9) * 100:.0f} %); claim queue max {queue_max}; "
        + other.note(other_cores)
    )
    lines += ["", "| point | jobs done | s | VmRSS MiB | VmHWM MiB |", "|---|---|---|---|---|"]
    lines += [f"| {label} | {k} | {t:.1f} | {r:.1f} | {h:.1f} |" for label, k, r, h, t in samples]
    middle = next((s for s in samples if s[1] >= n // 2), None)
    end = samples[-1]
    if middle is not None and len(done) == n:
        growth = end[2] - middle[2]
        allowed = max(FLAT_MIB, FLAT_FRACTION * middle[2])
        lines.append(
            f"end RSS / middle RSS = {end[2] / middle[2]:.3f} ({growth:+.1f} MiB from {middle[1]} to {end[1]} jobs); "
            f"goal flat (<= {allowed:.0f} MiB: max of {FLAT_MIB:.0f} MiB and {FLAT_FRACTION:.0%}): "
            f"{'flat' if growth <= allowed else 'GROWS'}; start -> end {end[2] - samples[0][2]:+.1f} MiB"
        )
    lines.append(
        f"state files at the end: events.jsonl {kib(events_bytes)}"
        + (f" + events.jsonl.1 {kib(events_old)} (rotated {tail.rotations}x at 8 MiB)" if events_old else "")
        + f", {(events_bytes + events_old) / max(1, n) / 1024:.2f} KiB per job; status.json {kib(status_bytes)}"
    )
    return lines


# --------------------------------------------------------------------------- 2. batching


def batching_section(models: Any, root: Path, m: int = 16, batch_size: int = 4, batch_wait_s: float = 0.1) -> list[str]:
    """The same M jobs (64 px, 4 steps) through `batch_size: 1` and `batch_size: B`; returns the report lines."""
    results: dict[int, tuple[float, Counter[int], float]] = {}
    for bs in (1, batch_size):
        d = DaemonProc(root / f"batch{bs}", models, extra={"batch_size": bs, "batch_wait_s": batch_wait_s})
        try:
            # Warm-up with one full batch, so the first batched call's one-time costs stay out.
            d.run_stream([f"warm{i}" for i in range(bs)], timeout=120)
            other = OtherLoad((d.proc.pid,))
            total, found = d.run_stream([f"batch{i:03d}" for i in range(m)], timeout=60 + 10 * m)
            cores = other.cores()
            sizes = batch_sizes(found)
        finally:
            d.stop()
        results[bs] = (total, sizes, cores)
    off, on = results[1][0], results[batch_size][0]
    lines = [
        f"2. Batching: {m} jobs (test model, 64x64, 4 steps) renamed into the inbox at once; "
        f"drop of the first -> last manifest (batch_wait_s {batch_wait_s:g})",
        "| batch_size | total s | per job ms | manifests by batch_size | other processes, cores |",
        "|---|---|---|---|---|",
    ]
    for bs, (total, sizes, cores) in results.items():
        recorded = ", ".join(f"{k}: {v}" for k, v in sorted(sizes.items()))
        lines.append(f"| {bs} | {total:.2f} | {total / m * 1e3:.0f} | {recorded} | {cores:.2f} |")
    batched = sum(v for k, v in results[batch_size][1].items() if k > 1)
    lines.append(
        f"off/on = {off / on:.2f}x ({(1 - on / off) * 100:+.0f} % time saved with batch_size {batch_size}); "
        f"{batched} of {m} jobs ran in a shared call; " + other.note(max(c for _, _, c in results.values()))
    )
    return lines


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=10_000, help="job files in the flood (default 10 000)")
    ap.add_argument("--jobs", type=int, default=16, help="jobs in the batching comparison (default 16)")
    ap.add_argument("--batch-size", type=int, default=4, help="batch_size compared with 1 (default 4)")
    ap.add_argument("--section", choices=("flood", "batching", "both"), default="both")
    args = ap.parse_args()
    t_start = time.monotonic()

    from diffusiond.pipeline.testmodel import make_test_model

    tmp = Path(tempfile.mkdtemp(prefix="diffusiond-flood-"))
    models = make_test_model(tmp / "models")
    print(f"diffusiond flood bench, N={args.files}, M={args.jobs}")
    print(f"machine: {machine()}")
    print()
    if args.section in ("flood", "both"):
        print("\n".join(flood_section(models, tmp / "flood", args.files)))
        print()
    if args.section in ("batching", "both"):
        print("\n".join(batching_section(models, tmp, args.jobs, args.batch_size)))
        print()
    print(f"bench wall time {time.monotonic() - t_start:.0f} s; spool and logs in {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
