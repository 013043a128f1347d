"""Several daemons on one spool: jobs/s with 1 and 2 Ray slots, Ray's added drop -> claimed latency,
and what one daemon asks of the file server (the inputs of bench/README.md's 100-GPU estimate).

    .venv/bin/python bench/cluster.py [--jobs N] [--step-s S] [--serial M] [--backlog B] [--real]
                                      [--section throughput|latency|spool|all]

Needs the `cluster` extra (`pip install -e '.[cluster]'`) and, for the spool section, strace.

1. Throughput: a local Ray cluster on 127.0.0.1 (`ray.cluster_utils.Cluster`: a head without a GPU
   and two nodes with one logical GPU each), the slots of `diffusiond cluster` (`Driver`) on the
   stand-in generator (`--step-s` seconds a step, 4 steps: a sleep, as a GPU's wait is to the CPU),
   N jobs renamed into the inbox at once; first drop -> last manifest with `cluster.slots` 1 and 2,
   beside one plain `diffusiond run` process on the same generator. `--real`: the same with the
   test model through real diffusers (64 px, 4 steps, one torch thread per slot).
2. Latency: M jobs one at a time (the next dropped when the last manifest is out), drop -> claimed
   (the `claimed` event) for a slot, a plain daemon polling the inbox as the slot does (same
   `poll_interval_s`, `settle_s`), and a plain daemon on inotify. The difference between the first
   two is what Ray adds: jobs never travel through Ray, so it should be noise.
3. Spool: the file-system calls one plain daemon makes on the spool (strace -f -y, counted by
   path), (a) per job, over N jobs dropped at once, and (b) per second while it is busy with a held
   job and B files wait in the inbox: the polling a busy cluster's every slot does.

Times are wall clock: drop times after the rename, event times from each daemon's events.jsonl,
manifest times their inode change time (the daemon's rename).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

# Before Ray is imported (it reads it once): keep every node on 127.0.0.1 (tests/test_cluster.py).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["PYTHONWARNINGS"] = "ignore::DeprecationWarning"

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    POLL_INTERVAL_S,
    ROOT,
    SETTLE_S,
    STEPS,
    DaemonProc,
    Events,
    OtherLoad,
    job_text,
    machine,
    manifest_time,
    median,
    p95,
    parse_ts,
    stage_and_drop,
    write_config,
)

os.environ["PYTHONPATH"] = str(ROOT)  # the plain daemons run `python -m tests.standin_daemon`
STALL_S = 300.0
FAST_HEALTH = {
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 4,
}


# --------------------------------------------------------------------------- helpers

STARTED: list[subprocess.Popen[Any]] = []
"""Every daemon and strace the bench starts: killed at exit if a section failed and left them running."""


@atexit.register
def _kill_leftovers() -> None:
    for proc in STARTED:
        if proc.poll() is None:
            proc.kill()


def start_daemon(root: Path, models: Any, extra: dict[str, Any] | None = None, **kwargs: Any) -> DaemonProc:
    proc = DaemonProc(root, models, extra, **kwargs)
    STARTED.append(proc.proc)
    return proc


def standin_entry(step_s: float, hold: Path | None = None) -> list[str]:
    settings: dict[str, Any] = {"step_s": step_s}
    if hold is not None:
        settings["hold"] = {"prompt": "held", "folder": str(hold)}
    return ["-m", "tests.standin_daemon", json.dumps(settings)]


def drop_all(inbox: Path, count: int, prefix: str = "job") -> float:
    """`count` job files staged beside the inbox and renamed in; the wall time of the first rename."""
    return stage_and_drop(inbox.parent, inbox, [f"{prefix}{i:04d}.yaml" for i in range(count)])[0]


def manifests(outbox: Path) -> list[Path]:
    try:
        return [outbox / e for e in os.listdir(outbox) if e.endswith(".json") and not e.startswith(".")]
    except FileNotFoundError:
        return []


def wait_manifests(outbox: Path, count: int, alive: Any = None) -> list[Path]:
    t0 = time.monotonic()
    while len(found := manifests(outbox)) < count:
        if time.monotonic() - t0 > STALL_S or (alive is not None and not alive()):
            raise SystemExit(f"{count - len(found)} of {count} manifests missing in {outbox}")
        time.sleep(0.05)
    return found


def stream_rate(first_drop: float, found: list[Path], count: int) -> tuple[float, float]:
    """(seconds first drop -> last manifest, jobs per second)."""
    wall = max(manifest_time(m) for m in found) - first_drop
    return wall, count / wall


def serial_latency(inbox: Path, outbox: Path, events: Events | None, count: int, prefix: str) -> list[float]:
    """Drop one job at a time; each one's drop -> claimed (its `claimed` event in `events`), in seconds."""
    out = []
    for i in range(count):
        name = f"{prefix}{i:03d}.yaml"
        tmp = inbox.parent / f".{name}.part"
        tmp.write_text(job_text(i))
        before = len(manifests(outbox))
        os.rename(tmp, inbox / name)
        dropped = time.time()
        wait_manifests(outbox, before + 1)
        if events is None:  # only the drops wanted
            continue
        deadline = time.monotonic() + 10
        while (event := events.find("claimed", source=name)) is None and time.monotonic() < deadline:
            time.sleep(0.02)
            events.poll()
        if event is None:
            raise SystemExit(f"no claimed event for {name} in {events.path}")
        out.append(parse_ts(event["time"]) - dropped)
    return out


