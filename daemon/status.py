"""What the daemon is doing, for people and scripts: `<state>/status.json` and `<state>/events.jsonl`.

- `status.json` is the whole picture (state, queue, running job with its step, `waiting`: why a
  job waits in work/, e.g. a full disk, last results and failures, counters), replaced atomically,
  so a reader never sees half of it. It is rewritten at most every `write_interval_s` (0.5 s): a
  change within that time is written by the next `flush_due()` (the service loop calls it at least
  that often), so a stream of short jobs costs two writes a second, not five per job. A change of
  state (ready, stopping, ...) is written at once.
- `events.jsonl` is append-only, one JSON object a line (`{"time": ..., "event": "done", ...}`), for
  tools that tail it. Every claim's end is one event: `done` per job, then `failed`, or `released`,
  `resumes`, `deferred` or `fenced` (daemon/lifecycle.py, `Ending`). Progress lines: at most one per
  `progress_interval_s` per job, plus the last step; a step held back is written when the interval
  is over. Over `events_max_bytes` the file moves to `events.jsonl.1` (replacing the older one), so
  `tail -F` follows it and the disk holds at most two files' worth.

Writing status never stops a job: a failed write is logged once and the daemon goes on.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from diffusiond.daemon.fsutil import atomic_write, read_json_object

__all__ = [
    "EVENTS_FILE",
    "STATES",
    "STATUS_FILE",
    "DaemonState",
    "EventTail",
    "ReloadOutcome",
    "StatusBoard",
    "ask_reload",
    "event_matches",
    "format_event",
    "format_status",
    "is_running",
    "read_events",
    "reload_clock",
    "timestamp",
]

STATUS_FILE = "status.json"
EVENTS_FILE = "events.jsonl"


class DaemonState(StrEnum):
    """The daemon's `state` in status.json and its `state` events."""

    STARTING = "starting"
    """Loading the preloaded models, queueing the claims a crash left."""
    READY = "ready"
    """Watching the inbox and running jobs."""
    RELOADING = "reloading"
    """Reading the config again after SIGHUP; then ready again (the old config stays if the new one is wrong)."""
    STOPPING = "stopping"
    """A warm stop: no more claims, queued ones back in the inbox, the running job ends at a step."""
    STOPPED = "stopped"
    """Exited cleanly; a status that says anything else with a dead pid means it did not."""


STATES = tuple(str(state) for state in DaemonState)
_TEXT_MAX = 1_000  # an error's text in status and events; the full one is in its report
COUNTERS = ("claimed", "started", "done", "failed", "cancelled", "images", "hooks_failed")
_SHOWN = 10  # queued claims and inbox files listed by `diffusiond status`

log = logging.getLogger(__name__)


