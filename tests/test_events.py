"""`diffusiond events`: the event stream for tools and people, from a real daemon process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

from diffusiond.daemon.status import StatusBoard, read_events
from tests.conftest import CEILING_S, REPO, Spool, start_daemon_process, wait_for, wait_until_ready


def events_command(spool: Spool, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "diffusiond.daemon.cli", "events", "--config", str(spool.config_path), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=CEILING_S, cwd=REPO)


def test_every_event_names_its_job_and_a_job_can_be_picked_out(spool: Spool) -> None:
    process = start_daemon_process(spool.config_path, standin={"fail": {"breaks": "the stand-in broke"}})
    try:
        wait_until_ready(spool.config_path, process)
        spool.drop("fine.yaml", "prompt: fine\nseed: 1\n")
        spool.drop("breaks.yaml", "prompt: breaks\nseed: 2\n")
        spool.drop("typo.yaml", "promt: typo\n")
        wait_for(lambda: len(spool.manifests()) == 1 and len(spool.reports()) == 2, what="one done, two failed")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(CEILING_S)
    listed = events_command(spool, "--json")
    assert listed.returncode == 0, listed.stderr
    events = [json.loads(line) for line in listed.stdout.splitlines()]
    jobs = [e for e in events if e["event"] not in ("state", "queue", "reload")]
    assert jobs and all(e.get("job_id") for e in jobs), [e for e in jobs if not e.get("job_id")]
    [manifest] = spool.manifests()
    fine = [e["event"] for e in events if e.get("job_id") == manifest["job_id"]]
    assert fine[0] == "claimed" and fine[1] == "started" and fine[-1] == "done" and "progress" in fine
    failed = {e["source"]: e for e in events if e["event"] == "failed"}
    assert failed.keys() == {"breaks.yaml", "typo.yaml"}
    assert failed["typo.yaml"]["code"] == "invalid_field" and failed["typo.yaml"]["job_id"].startswith("typo-")

    picked = events_command(spool, "--json", "--job", manifest["job_id"])
    assert {json.loads(line)["job_id"] for line in picked.stdout.splitlines()} == {manifest["job_id"]}
    human = events_command(spool, "--job", manifest["job_id"]).stdout.splitlines()
    assert [line.split()[1] for line in human][:2] == ["claimed", "started"]
    assert f"done      {manifest['job_id']}  in " in human[-1] and manifest["outputs"][0]["file"] in human[-1]


def test_follow_prints_events_as_they_come_and_stops_quietly(spool: Spool) -> None:
    process = start_daemon_process(spool.config_path, standin={})
    command = [sys.executable, "-m", "diffusiond.daemon.cli", "events", "--config", str(spool.config_path)]
    follower = subprocess.Popen([*command, "--follow", "--json"], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        wait_until_ready(spool.config_path, process)
        spool.drop("later.yaml", "prompt: later\n")
        assert follower.stdout is not None
        seen: list[dict] = []
        lines = threading.Thread(target=lambda: seen.extend(map(json.loads, follower.stdout or [])), daemon=True)
        lines.start()
        wait_for(lambda: any(e["event"] == "done" for e in seen), what="the done event, followed")
        assert next(e for e in seen if e["event"] == "done")["source"] == "later.yaml"
        follower.send_signal(signal.SIGTERM)
        assert follower.wait(CEILING_S) == 0
    finally:
        follower.kill()
        process.send_signal(signal.SIGTERM)
        process.wait(CEILING_S)
    assert events_command(spool, "--state-dir", str(spool.root / "nowhere")).returncode == 2


def test_a_follower_reads_on_across_the_rotation_of_the_events_file(tmp_path: Path) -> None:
    board = StatusBoard(tmp_path, events_max_bytes=400)
    follow = read_events(tmp_path, follow=True, poll_s=0.01)
    got: list[dict] = []

    def collect() -> None:
        for event in follow:
            got.append(event)

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    for n in range(1, 41):  # each written once the follower has the one before: rotations in between
        board.queue(n)
        wait_for(lambda n=n: got and got[-1].get("length") == n, what=f"event {n}")
    assert [e["length"] for e in got if e["event"] == "queue"] == list(range(1, 41))
    assert (tmp_path / "events.jsonl.1").exists(), "the file rotated during the test"
