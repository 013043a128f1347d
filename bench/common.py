"""What the bench sections share: statistics, the machine line, a daemon subprocess on a temp spool."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
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


def write_config(root: Path, models: Any, extra: dict[str, Any] | None = None, **watch: Any) -> Path:
    """The same knobs as tests/conftest.py's write_config: tiny model, 64 px, 4 steps, small settle.

    `extra` replaces top-level config keys (`models`, `defaults`, `batch_size`, ...).
    """
    data: dict[str, Any] = {
        "spool": str(root),
        "instance": "bench",
        "state_dir": str(root / "state"),
        "models": {"test": str(models.sd)} if models is not None else {},
        "defaults": {"all": {"model": "test", "size": f"{SIZE}x{SIZE}", "steps": STEPS}},
        "preload": ["test"],
        "watch": {
            "settle_s": SETTLE_S,
            "pair_wait_s": 2.0,
            "rescan_interval_s": 2.0,
            "poll_interval_s": POLL_INTERVAL_S,
        }
        | watch,
    } | (extra or {})
    (root / "inbox").mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


WAIT_POLL_S = 0.05
"""How often the bench looks for manifests: rarely, so it takes no CPU from the daemon it measures
(polling every 2 ms made the daemon's jobs ~10 % slower on 2 cores); the time comes from the file."""


def manifest_time(path: Path) -> float:
    """When the daemon renamed the manifest into place (its inode change time), wall clock."""
    return path.stat().st_ctime


def cpu_s(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of a process, or of one of its threads (the main thread's tid is the pid)."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid is not None else f"/proc/{pid}/stat"
    fields = Path(path).read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_by_thread_name(pid: int) -> dict[str, float]:
    """CPU seconds of a process's threads, summed by OS thread name (the daemon names its threads:
    diffusiond = main loop, worker = generation with torch's OpenMP threads, writer, watch)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            out[name] = out.get(name, 0.0) + cpu_s(pid, int(task.name))
        except (OSError, ValueError):  # a thread that ended meanwhile
            continue
    return out


def cpu_since(pid: int, before: dict[str, float]) -> dict[str, float]:
    """CPU seconds per thread name since `before` (a `cpu_by_thread_name` reading)."""
    return {name: used - before.get(name, 0.0) for name, used in cpu_by_thread_name(pid).items()}


class OtherLoad:
    """How busy the rest of the machine was while a measurement ran.

    On 2 cores a test suite or another bench beside this one slows torch's threads 10-100x, so
    every section says how many cores others used. Ours: this process, its waited-for children
    (one-shot processes, stopped daemons) and the live processes in `pids` (a running daemon).
    """

    def __init__(self, pids: tuple[int, ...] = ()) -> None:
        self.pids = pids
        self.start = self._read()

    def _read(self) -> tuple[float, float, float]:
        import resource

        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
        ours = sum(cpu_s(pid) for pid in self.pids if Path(f"/proc/{pid}").exists())
        ours += sum(
            usage.ru_utime + usage.ru_stime
            for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
        )
        return time.monotonic(), busy, ours

    def cores(self) -> float:
        """Average cores used by other processes since the start."""
        t, busy, ours = self._read()
        return max(0.0, (busy - self.start[1]) - (ours - self.start[2])) / max(1e-9, t - self.start[0])

    def note(self, cores: float | None = None) -> str:
        cores = self.cores() if cores is None else cores
        warn = " (NOISY: another process competed for the CPU; rerun on a quiet machine)" if cores > 0.25 else ""
        return f"other processes used {cores:.2f} of {os.cpu_count()} cores on average{warn}"


def batch_sizes(manifests: list[Path]) -> Counter[int]:
    """How many jobs ran in a pipeline call of each size (the manifests' `batch_size`)."""
    return Counter(json.loads(m.read_text())["batch_size"] for m in manifests)


def job_text(i: int) -> str:
    return f"prompt: a hamster number {i}\nseed: {1000 + i}\n"


def stage_and_drop(root: Path, inbox: Path, names: list[str]) -> tuple[float, float]:
    """Write every job file to a staging folder on the same filesystem, then rename them all in.

    Returns (wall-clock time of the first rename, seconds the renames took).
    """
    staging = root / "staging"
    staging.mkdir(exist_ok=True)
    for i, name in enumerate(names):
        (staging / name).write_text(job_text(i))
    t0 = time.time()
    m0 = time.perf_counter()
    for name in names:
        os.rename(staging / name, inbox / name)
    return t0, time.perf_counter() - m0


def parse_ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


class Events:
    """Reads `<state>/events.jsonl` incrementally, following the daemon's rotation to `events.jsonl.1`.

    The StatusBoard moves the file away at 8 MiB (a 10,000-job flood passes that): a reader that
    kept its byte offset would skip or mis-split lines after it.
    """

    def __init__(self, path: Path, *, keep: bool = True) -> None:
        self.path = path
        self.keep = keep
        """Keep every event in `items` for `find` (a flood's reader only wants the new ones)."""
        self.pos = 0
        self.inode: int | None = None
        self.rotations = 0
        self.items: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        """The events written since the last poll."""
        try:
            f = open(self.path, "rb")  # noqa: SIM115 (closed below; fstat needs the open file)
        except FileNotFoundError:
            return []
        new: list[dict[str, Any]] = []
        with f:
            inode = os.fstat(f.fileno()).st_ino
            if self.inode is not None and inode != self.inode:
                old = self.path.with_name(self.path.name + ".1")
                try:
                    with open(old, "rb") as g:
                        if os.fstat(g.fileno()).st_ino == self.inode:  # else rotated twice between polls
                            new += self._lines(g)
                except FileNotFoundError:
                    pass
                self.pos, self.rotations = 0, self.rotations + 1
            self.inode = inode
            new += self._lines(f)
        if self.keep:
            self.items += new
        return new

    def _lines(self, f: Any) -> list[dict[str, Any]]:
        f.seek(self.pos)
        data = f.read()
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self.pos += end + 1
        return [json.loads(line) for line in data[: end + 1].splitlines() if line.strip()]

    def find(self, event: str, **match: Any) -> dict[str, Any] | None:
        for item in self.items:
            if item.get("event") == event and all(item.get(k) == v for k, v in match.items()):
                return item
        return None


DAEMON = ["-m", "diffusiond.daemon.cli"]
"""How `DaemonProc` starts the daemon: `python -m diffusiond.daemon.cli run --config ...`."""


class DaemonProc:
    def __init__(
        self,
        root: Path,
        models: Any,
        extra: dict[str, Any] | None = None,
        *,
        entry: list[str] = DAEMON,
        **watch: Any,
    ) -> None:
        self.root = root
        self.config = write_config(root, models, extra, **watch)
        self.inbox = root / "inbox"
        self.outbox = root / "outbox"
        self.events = Events(root / "state" / "events.jsonl")
        self.log = open(root / "daemon.log", "w")  # noqa: SIM115 (the daemon writes to it until stop())
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [PY, *entry, "run", "--config", str(self.config)],
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
                time.sleep(WAIT_POLL_S)
        total = manifest_time(self.outbox / manifest) - t_drop
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

    def run_stream(self, stems: list[str], timeout: float = 300, extra: str = "") -> tuple[float, list[Path]]:
        """Drop all jobs at once (each by rename) and wait for every manifest.

        Returns the seconds from the first drop to the last manifest's rename, and the manifests.
        `extra` is appended to each job file (e.g. `size: 256x256`)."""
        t0, wall0 = time.monotonic(), time.time()
        for i, stem in enumerate(stems):
            self.drop(f"{stem}.yaml", job_text(i) + extra, in_place=False)
        found: dict[str, Path] = {}
        while len(found) < len(stems):
            if time.monotonic() - t0 > timeout or self.proc.poll() is not None:
                missing = len(stems) - len(found)
                raise SystemExit(f"{missing} manifests missing after {timeout} s; see {self.root / 'daemon.log'}")
            for entry in os.listdir(self.outbox):
                stem = entry.removesuffix(".json").rsplit("-", 3)[0]  # <stem>-<date>-<time>-<hex>.json
                if entry.endswith(".json") and not entry.startswith(".") and stem in stems:
                    found.setdefault(stem, self.outbox / entry)
            time.sleep(WAIT_POLL_S)
        manifests = list(found.values())
        return max(manifest_time(m) for m in manifests) - wall0, manifests

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