def reload_clock() -> float:
    """When a reload was asked for: one clock for the daemon and `diffusiond reload`, which never jumps."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def timestamp() -> str:
    """Local time with its UTC offset, to the millisecond (ISO 8601)."""
    return datetime.now().astimezone().isoformat(timespec="milliseconds")


def process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), or None where /proc cannot tell.

    Recorded next to the pid, so `diffusiond status` can tell our daemon from a process that got
    its pid after it died.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # field 22; the command name before ")" may hold spaces


class StatusBoard:
    """Thread-safe: the service loop and the worker thread both report here."""

    def __init__(
        self,
        state_dir: Path,
        *,
        keep: int = 10,
        write_interval_s: float = 0.5,
        progress_interval_s: float = 1.0,
        events_max_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        self.status_path = state_dir / STATUS_FILE
        self.events_path = state_dir / EVENTS_FILE
        self.write_interval_s = write_interval_s
        self.progress_interval_s = progress_interval_s
        self.events_max_bytes = events_max_bytes
        self._lock = threading.Lock()
        self._last_write = float("-inf")
        self._dirty = False
        self._last_progress_event: dict[str, float] = {}
        self._held_progress: dict[str, dict[str, Any]] = {}
        self._warned = False
        self.listener: Callable[[dict[str, Any]], None] | None = None
        """Called with each `done` and `failed` event, outside the lock (the daemon's hooks and webhooks)."""
        pid = os.getpid()
        self._status: dict[str, Any] = {
            "pid": pid,
            "pid_start": process_start(pid),
            "state": "starting",
            "since": timestamp(),
            "updated": None,
            "queue": 0,
            "queued": [],
            "inbox": {"count": 0, "files": []},
            "waiting": None,
            "current": None,
            "running": [],
            "last_results": deque(maxlen=keep),
            "last_failures": deque(maxlen=keep),
            "counters": dict.fromkeys(COUNTERS, 0),
            "reload": None,
            "threads": None,
        }
        state_dir.mkdir(parents=True, exist_ok=True)

    # The daemon's lifecycle and queue (service loop).

    def state(self, text: DaemonState | str) -> None:
        """One of `DaemonState`."""
        if text not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)}, got {text!r}")
        text = str(text)
        with self._lock:
            self._status.update(state=text, since=timestamp())
            self._event("state", state=text)
            self._write()  # at once: `diffusiond status` and tests wait for "ready" and "stopped"

    def queue(self, length: int) -> None:
        """Claims waiting for the worker; call as often as you like, only changes are recorded."""
        with self._lock:
            if length == self._status["queue"]:
                return
            self._status["queue"] = length
            self._event("queue", length=length)
            self._changed()

    def inbox(self, count: int, files: list[dict[str, Any]]) -> None:
        """The files in the inbox not claimed yet: how many, and the first few with `since` and `reason`."""
        view = {"count": count, "files": files}
        with self._lock:
            if view == self._status["inbox"]:
                return
            self._status["inbox"] = view
            self._changed()

    def threads(self, count: int) -> None:
        """torch's CPU threads for generation, as the worker set them."""
        with self._lock:
            self._status["threads"] = count
            self._changed()

    def reloaded(self, asked: float, error: str | None) -> None:
        """A SIGHUP handled: `asked` is when it came (`reload_clock()`), `error` why the config was refused.

        Written at once: `diffusiond reload` (systemd's ExecReload) waits for it to return only when
        the daemon has read the config, and to say whether it took it.
        """
        reload = {"asked": asked, "time": timestamp(), "ok": error is None, "error": error}
        with self._lock:
            self._status["reload"] = reload
            self._event("reload", ok=error is None, error=error)
            self._write()

    def claimed(self, claim_id: str, source: str) -> None:
        with self._lock:
            self._status["counters"]["claimed"] += 1
            self._status["queued"].append({"claim_id": claim_id, "source": source, "since": timestamp()})
            self._event("claimed", job_id=claim_id, claim_id=claim_id, source=source)
            self._changed()

    # A job's run (worker thread).

    def started(
        self,
        job_id: str,
        source: str,
        task: str,
        model: str | None,
        steps: int,
        claim_id: str | None = None,
        stage: tuple[int, int] | None = None,
    ) -> None:
        """A job (or, with `stage` = (k, n), stage k of a multi-stage job's n) begins generating."""
        job: dict[str, Any] = {"job_id": job_id, "claim_id": claim_id or job_id, "source": source, "task": task}
        job |= {"model": model, "step": 0, "steps": steps}
        if stage is not None:
            job |= {"stage": stage[0], "stages": stage[1]}
        with self._lock:
            job["started_at"] = timestamp()
            running = [j for j in self._status["running"] if j["job_id"] != job_id]
            self._status["running"] = [*running, job]
            self._unqueue(claim_id=job["claim_id"])
            self._status["current"] = job
            if stage is None or stage[0] == 1:
                self._status["counters"]["started"] += 1
            self._event("started", **{k: v for k, v in job.items() if k not in ("step", "started_at")})
            self._changed()

    def progress(self, job_id: str, step: int, steps: int) -> None:
        """Call on every step: the board decides what to write."""
        with self._lock:
            claim_id, stage = job_id, {}
            for job in self._status["running"]:
                if job["job_id"] == job_id:
                    job.update(step=step, steps=steps)
                    claim_id = job.get("claim_id", job_id)
                    stage = {k: job[k] for k in ("stage", "stages") if k in job}
            now = time.monotonic()
            last = step >= steps
            fields = {"job_id": job_id, "claim_id": claim_id, "step": step, "steps": steps, **stage}
            if last or self._progress_due(job_id, now):
                self._write_progress(fields, now)
            else:  # written by `flush_due` once the interval is over, unless a later step is written first
                self._held_progress[job_id] = fields
            self._changed(now)

    def done(self, job_id: str, source: str, outputs: list[str], seconds: float, claim_id: str | None = None) -> None:
        result: dict[str, Any] = {"job_id": job_id, "claim_id": claim_id or job_id, "source": source}
        result |= {"outputs": list(outputs), "seconds": round(seconds, 3)}
        with self._lock:
            self._finish(job_id=job_id)
            self._status["waiting"] = None
            counters = self._status["counters"]
            counters["done"] += 1
            counters["images"] += len(outputs)
            self._status["last_results"].append({"time": timestamp(), **result})
            event = self._event("done", **result)
            self._changed()
        self._tell(event)

    def failed(
        self,
        source: str,
        code: str,
        error: str,
        report_path: str | None,
        job_id: str | None = None,
        claim_id: str | None = None,
        attempt: int | None = None,
    ) -> None:
        """A claim rejected, failed or cancelled (`code: cancelled`: a `cancelled` event, counted apart);
        its events name the claim id as `job_id` (its jobs' ids start with it)."""
        failure: dict[str, Any] = {"job_id": job_id or claim_id, "claim_id": claim_id, "source": source}
        if attempt is not None:
            failure["attempt"] = attempt
        failure |= {"code": code, "error": error[:_TEXT_MAX], "report": report_path}
        with self._lock:
            self._finish(job_id=job_id, source=source)
            self._unqueue(claim_id=claim_id or job_id, source=source)
            kind = "cancelled" if code == "cancelled" else "failed"
            self._status["counters"][kind] += 1
            self._status["last_failures"].append({"time": timestamp(), **failure})
            event = self._event(kind, **failure)
            self._changed()
        self._tell(event)

    def hook_failed(self) -> None:
        """A hook exited non-zero, timed out or did not start (daemon/hooks.py logs which)."""
        with self._lock:
            self._status["counters"]["hooks_failed"] += 1
            self._changed()

    def set_aside(self, source: str, ending: str, reason: str, claim_id: str | None = None) -> None:
        """A claim that ended without a result: released to the inbox, kept in work/ for later, or fenced."""
        with self._lock:
            self._finish(job_id=None, source=source)
            self._unqueue(claim_id=claim_id, source=source)
            self._status["waiting"] = reason if ending == "deferred" else None
            self._event(ending, job_id=claim_id, claim_id=claim_id, source=source, reason=reason[:_TEXT_MAX])
            self._changed()

    def flush(self) -> None:
        """Write status.json now (e.g. before exit, after throttled progress)."""
        with self._lock:
            self._write()

    def flush_due(self) -> None:
        """Write the changes held back by the throttle, once `write_interval_s` has passed, and a job's
        progress line held back once `progress_interval_s` has: a reader never waits for the next step
        (a slow one) to see the step already made."""
        with self._lock:
            now = time.monotonic()
            for job_id, fields in list(self._held_progress.items()):
                if self._progress_due(job_id, now):
                    self._write_progress(fields, now)
            if self._dirty and now - self._last_write >= self.write_interval_s:
                self._write()

    def snapshot(self) -> dict[str, Any]:
        """What status.json holds, as plain JSON types."""
        with self._lock:
            return json.loads(self._render())

    # Inside the lock.

    def _finish(self, *, job_id: str | None, source: str | None = None) -> None:
        def ended(job: dict[str, Any]) -> bool:
            return job["job_id"] == job_id if job_id is not None else job["source"] == source

        for job in filter(ended, self._status["running"]):
            self._last_progress_event.pop(job["job_id"], None)
            self._held_progress.pop(job["job_id"], None)
        self._status["running"] = [j for j in self._status["running"] if not ended(j)]
        self._status["current"] = self._status["running"][-1] if self._status["running"] else None
        self._last_progress_event.pop(job_id or "", None)

    def _progress_due(self, job_id: str, now: float) -> bool:
        return now - self._last_progress_event.get(job_id, float("-inf")) >= self.progress_interval_s

    def _write_progress(self, fields: dict[str, Any], now: float) -> None:
        self._last_progress_event[fields["job_id"]] = now
        self._held_progress.pop(fields["job_id"], None)
        self._event("progress", **fields)

    def _unqueue(self, *, claim_id: str | None, source: str | None = None) -> None:
        queued = self._status["queued"]
        self._status["queued"] = [
            q for q in queued if q["claim_id"] != claim_id and (source is None or q["source"] != source)
        ]

    def _render(self) -> str:
        return json.dumps(self._status, indent=1, ensure_ascii=False, default=list) + "\n"

    def _changed(self, now: float | None = None) -> None:
        """Write now, or leave it to `flush_due` when the last write was under `write_interval_s` ago."""
        now = time.monotonic() if now is None else now
        if now - self._last_write >= self.write_interval_s:
            self._write()
        else:
            self._dirty = True

    def _write(self) -> None:
        self._dirty = False
        self._status["updated"] = timestamp()
        self._last_write = time.monotonic()
        # A file name that is not UTF-8 (lone surrogates) is written as `\udcxx`, which JSON reads back.
        self._guard(
            lambda: atomic_write(self.status_path, self._render().encode(errors="backslashreplace"), durable=False)
        )

    def _event(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"time": timestamp(), "event": event, **fields}
        line = json.dumps(record, ensure_ascii=False) + "\n"
        self._guard(lambda: self._append(line.encode(errors="backslashreplace")))
        return record

    def _tell(self, event: dict[str, Any]) -> None:
        if self.listener is not None:
            try:
                self.listener(event)
            except Exception:  # a listener's bug never stops a job's end
                log.exception("internal error passing on the %s event", event.get("event"))

    def _append(self, data: bytes) -> None:
        path = self.events_path
        # One write() on an O_APPEND file: a reader sees whole lines, in order.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and size + len(data) > self.events_max_bytes:
                os.close(fd)
                os.replace(path, path.with_name(path.name + ".1"))
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.write(fd, data)
        finally:
            os.close(fd)

    def _guard(self, write: Any) -> None:
        try:
            write()
        except OSError as exc:
            if not self._warned:  # once: a full disk would otherwise log on every step
                self._warned = True
                log.warning(
                    "cannot write status in %s: %s; jobs go on, but `diffusiond status` is stale until the "
                    "state dir is writable again (free space, or set `state_dir:` in the config)",
                    self.status_path.parent,
                    exc,
                )


