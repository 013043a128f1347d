"""Hooks: the config's commands run after a job ends (`hooks: {on_done: [...], on_failed: [...]}`).

A hook is an argv list from the config (never from a job file), run without a shell, with
`{manifest}`, `{job_id}`, ... (config.HOOK_FIELDS) filled into its arguments and the same values
in its environment as `DIFFUSIOND_MANIFEST`, `DIFFUSIOND_JOB_ID`, ... . Hooks run one at a time,
in the order jobs ended, on a thread of their own: a slow or hung hook never delays generation.
Its output is logged line by line with the job's journal fields; a non-zero exit is logged and
counted (status.json `counters.hooks_failed`); a hook past `timeout_s` is killed with every
process it started (its own process group). A hook never fails, delays or repeats its job.

A hook runs at most once: one still queued when the daemon dies is not run after the restart
(a tool that must see every job watches the outbox, or takes a webhook).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from diffusiond.daemon.config import HOOK_FIELDS, Config
from diffusiond.daemon.journal import job_fields
from diffusiond.daemon.outbox import failure_records
from diffusiond.daemon.threads import name_os_thread

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HookRun:
    """One hook to run: which, for which job, with what values."""

    name: str
    """`on_done` or `on_failed`."""
    argv: tuple[str, ...]
    values: dict[str, str]
    timeout_s: float


def hook_for(event: dict[str, Any], config: Config) -> HookRun | None:
    """The hook a board event calls for (a `done` or `failed` event), or None."""
    kind = event.get("event")
    argv = config.hooks.on_done if kind == "done" else config.hooks.on_failed if kind == "failed" else []
    if not argv:
        return None
    job_id = str(event.get("job_id") or "")
    if kind == "done":
        manifest = str(config.outbox / f"{job_id}.json")
    else:  # the (first failed job's) failure record, where there is one
        claim_id = str(event.get("claim_id") or job_id)
        records = failure_records(config.outbox, claim_id) if config.outbox_failures else []
        manifest = str(records[0]) if records else ""
    values = {
        "manifest": manifest,
        "job_id": job_id,
        "claim_id": str(event.get("claim_id") or job_id),
        "source": str(event.get("source") or ""),
        "outbox": str(config.outbox),
        "report": str(event.get("report") or ""),
        "event": str(kind),
    }
    assert set(values) == set(HOOK_FIELDS)
    name = "on_done" if kind == "done" else "on_failed"
    return HookRun(name, tuple(argv), values, config.hooks.timeout_s)


class Hooks:
    """The hook thread: `submit` queues a run (from any thread), `close` runs what is queued, then stops."""

    def __init__(self, *, on_failure: Callable[[], None] | None = None) -> None:
        self._queue: queue.Queue[HookRun | None] = queue.Queue()
        self._on_failure = on_failure
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the thread now (the daemon does, before it blocks its signals: hooks must not inherit that)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="hooks", daemon=True)
                self._thread.start()

    def submit(self, run: HookRun) -> None:
        self.start()  # a daemon in a thread (tests) starts it with the first hook
        self._queue.put(run)

    def close(self) -> None:
        """Run the hooks still queued (each within its timeout), then end the thread."""
        with self._lock:
            thread = self._thread
        if thread is not None:
            self._queue.put(None)
            while thread.is_alive():  # timed: the main thread handles signals between waits
                thread.join(0.5)

    def _serve(self) -> None:
        name_os_thread("hooks")
        while (run := self._queue.get()) is not None:
            try:
                ok = execute(run)
            except Exception:  # a bug here must not end the thread: later hooks still run
                log.exception("internal error running the %s hook for %s", run.name, run.values["job_id"])
                ok = False
            if not ok and self._on_failure is not None:
                self._on_failure()


def execute(run: HookRun) -> bool:
    """Run one hook to its end or its timeout; True when it exited 0. Never raises for the hook's faults."""
    values = run.values
    fields = job_fields(job_id=values["job_id"] or None, job_file=values["source"] or None)
    argv = [argument.format_map(values) for argument in run.argv]
    env = os.environ | {f"DIFFUSIOND_{key.upper()}": value for key, value in values.items()}
    label = f"{run.name} hook for {values['job_id']}"
    try:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: a timeout kills what it started too
        )
    except OSError as exc:
        log.warning("%s: cannot start %s: %s", label, argv[0], exc, extra=fields)
        return False
    assert process.stdout is not None
    reader = threading.Thread(target=_log_lines, args=(process.stdout, label, fields), name="hook-output", daemon=True)
    reader.start()
    try:
        code = process.wait(run.timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(process.pid)
        process.wait()
        reader.join(5)
        log.warning("%s: still running after %g s (hooks.timeout_s): killed", label, run.timeout_s, extra=fields)
        return False
    reader.join(5)
    if code != 0:
        log.warning("%s: exited with %d", label, code, extra=fields)
        return False
    log.info("%s: done", label, extra=fields)
    return True


def _log_lines(stream: Any, label: str, fields: dict[str, str]) -> None:
    with stream:
        for raw in iter(stream.readline, b""):
            log.info("%s: %s", label, raw.decode(errors="replace").rstrip("\n"), extra=fields)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
