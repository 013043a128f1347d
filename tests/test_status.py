"""status.json (atomic, throttled), events.jsonl (ordered, bounded) and `diffusiond status`."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from diffusiond.daemon.status import EVENTS_FILE, STATUS_FILE, StatusBoard, is_running
from tests.conftest import CEILING_S


def _events(state: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (state / EVENTS_FILE).read_text().splitlines()]


def _status(state: Path) -> dict[str, Any]:
    return json.loads((state / STATUS_FILE).read_text())


def test_a_reader_never_sees_a_partial_status_file(tmp_path: Path) -> None:
    board = StatusBoard(tmp_path, write_interval_s=0)  # every step rewrites status.json
    board.started("hamster-1", "hamster.yaml", "txt2img", "sd15", steps=300)
    seen: list[int] = []
    errors: list[Exception] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                seen.append(_status(tmp_path)["current"]["step"])
            except Exception as exc:
                errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    for step in range(1, 301):
        board.progress("hamster-1", step, 300)
    stop.set()
    reader.join()
    assert not errors
    assert len(seen) > 10 and seen == sorted(seen)
    assert _status(tmp_path)["current"]["step"] == 300


def test_events_parse_in_order_and_status_tells_the_whole_story(tmp_path: Path) -> None:
    board = StatusBoard(tmp_path, keep=3)
    board.state("ready")
    board.queue(2)
    board.queue(2)  # unchanged: not recorded
    board.claimed("c1", "hamster.yaml")
    board.started("hamster-1", "hamster.yaml", "txt2img", "sd15", steps=2)
    board.progress("hamster-1", 1, 2)
    board.progress("hamster-1", 2, 2)
    board.done("hamster-1", "hamster.yaml", ["outbox/hamster-1-0.png", "outbox/hamster-1-1.png"], seconds=1.5)
    board.failed("bad.yaml", "job_rejected", "steps: 0 is below 1", "failed/bad.error.yaml")
    for n in range(5):
        board.done(f"x-{n}", "x.yaml", [f"outbox/x-{n}.png"], seconds=0.1)
    board.state("stopped")

    events = _events(tmp_path)
    names = [e["event"] for e in events]
    assert names == ["state", "queue", "claimed", "started", "progress", "progress", "done", "failed"] + [
        "done"
    ] * 5 + ["state"]
    assert [e["time"] for e in events] == sorted(e["time"] for e in events)
    assert events[3] == events[3] | {"job_id": "hamster-1", "task": "txt2img", "model": "sd15", "steps": 2}

    status = _status(tmp_path)
    assert (status["pid"], status["state"], status["queue"], status["current"]) == (os.getpid(), "stopped", 2, None)
    assert status["counters"] == {
        "claimed": 1,
        "started": 1,
        "done": 6,
        "failed": 1,
        "cancelled": 0,
        "images": 7,
        "hooks_failed": 0,
    }
    assert [r["job_id"] for r in status["last_results"]] == ["x-2", "x-3", "x-4"]  # keep=3
    assert status["last_failures"][0]["report"] == "failed/bad.error.yaml"


def test_progress_lines_are_throttled_but_the_last_step_is_written(tmp_path: Path) -> None:
    board = StatusBoard(tmp_path, progress_interval_s=60, write_interval_s=0.2)
    board.started("big-1", "big.yaml", "txt2img", "sd15", steps=1000)
    for step in range(1, 1001):
        board.progress("big-1", step, 1000)
    progress = [e for e in _events(tmp_path) if e["event"] == "progress"]
    assert [e["step"] for e in progress] == [1, 1000]
    written = _status(tmp_path)["current"]["step"]
    assert written < 1000  # the steps after the first write were held back by the throttle ...
    board.flush_due()
    assert _status(tmp_path)["current"]["step"] == written  # ... and stay held until the interval is up,
    time.sleep(0.25)
    board.flush_due()
    assert _status(tmp_path)["current"]["step"] == 1000  # then the service loop's flush writes the last one


def test_a_stream_of_changes_writes_status_at_most_once_per_interval(tmp_path: Path) -> None:
    """A stream of short jobs rewrote status.json five times a job; now it is twice a second at most."""
    board = StatusBoard(tmp_path, write_interval_s=0.3)
    board.state("ready")
    writes: set[str] = set()
    for n in range(50):
        board.claimed(f"c{n}", f"job-{n}.yaml")
        board.started(f"job-{n}-1", f"job-{n}.yaml", "txt2img", "test", steps=2)
        board.progress(f"job-{n}-1", 2, 2)
        board.done(f"job-{n}-1", f"job-{n}.yaml", [f"outbox/job-{n}-1.png"], seconds=0.01)
        board.flush_due()
        writes.add(_status(tmp_path)["updated"])  # each write stamps the time, to the millisecond
    assert len(writes) <= 2  # the first change, and at most one flush: 50 jobs take far less than 0.3 s
    assert _status(tmp_path)["counters"]["done"] < 50
    time.sleep(0.35)
    board.flush_due()
    assert _status(tmp_path)["counters"] == {
        "claimed": 50,
        "started": 50,
        "done": 50,
        "failed": 0,
        "cancelled": 0,
        "images": 50,
        "hooks_failed": 0,
    }
    assert len([e for e in _events(tmp_path) if e["event"] == "done"]) == 50  # events are never held back


def test_events_file_is_rotated_when_over_its_size(tmp_path: Path) -> None:
    board = StatusBoard(tmp_path, events_max_bytes=2_000)
    for n in range(100):
        board.claimed(f"c{n}", f"job-{n}.yaml")
    assert (tmp_path / EVENTS_FILE).stat().st_size <= 2_000
    older = [json.loads(line) for line in (tmp_path / f"{EVENTS_FILE}.1").read_text().splitlines()]
    newer = _events(tmp_path)
    assert newer[-1]["claim_id"] == "c99"
    assert int(older[-1]["claim_id"][1:]) + 1 == int(newer[0]["claim_id"][1:])  # nothing lost between the two


def test_a_reused_pid_is_not_our_daemon(tmp_path: Path) -> None:
    status = StatusBoard(tmp_path).snapshot()
    assert is_running(status)
    if status["pid_start"] is not None:  # /proc tells start times apart
        assert not is_running(status | {"pid_start": "1"})


def _cli(spool: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "diffusiond.daemon.cli", "status", "--spool", str(spool), *args],
        capture_output=True,
        text=True,
        timeout=CEILING_S,
    )


def test_status_command_shows_the_running_job_and_exits_by_liveness(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    state = spool / ".state" / socket.gethostname()  # the default state dir (of the default instance)
    board = StatusBoard(state)  # this test process plays the daemon
    board.state("ready")
    board.started("hamster-1", "hamster.yaml", "txt2img", "sd15", steps=30)
    board.progress("hamster-1", 12, 30)
    board.failed("bad.yaml", "job_rejected", "steps: 0 is below 1", str(spool / "failed/bad.error.yaml"))
    board.flush()  # what the daemon's loop does within `write_interval_s`

    live = _cli(spool)
    assert live.returncode == 0, live.stderr
    assert "ready since" in live.stdout and f"pid {os.getpid()}" in live.stdout
    assert "hamster-1 (txt2img, model sd15) from hamster.yaml: step 12 of 30" in live.stdout
    assert "bad.error.yaml" in live.stdout
    as_json = _cli(spool, "--json")
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["current"]["step"] == 12

    path = state / STATUS_FILE
    path.write_text(json.dumps(_status(state) | {"pid": _dead_pid()}))  # as if killed -9
    dead = _cli(spool)
    assert dead.returncode == 1, dead.stdout + dead.stderr
    assert "not running" in dead.stdout and "did not stop cleanly" in dead.stdout

    board.state("stopped")
    stopped = _cli(spool)
    assert stopped.returncode == 1 and "stopped at" in stopped.stdout


def _dead_pid() -> int:
    """The pid of a process that has finished (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_status_command_without_a_status_file(tmp_path: Path) -> None:
    missing = _cli(tmp_path)
    assert missing.returncode == 2
    assert "is the daemon running with this config" in missing.stderr


def test_a_running_daemon_keeps_status_and_events_current(spool) -> None:
    """Through a real daemon on the stand-in: status.json says ready and counts the job; events tell its life."""
    import json as _json

    from diffusiond.pipeline.standin import StandInGenerator
    from tests.conftest import start_daemon_thread, wait_for

    state = spool.root / "state"
    with start_daemon_thread(spool, StandInGenerator()):
        spool.drop("told.yaml", "prompt: tell me\nseed: 4\nsteps: 3\n")
        wait_for(spool.manifests, what="a manifest")
        status = wait_for(
            lambda: (
                (state / "status.json").exists()
                and (s := _json.loads((state / "status.json").read_text()))["counters"].get("done")
                and s
            ),
            what="status.json counting the job",
        )
        assert status["state"] == "ready"
    lines = [_json.loads(line) for line in (state / "events.jsonl").read_text().splitlines()]
    events = [line["event"] for line in lines]
    lifecycle = [e for e in events if e in ("claimed", "started", "progress", "done")]
    assert lifecycle[0] == "claimed" and lifecycle[1] == "started" and lifecycle[-1] == "done"
    assert "progress" in lifecycle
    assert (lines[-1]["event"], lines[-1]["state"]) == ("state", "stopped"), "the daemon has stopped: its last word"


def test_status_lists_claims_waiting_and_inbox_files_with_why_they_wait(spool, test_models) -> None:
    """A held job runs; one claimed behind it; in the inbox a job file short of its image, a bare image
    waiting for a job file, and a file still being written: `diffusiond status` says each, with its age."""
    from diffusiond.pipeline.standin import Gate, StandInGenerator
    from tests.conftest import FAST_WATCH, start_daemon_thread, wait_for, write_config

    write_config(spool.root, test_models, watch=FAST_WATCH | {"settle_s": 600.0, "pair_wait_s": 600.0})
    gate = Gate(prompt="first")
    with start_daemon_thread(spool, StandInGenerator(gate=gate)):
        try:
            spool.drop("first.yaml", "prompt: first\n")
            assert gate.held.wait(CEILING_S)
            spool.drop("second.yaml", "prompt: second\n")
            spool.drop("pic.yaml", "task: img2img\nimage: pic.png\nprompt: a picture\n")
            spool.drop("lone.png", _png())
            with (spool.inbox / "slow.yaml").open("w") as writing:  # written in place, not renamed in: it settles
                writing.write("prompt: slow\n")

            def shown() -> dict[str, Any] | None:
                status = _status(spool.root / "state")
                reasons = {f["file"]: f["reason"] for f in status["inbox"]["files"]}
                queued = [q["source"] for q in status["queued"]]
                return status if queued == ["second.yaml"] and len(reasons) == 3 else None

            status = wait_for(shown, what="status.json listing the queue and the inbox")
            reasons = {f["file"]: f["reason"] for f in status["inbox"]["files"]}
            assert reasons["pic.yaml"] == "waiting for its image 'pic.png' (up to 600 s)"
            assert reasons["lone.png"].startswith("waiting up to 600 s for a job file")
            assert reasons["slow.yaml"] == "settling: still being written"
            assert status["inbox"]["count"] == 3 and [j["source"] for j in status["running"]] == ["first.yaml"]
            text = _cli(spool.root, "--state-dir", str(spool.root / "state")).stdout
            assert "  queue    1 claimed, waiting for the worker\n    second.yaml  (" in text
            assert "  inbox    3 not claimed yet\n" in text
            assert re.search(r"\n    pic\.yaml  \(\d+ s\): waiting for its image 'pic\.png' \(up to 600 s\)\n", text), (
                text
            )
        finally:
            gate.release()
        wait_for(lambda: _status(spool.root / "state")["queued"] == [], what="the queued claim to run")


def _png() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(out, "PNG")
    return out.getvalue()


def test_status_survives_a_closed_pipe_and_watch_redraws_each_change(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    board = StatusBoard(spool / ".state" / socket.gethostname(), keep=2000)
    board.state("ready")
    for n in range(2000):  # far more text than a pipe holds
        board.done(f"job-{n}", f"job-{n}.yaml", [f"outbox/job-{n}.png"], 1.0)
    board.flush()
    cli = [sys.executable, "-m", "diffusiond.daemon.cli", "status", "--spool", str(spool)]
    piped = subprocess.run(f"{' '.join(cli)} | head -n 1", shell=True, capture_output=True, text=True, timeout=60)
    assert piped.stdout.startswith("diffusiond: ready since") and piped.stderr == "", piped.stderr

    watching = subprocess.Popen([*cli, "--watch", "0.1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert watching.stdout is not None
        first = watching.stdout.readline()
        assert first.startswith("diffusiond: ready since"), first
        board.state("stopping")
        while not (line := watching.stdout.readline()).startswith("diffusiond: stopping since"):
            assert line, "status --watch ended without showing the change"
    finally:
        # SIGTERM, which `--watch` takes as Ctrl-C: a shell's background job ignores SIGINT, and so do its children.
        watching.send_signal(__import__("signal").SIGTERM)
        _out, err = watching.communicate(timeout=CEILING_S)
    assert watching.returncode == 0 and "Traceback" not in err, err


def test_status_finds_the_state_dir_a_daemon_was_run_with(spool, test_models) -> None:
    """A unit runs `run --state-dir DIR` with a config that names none: `status --config` still finds it."""
    from tests.conftest import start_daemon_process, wait_for, write_config

    config = write_config(spool.root, test_models, state_dir=None)
    elsewhere = spool.root.parent / "var-lib-state"
    daemon = start_daemon_process(config, "--state-dir", str(elsewhere), standin={})
    try:
        wait_for(lambda: (elsewhere / STATUS_FILE).exists() and _status(elsewhere)["state"] == "ready", what="ready")
        found = subprocess.run(
            [sys.executable, "-m", "diffusiond.daemon.cli", "status", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=CEILING_S,
        )
        assert found.returncode == 0 and f"(pid {daemon.pid})" in found.stdout, found.stdout + found.stderr
    finally:
        daemon.terminate()
        daemon.communicate(timeout=CEILING_S)
    stopped = subprocess.run(
        [sys.executable, "-m", "diffusiond.daemon.cli", "status", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=CEILING_S,
    )
    assert stopped.returncode == 1 and "stopped at" in stopped.stdout, "after it stopped too"