def wait_ready(events: Events, what: str, timeout: float = 180) -> None:
    t0 = time.monotonic()
    while not events.find("state", state="ready"):
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"{what} not ready after {timeout:.0f} s ({events.path})")
        time.sleep(0.1)
        events.poll()


class RayCluster:
    """A head (no GPU) and two nodes with one logical GPU each, on 127.0.0.1, this process the driver."""

    def __init__(self) -> None:
        import ray
        from ray.cluster_utils import Cluster

        self.ray = ray
        self.head = Cluster(
            initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "_system_config": FAST_HEALTH}
        )
        for _ in range(2):
            self.head.add_node(num_cpus=1, num_gpus=1)
        from diffusiond.daemon import cluster

        self.cluster = cluster
        ray.init(address=self.head.address, namespace=cluster.NAMESPACE, log_to_driver=False)
        self.head.wait_for_nodes()

    def slots(self, root: Path, models: Any, count: int, factory: Any, **watch: Any) -> tuple[Any, list[Events]]:
        """Start `count` slots on a new spool at `root`; returns the driver and each slot's events, all ready."""
        config = write_config(
            root,
            models,
            {"cluster": {"slots": count, "state_dir": str(root / "node-state")}, "prefetch": 1},
            **watch,
        )
        driver = self.cluster.Driver(config, generator_factory=factory)
        names = driver.reconcile()
        events = [Events(root / "node-state" / name / "events.jsonl") for name in names]
        for name, ev in zip(names, events, strict=True):
            wait_ready(ev, f"slot {name}")
        return driver, events

    def remove_slots(self, driver: Any) -> None:
        for name in driver.existing():
            driver.drain(name, timeout_s=60)
            driver.undrain(name)
        deadline = time.monotonic() + 120
        while driver.existing():
            if time.monotonic() > deadline:
                raise SystemExit(f"slots still there 120 s after their drain: {driver.existing()}")
            time.sleep(0.1)

    def close(self) -> None:
        self.ray.shutdown()
        self.head.shutdown()


# --------------------------------------------------------------------------- 1. throughput