# Reading it back (`diffusiond status`).


def is_running(status: dict[str, Any]) -> bool:
    """The pid in `status` is alive, is the same process that wrote it, and has not reported "stopped"."""
    pid = status.get("pid")
    if not isinstance(pid, int) or pid <= 0 or status.get("state") == "stopped" or not _alive(pid):
        return False
    recorded, now = status.get("pid_start"), process_start(pid)
    return recorded is None or now is None or recorded == now


def format_status(status: dict[str, Any], *, running: bool) -> str:
    """A few lines for a person: state, running job, queue, counters, last results and failures."""
    pid, state = status.get("pid"), status.get("state", "?")
    if running:
        lines = [f"diffusiond: {state} since {_clock(status.get('since'))} (pid {pid})"]
    elif state == "stopped":
        lines = [f"diffusiond: stopped at {_clock(status.get('since'))} (was pid {pid})"]
    else:
        lines = [
            f"diffusiond: not running: pid {pid} is gone, but its last status ({_clock(status.get('updated'))}) "
            f"says {state!r}; it did not stop cleanly (see `journalctl -u diffusiond`)"
        ]
    for job in status.get("running") or []:
        step = f"step {job.get('step', 0)} of {job.get('steps', '?')}"
        if job.get("stage"):
            step = f"stage {job['stage']} of {job.get('stages')}, {step}"
        lines.append(
            f"  running  {job.get('job_id')} ({job.get('task')}, model {job.get('model')}) from {job.get('source')}: "
            f"{step}, started {_clock(job.get('started_at'))}"
        )
    if status.get("waiting"):
        lines.append(f"  waiting  {status['waiting']}")
    queued = status.get("queued") or []
    lines.append(f"  queue    {status.get('queue', len(queued))} claimed, waiting for the worker")
    lines += [f"    {q.get('source')}  ({q.get('claim_id')}, {_ago(q.get('since'))} ago)" for q in queued[:_SHOWN]]
    if len(queued) > _SHOWN:
        lines.append(f"    ... and {len(queued) - _SHOWN} more")
    inbox = status.get("inbox") or {}
    files, count = inbox.get("files") or [], inbox.get("count", 0)
    lines.append(f"  inbox    {count} not claimed yet")
    lines += [f"    {f.get('file')}  ({_ago(f.get('since'))}): {f.get('reason')}" for f in files[:_SHOWN]]
    if count > min(len(files), _SHOWN):
        lines.append(f"    ... and {count - min(len(files), _SHOWN)} more")
    counters = status.get("counters", {})
    lines.append(
        f"  so far   {counters.get('done', 0)} done ({counters.get('images', 0)} images), "
        f"{counters.get('failed', 0)} failed, {counters.get('cancelled', 0)} cancelled"
    )
    results = status.get("last_results") or []
    if results:
        lines.append("last results:")
    for result in reversed(results):
        outputs = result.get("outputs") or []
        more = f" (+{len(outputs) - 1} more)" if len(outputs) > 1 else ""
        first = outputs[0] if outputs else "no images"
        lines.append(
            f"  {_clock(result.get('time'))}  {result.get('job_id')} from {result.get('source')} "
            f"in {result.get('seconds', 0):.1f} s: {first}{more}"
        )
    failures = status.get("last_failures") or []
    if failures:
        lines.append("failures:")
    for failure in reversed(failures):
        report = f"\n      report: {failure['report']}" if failure.get("report") else ""
        lines.append(
            f"  {_clock(failure.get('time'))}  {failure.get('source')} [{failure.get('code')}]: "
            f"{failure.get('error')}{report}"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class ReloadOutcome:
    """What `ask_reload` saw: the daemon took the config (`ok`), refused it, or never answered."""

    ok: bool
    message: str


def ask_reload(state_dir: Path, *, pid: int | None = None, timeout_s: float = 300.0) -> ReloadOutcome:
    """SIGHUP the daemon whose status is in `state_dir`, and wait until it has read its config.

    systemd 252 has no `Type=notify-reload` (253+): with `ExecReload=kill -HUP`, `systemctl
    reload` returns before the daemon reads the config and succeeds even when it refuses it. The
    units run this instead. It waits for the daemon to be ready (a SIGHUP before its handler is in
    place would kill it), signals it, then waits for the reload that status.json records as asked
    for after the signal (`reload.asked`, the daemon's clock when the SIGHUP came).
    """
    path = state_dir / STATUS_FILE
    deadline = time.monotonic() + timeout_s
    status: dict[str, Any] | None = None
    while True:  # 1. the daemon (`pid`, when given: systemd's $MAINPID) is up and handles SIGHUP
        status = read_json_object(path)
        if status is not None and (pid is None or status.get("pid") == pid):
            if not is_running(status):
                return ReloadOutcome(False, f"the daemon (pid {status.get('pid')}) is not running")
            if status.get("state") in (DaemonState.READY, DaemonState.RELOADING):
                break
        if pid is not None and not _alive(pid):
            return ReloadOutcome(False, f"the daemon (pid {pid}) is not running")
        if time.monotonic() > deadline:
            return ReloadOutcome(False, _not_ready(path, status, pid))
        time.sleep(0.05)
    target = int(status["pid"])
    asked = reload_clock()
    try:
        os.kill(target, signal.SIGHUP)
    except OSError as exc:
        return ReloadOutcome(False, f"cannot signal the daemon (pid {target}): {exc}")
    while True:  # 2. its answer to this SIGHUP (or a later one)
        status = read_json_object(path)
        reload = status.get("reload") if status is not None else None
        if isinstance(reload, dict) and isinstance(reload.get("asked"), float) and reload["asked"] >= asked:
            if reload.get("ok"):
                return ReloadOutcome(True, "config reloaded")
            refused = f"config reload refused, the daemon keeps its running config: {reload.get('error')}"
            return ReloadOutcome(False, refused)
        if not _alive(target):
            return ReloadOutcome(False, f"the daemon (pid {target}) exited during the reload")
        if time.monotonic() > deadline:
            return ReloadOutcome(False, f"the daemon (pid {target}) did not finish the reload within {timeout_s:g} s")
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    """The process exists and has not exited (a zombie whose parent has not reaped it yet has)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user (the daemon's own account)
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc to tell: it exists


def _not_ready(path: Path, status: dict[str, Any] | None, pid: int | None) -> str:
    if status is None:
        return f"no readable status at {path}: is the daemon running with this state dir?"
    if pid is not None and status.get("pid") != pid:
        return f"{path} is pid {status.get('pid')}'s, not pid {pid}'s: is the daemon running with this state dir?"
    return f"the daemon (pid {status.get('pid')}) is {status.get('state')!r}, not ready for a reload"


# The event stream (`diffusiond events`).


def read_events(state_dir: Path, *, follow: bool = False, poll_s: float = 0.2) -> Iterator[dict[str, Any]]:
    """The events in `state_dir/events.jsonl`, oldest first; with `follow`, then each new one as it comes.

    Followed by polling, like `tail -F` (watchdog would add a thread and an inotify watch per
    reader for a file that changes a few times a second): at the end it waits `poll_s`, and
    reopens the file when the board has rotated it (a new inode, or a shorter file). A line is
    yielded once whole; a line that is not JSON is skipped.
    """
    path = state_dir / EVENTS_FILE
    while follow and not path.exists():
        time.sleep(poll_s)
    try:
        file = path.open("rb")
    except FileNotFoundError:
        return
    partial = b""
    try:
        while True:
            chunk = file.readline()
            if chunk:
                partial += chunk
                if partial.endswith(b"\n"):
                    line, partial = partial, b""
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(event, dict):
                        yield event
                continue
            if not follow:
                return
            time.sleep(poll_s)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                continue  # between the rotation's rename and the next append
            if now.st_ino != os.fstat(file.fileno()).st_ino or now.st_size < file.tell():
                file.close()
                file, partial = path.open("rb"), b""
    finally:
        file.close()


class EventTail:
    """New events in some state dirs' events.jsonl, without waiting: `new()` returns what came since the
    last call (from the end of each file at the start). For `submit --wait`'s progress; a file that
    is not there or cannot be read gives nothing."""

    def __init__(self, state_dirs: list[Path]) -> None:
        self._files: list[tuple[Path, Any]] = []
        for state_dir in state_dirs:
            path = state_dir / EVENTS_FILE
            try:
                file = path.open("rb")
            except OSError:
                continue
            file.seek(0, os.SEEK_END)
            self._files.append((path, file))
        self._partial: dict[Path, bytes] = {}

    def new(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for path, file in self._files:
            data = self._partial.pop(path, b"") + file.read()
            *lines, rest = data.split(b"\n")
            if rest:
                self._partial[path] = rest
            for line in lines:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict):
                    events.append(event)
        return events


def event_matches(event: dict[str, Any], job: str) -> bool:
    """`--job ID`: the job's own events and its claim's (claimed, failed, released, ...); a claim id
    matches every job of its file (their ids are `<claim_id>-<n>`)."""
    job_id, claim_id = str(event.get("job_id") or ""), str(event.get("claim_id") or "")
    return (
        job in (job_id, claim_id) or job_id.startswith(f"{job}-") or bool(claim_id and job.startswith(f"{claim_id}-"))
    )


def format_event(event: dict[str, Any]) -> str:
    """One event as a line for a person: time, event, job, what happened."""
    kind = str(event.get("event", "?"))
    when = str(event.get("time", ""))[11:23]
    job = event.get("job_id") or ""
    if kind == "claimed":
        what = f"{event.get('source')}"
    elif kind == "started":
        stage = f"stage {event['stage']} of {event.get('stages')}: " if event.get("stage") else ""
        what = (
            f"{stage}{event.get('task')}, model {event.get('model')}, {event.get('steps')} steps, "
            f"from {event.get('source')}"
        )
    elif kind == "progress":
        stage = f"stage {event['stage']}/{event.get('stages')} " if event.get("stage") else ""
        what = f"{stage}step {event.get('step')}/{event.get('steps')}"
    elif kind == "done":
        outputs = event.get("outputs") or []
        what = f"in {event.get('seconds', 0)} s: {', '.join(map(str, outputs))}"
    elif kind == "failed":
        what = f"{event.get('source')} [{event.get('code')}]: {event.get('error')}"
    elif kind in ("released", "resumes", "deferred", "fenced"):
        what = f"{event.get('source')}: {event.get('reason')}"
    elif kind == "state":
        what = str(event.get("state"))
    elif kind == "queue":
        what = f"{event.get('length')} waiting"
    elif kind == "reload":
        what = "config taken" if event.get("ok") else f"config refused: {event.get('error')}"
    else:
        what = json.dumps({k: v for k, v in event.items() if k not in ("time", "event")}, ensure_ascii=False)
    return f"{when}  {kind:<9} {job + '  ' if job else ''}{what}"


def _ago(iso: Any) -> str:
    """How long ago an ISO time was, for a person: "12 s", "4 min", "3 h", "2 d"."""
    try:
        seconds = max(0.0, time.time() - datetime.fromisoformat(str(iso)).timestamp())
    except ValueError:
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds // size:.0f} {unit}"
    return f"{seconds:.0f} s"


def _clock(iso: str | None) -> str:
    """`HH:MM:SS` today, the date as well otherwise."""
    if not iso:
        return "?"
    try:
        when = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    today = datetime.now().astimezone().date() == when.date()
    return when.strftime("%H:%M:%S" if today else "%Y-%m-%d %H:%M:%S")