def throughput(tmp: Path, models: Any, jobs: int, step_s: float, real: bool, ray_cluster: RayCluster) -> list[str]:
    from diffusiond.pipeline.standin import StandInFactory

    kinds = [("stand-in", step_s)] + ([("test model", 0.0)] if real else [])
    lines = [
        "## 1. Throughput: first drop -> last manifest",
        "",
        "| generator | who | jobs | wall s | jobs/s | vs 1 slot | other load |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, step in kinds:
        factory = StandInFactory(step) if kind == "stand-in" else None
        one = None
        for who in ("plain daemon", "1 slot", "2 slots"):
            root = tmp / f"tp-{kind.replace(' ', '')}-{who.replace(' ', '')}"
            load = OtherLoad()
            if who == "plain daemon":
                entry = standin_entry(step) if factory is not None else None
                proc = start_daemon(root, models, {"prefetch": 1}, **({"entry": entry} if entry else {}), mode="poll")
                load = OtherLoad((proc.proc.pid,))
                first = drop_all(proc.inbox, jobs)
                found = wait_manifests(proc.outbox, jobs, alive=lambda p=proc: p.proc.poll() is None)
                proc.stop()
            else:
                driver, _ = ray_cluster.slots(root, models, 1 if who == "1 slot" else 2, factory)
                first = drop_all(root / "inbox", jobs)
                found = wait_manifests(root / "outbox", jobs)
                ray_cluster.remove_slots(driver)
            wall, rate = stream_rate(first, found, jobs)
            if who == "1 slot":
                one = rate
            ratio = f"{rate / one:.2f}x" if one and who == "2 slots" else ""
            # The slots' CPU is in Ray's worker processes, so "other load" counts it there.
            note = f"{load.cores():.2f} cores" + (" (incl. the slots)" if who != "plain daemon" else "")
            lines.append(f"| {kind} | {who} | {jobs} | {wall:.2f} | {rate:.2f} | {ratio} | {note} |")
            print(lines[-1], flush=True)
    return lines


# --------------------------------------------------------------------------- 2. latency


def latency(tmp: Path, models: Any, serial: int, step_s: float, ray_cluster: RayCluster) -> list[str]:
    from diffusiond.pipeline.standin import StandInFactory

    results: dict[str, list[float]] = {}
    for who in ("plain daemon, inotify", "plain daemon, poll", "Ray slot (polls)"):
        root = tmp / f"lat-{len(results)}"
        if who.startswith("plain"):
            mode = "inotify" if "inotify" in who else "poll"
            proc = start_daemon(root, models, None, entry=standin_entry(step_s), mode=mode)
            results[who] = serial_latency(proc.inbox, proc.outbox, proc.events, serial, "lat")
            proc.stop()
        else:
            driver, [events] = ray_cluster.slots(root, models, 1, StandInFactory(step_s))
            results[who] = serial_latency(root / "inbox", root / "outbox", events, serial, "lat")
            ray_cluster.remove_slots(driver)
        print(f"{who}: median {median(results[who]) * 1000:.0f} ms", flush=True)
    base = median(results["plain daemon, poll"])
    lines = [
        f"## 2. Drop -> claimed, {serial} jobs one at a time (settle_s {SETTLE_S}, poll_interval_s {POLL_INTERVAL_S})",
        "",
        "| who | median ms | p95 ms | min ms | max ms | median vs plain poll |",
        "|---|---|---|---|---|---|",
    ]
    for who, xs in results.items():
        lines.append(
            f"| {who} | {median(xs) * 1000:.0f} | {p95(xs) * 1000:.0f} | {min(xs) * 1000:.0f} | "
            f"{max(xs) * 1000:.0f} | {(median(xs) - base) * 1000:+.0f} ms |"
        )
    return lines


# --------------------------------------------------------------------------- 3. spool calls

SYSCALL = re.compile(r"^(?:\[pid\s+\d+\]\s+)?(?:\d+\s+)?([a-z0-9_]+)\((.*)$")
NOT_SPOOL = ("state", "config.yaml")
"""Under a bench daemon's root but local to a real slot's host: its state dir (status, events) and config."""


def spool_calls(log: str, root: Path) -> Counter[tuple[str, str]]:
    """(syscall, spool folder) -> count, from an `strace -f -y` log: only calls naming a spool path,
    counted under the first spool folder they name (a claim's rename inbox -> work/ counts as inbox)."""
    counts: Counter[tuple[str, str]] = Counter()
    prefix = str(root) + "/"
    for line in log.splitlines():
        match = SYSCALL.match(line)
        if not match or prefix not in match.group(2):
            continue
        rest = match.group(2)[match.group(2).index(prefix) + len(prefix) :]
        part = rest.split("/", 1)[0].split(">", 1)[0].split('"', 1)[0]
        if part and part not in NOT_SPOOL:  # inbox, work, outbox, archive, failed, .daemons, .cancel
            call = match.group(1)
            if call == "openat" and "O_CREAT" in rest:
                call = "openat O_CREAT"  # a create: a synchronous operation on an NFS server
            counts[(call, part)] += 1
    return counts


def claim_attempts(log: str, root: Path) -> int:
    """How many claim folders were made (`mkdir work/<instance>/<claim id>`): one per attempt, won or lost."""
    folder = re.compile(r'mkdir(?:at)?\((?:AT_FDCWD<[^>]*>, )?"' + re.escape(str(root)) + r'/work/[^/"]+/[^/"]+"')
    return sum(1 for line in log.splitlines() if folder.search(line))


def traced(pids: list[int], log: Path) -> subprocess.Popen[bytes]:
    attach = [arg for pid in pids for arg in ("-p", str(pid))]
    tracer = subprocess.Popen(
        ["strace", "-f", "-y", "-qq", "-e", "trace=%file,getdents64,fsync,fdatasync", "-o", str(log), *attach],
        stderr=subprocess.DEVNULL,
    )
    STARTED.append(tracer)
    time.sleep(1.0)  # strace attaches to every thread before the measurement starts
    if tracer.poll() is not None:  # not root, or ptrace refused (Yama's ptrace_scope)
        raise SystemExit(f"strace could not attach to {pids} (exit {tracer.returncode}): run the bench as root")
    return tracer


def untrace(tracer: subprocess.Popen[bytes]) -> None:
    tracer.send_signal(signal.SIGINT)
    tracer.wait(30)


def table(counts: Counter[tuple[str, str]], per: float, unit: str) -> list[str]:
    folders = sorted({f for _, f in counts})
    calls = sorted({c for c, _ in counts}, key=lambda c: -sum(n for (cc, _), n in counts.items() if cc == c))
    lines = [f"| call {unit} | " + " | ".join(folders) + " | all |", "|---" * (len(folders) + 2) + "|"]
    for call in calls:
        row = [counts[(call, f)] / per for f in folders]
        lines.append(f"| {call} | " + " | ".join(f"{v:.1f}" if v else "" for v in row) + f" | {sum(row):.1f} |")
    total = [sum(n for (_, ff), n in counts.items() if ff == f) / per for f in folders]
    lines.append("| **all** | " + " | ".join(f"{v:.1f}" for v in total) + f" | {sum(total):.1f} |")
    return lines


def spool(
    tmp: Path, models: Any, jobs: int, backlog: int, step_s: float, serial: int, contenders: list[int]
) -> list[str]:
    if shutil.which("strace") is None:
        return ["## 3. Spool calls: skipped (no strace: apt-get install strace)"]
    lease_s = 4.0
    watch = {"mode": "poll", "poll_interval_s": 1.0, "rescan_interval_s": 30.0, "settle_s": 1.0}  # the defaults
    extra = {"prefetch": 1, "lease_timeout_s": lease_s}
    lines = [
        f"## 3. Spool calls of one daemon (poll mode, settle_s 1, poll_interval_s 1, rescan_interval_s 30, "
        f"lease_timeout_s {lease_s:g}: lease beat and look every {lease_s / 4:g} s)",
        "",
    ]
    # (a) per job
    proc = start_daemon(tmp / "sp-jobs", models, extra, entry=standin_entry(step_s), **watch)
    log = tmp / "strace-jobs.log"
    tracer = traced([proc.proc.pid], log)
    t0 = time.monotonic()
    drop_all(proc.inbox, jobs)
    wait_manifests(proc.outbox, jobs)
    deadline = time.monotonic() + STALL_S
    while any((proc.root / "work" / "bench").glob("*/claim.json")):  # the last claim's end
        if time.monotonic() > deadline:
            raise SystemExit(f"claims left in {proc.root / 'work' / 'bench'}")
        time.sleep(0.05)
    elapsed = time.monotonic() - t0
    untrace(tracer)
    proc.stop()
    per_job = spool_calls(log.read_text(errors="replace"), proc.root)
    lines += [f"(a) per job: {jobs} jobs dropped at once, {elapsed:.1f} s traced (idle polling included)", ""]
    lines += table(per_job, jobs, "per job")
    # (b) busy with a held job, a backlog waiting
    gate = tmp / "gate"
    gate.mkdir()
    proc = start_daemon(tmp / "sp-busy", models, extra, entry=standin_entry(step_s, hold=gate), **watch)
    (proc.inbox / "held.yaml").write_text("prompt: held\n")
    while not any(gate.glob("held-*")):
        time.sleep(0.05)
    drop_all(proc.inbox, backlog, prefix="wait")
    time.sleep(3.0)  # the prefetch claim of one waiting job, and the watcher's first look at the rest
    log = tmp / "strace-busy.log"
    t0 = time.monotonic()  # from the attach, whose second counts too
    tracer = traced([proc.proc.pid], log)
    time.sleep(9.0)
    untrace(tracer)
    window = time.monotonic() - t0
    (gate / "release").touch()
    proc.stop()
    busy = spool_calls(log.read_text(errors="replace"), proc.root)
    lines += [
        "",
        f"(b) per second, busy (one job held at a step), {backlog} files waiting in the inbox, {window:.1f} s traced",
        "",
    ]
    lines += table(busy, window, "per second")
    # (c) several idle daemons, one job at a time: what a drop costs when every daemon sees it
    lines += ["", f"(c) {serial} jobs dropped one at a time on idle daemons of one spool", ""]
    lines += ["| daemons | spool calls per job (all daemons) | claim attempts per job | per job beyond 1 daemon |"]
    lines += ["|---|---|---|---|"]
    alone = None
    for count in (1, *contenders):
        root = tmp / f"sp-idle{count}"  # the shared spool; each daemon's config and state beside it
        (root / "inbox").mkdir(parents=True)
        procs = [
            start_daemon(
                tmp / f"sp-idle{count}-d{n}",
                models,
                extra | {"instance": f"d{n}", "spool": str(root)},
                entry=standin_entry(step_s),
                **watch,
            )
            for n in range(count)
        ]
        log = tmp / f"strace-idle{count}.log"
        tracer = traced([p.proc.pid for p in procs], log)
        serial_latency(root / "inbox", root / "outbox", None, serial, "one")
        untrace(tracer)
        for p in procs:
            p.stop()
        text = log.read_text(errors="replace")
        calls = spool_calls(text, root)
        attempts = claim_attempts(text, root) / serial
        total = sum(calls.values()) / serial
        alone = alone if alone is not None else total
        lines.append(f"| {count} | {total:.0f} | {attempts:.1f} | {total - alone:+.0f} |")
    return lines


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=48, help="jobs per throughput run and for the spool's per-job count")
    ap.add_argument("--step-s", type=float, default=0.05, help="seconds each stand-in step takes (4 steps a job)")
    ap.add_argument("--serial", type=int, default=20, help="jobs dropped one at a time for the latency")
    ap.add_argument("--backlog", type=int, default=1000, help="files waiting in the inbox while the daemon is busy")
    ap.add_argument("--contenders", default="4,8", help="how many idle daemons share a spool in the claim race")
    ap.add_argument("--real", action="store_true", help="throughput also through real diffusers (the test model)")
    ap.add_argument("--section", choices=("throughput", "latency", "spool", "all"), default="all")
    args = ap.parse_args()
    from datetime import datetime

    from diffusiond.pipeline.testmodel import make_test_model

    tmp = Path(tempfile.mkdtemp(prefix="diffusiond-bench-cluster-"))
    models = make_test_model(tmp / "models")
    print(f"diffusiond cluster bench, {datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"machine: {machine()}")
    print(f"stand-in: {STEPS} steps x {args.step_s} s; settle_s {SETTLE_S}, poll_interval_s {POLL_INTERVAL_S}\n")
    report: list[str] = []
    t0 = time.monotonic()
    try:
        ray_cluster = RayCluster() if args.section in ("throughput", "latency", "all") else None
        try:
            if args.section in ("throughput", "all"):
                assert ray_cluster is not None
                report += [*throughput(tmp, models, args.jobs, args.step_s, args.real, ray_cluster), ""]
            if args.section in ("latency", "all"):
                assert ray_cluster is not None
                report += [*latency(tmp, models, args.serial, args.step_s, ray_cluster), ""]
        finally:
            if ray_cluster is not None:
                ray_cluster.close()
        if args.section in ("spool", "all"):
            counts = [int(n) for n in args.contenders.split(",")]
            report += [*spool(tmp, models, args.jobs, args.backlog, args.step_s, args.serial, counts), ""]
    finally:
        _kill_leftovers()
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)
    print()
    print("\n".join(report))
    print(f"({time.monotonic() - t0:.0f} s)")


if __name__ == "__main__":
    main()
