"""`diffusiond cancel` (from another process, through the spool), `retry` and `priority:`, on a real daemon.

The daemon runs on the stand-in generator, whose gate holds a job at a step the way a slow
model would; `cancel` and `retry` run as the commands a user types.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from diffusiond.pipeline.standin import Gate, StandInGenerator
from tests.conftest import CEILING_S, FAST_WATCH, REPO, Spool, start_daemon_thread, wait_for, write_config


def cli(spool: Spool, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "diffusiond.daemon.cli", *args, "--config", str(spool.config_path)],
        capture_output=True,
        text=True,
        timeout=CEILING_S,
        cwd=REPO,
    )


def status(spool: Spool) -> dict[str, Any]:
    return json.loads((spool.root / "state" / "status.json").read_text())


def events(spool: Spool) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (spool.root / "state" / "events.jsonl").read_text().splitlines()]


def report(spool: Spool, name: str) -> dict[str, Any]:
    return yaml.safe_load((spool.failed / name).read_text())


def test_cancel_stops_a_running_job_at_a_step_and_ends_a_queued_one_and_an_inbox_one(spool: Spool, test_models) -> None:
    write_config(spool.root, test_models, watch=FAST_WATCH | {"pair_wait_s": 600.0})
    gate = Gate(prompt="slow")
    with start_daemon_thread(spool, StandInGenerator(gate=gate)):
        spool.drop("slow.yaml", "prompt: slow\nsteps: 30\n")
        assert gate.held.wait(CEILING_S), "the slow job never started"
        spool.drop("queued.yaml", "prompt: waits its turn\n")
        spool.drop("early.yaml", "task: img2img\nimage: early.png\nprompt: its image never comes\n")
        queued = wait_for(lambda: status(spool)["queued"], what="the second job claimed")[0]
        wait_for(lambda: status(spool)["inbox"]["count"] == 1, what="early.yaml waiting for its image")

        by_id = cli(spool, "cancel", queued["claim_id"], "--json")  # by id, while it waits for the worker
        assert by_id.returncode == 0 and json.loads(by_id.stdout)["status"] == "cancelled", by_id.stdout
        in_inbox = cli(spool, "cancel", str(spool.inbox / "early.yaml"))  # by its path, before it was claimed
        assert in_inbox.returncode == 0, in_inbox.stderr
        running = cli(spool, "cancel", "slow.yaml")  # by its file, while it runs (held at step 1 of 30)
        assert running.returncode == 0, running.stderr
        assert running.stdout.startswith("cancelled slow.yaml (slow-"), running.stdout

        spool.drop("after.yaml", "prompt: the daemon goes on\n")
        wait_for(lambda: [m for m in spool.manifests() if m["source"] == "after.yaml"], what="the next job")
        # status.json is rewritten at most every 0.5 s: the one that counts the job after the cancels
        final = wait_for(lambda: (s := status(spool))["counters"]["done"] == 1 and s, what="status counting it")
    assert {m["source"] for m in spool.manifests()} == {"after.yaml"}, "nothing cancelled made images"
    for name in ("slow", "queued", "early"):
        got = report(spool, f"{name}.error.yaml")
        assert (got["code"], got["file"]) == ("cancelled", f"{name}.yaml")
        assert got["fix"] == f"to run it after all: diffusiond retry {name}.yaml"
        assert (spool.failed / f"{name}.yaml").exists()
    assert spool.claims() == [] and not list(spool.inbox.iterdir())
    # status, events and the counts agree: three cancelled, none failed, nothing left running or queued
    assert final["counters"]["cancelled"] == 3 and final["counters"]["failed"] == 0
    assert (final["running"], final["queued"]) == ([], [])
    cancelled = sorted(e["source"] for e in events(spool) if e["event"] == "cancelled")
    assert cancelled == ["early.yaml", "queued.yaml", "slow.yaml"]
    assert not list((spool.root / ".cancel").iterdir()), "every request answered and removed"


def test_cancel_of_nothing_says_so_and_leaves_no_request(spool: Spool) -> None:
    with start_daemon_thread(spool, StandInGenerator()):
        missing = cli(spool, "cancel", "nope.yaml")
    assert missing.returncode == 1 and "nothing called 'nope.yaml'" in missing.stderr
    assert not list((spool.root / ".cancel").iterdir())
    no_daemon = cli(spool, "cancel", "nope.yaml")
    assert no_daemon.returncode == 4 and "no daemon is running" in no_daemon.stderr


def test_retry_puts_a_fixed_job_back_and_removes_its_report(spool: Spool, standin_daemon) -> None:
    spool.drop("sketches/cat.png", _png())
    spool.drop("sketches/cat.yaml", "prompt: a cat\nsteps: 0\n")  # wrong: rejected, with its sketch
    wait_for(lambda: (spool.failed / "cat.error.yaml").exists(), what="the report")
    assert report(spool, "cat.error.yaml")["field"] == "steps"
    (spool.failed / "cat.yaml").write_text("prompt: a cat\nsteps: 2\n")  # the user's fix

    retried = cli(spool, "retry", "cat.yaml")
    assert retried.returncode == 0, retried.stderr
    [manifest] = wait_for(spool.manifests, what="the fixed job's images")
    assert manifest["source"] == "sketches/cat.yaml" and manifest["job"]["steps"] == 2
    assert manifest["input_image"]["file"] == "sketches/cat.png", "the sketch went back to its folder with it"
    assert sorted(p.name for p in spool.failed.iterdir()) == [], "the report went with the retry"

    assert cli(spool, "retry", "cat.yaml").returncode == 1, "nothing of it is in failed/ any more"
    spool.drop("bad.yaml", "prompt: x\nstpes: 3\n")
    spool.drop("worse.yaml", "prompt: [\n")
    wait_for(lambda: len(spool.reports()) == 2, what="two reports")
    (spool.failed / "bad.yaml").write_text("prompt: x\nsteps: 3\n")
    only = cli(spool, "retry", "--all", "--code", "invalid_field")
    assert only.returncode == 0 and "retrying bad.yaml" in only.stdout, only.stdout + only.stderr
    wait_for(lambda: [m for m in spool.manifests() if m["source"] == "bad.yaml"], what="bad.yaml, fixed")
    assert [r["file"] for r in spool.reports()] == ["worse.yaml"], "the other code's failure stays"


def test_retry_never_moves_over_a_file_in_the_inbox(spool: Spool, standin_daemon, tmp_path: Path) -> None:
    spool.drop("dup.yaml", "prompt: x\nsteps: 0\n")
    wait_for(lambda: (spool.failed / "dup.error.yaml").exists(), what="the report")
    (spool.inbox / "dup.yaml").mkdir()  # a folder of that name: never a job, and not replaced
    refused = cli(spool, "retry", "dup.yaml")
    assert refused.returncode == 1 and "exists already" in refused.stderr
    assert (spool.failed / "dup.yaml").exists() and (spool.failed / "dup.error.yaml").exists()


def _png() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 120, 40)).save(out, "PNG")
    return out.getvalue()


def test_priority_claims_a_higher_one_first_then_the_older(spool: Spool) -> None:
    """Files waiting at start (a backlog): claim order by `priority:`, then by age; one run, exit 0."""
    import os
    import threading
    import time

    from diffusiond.daemon.service import Daemon

    now = time.time()
    for name, text, age_s in [
        ("old.yaml", "prompt: old\n", 300),
        ("urgent.yaml", "prompt: urgent\npriority: 5\n", 0),
        ("later.yaml", "prompt: a\n---\nprompt: b\npriority: 1\n", 100),  # a file's is its jobs' highest
        ("older.yaml", "prompt: older\n", 400),
    ]:
        os.utime(spool.drop(name, text), (now - age_s, now - age_s))
    daemon = Daemon(spool.config, oneshot=True, generator_factory=lambda _config: StandInGenerator())
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(daemon.run()))
    thread.start()
    thread.join(CEILING_S)
    assert codes == [0]
    claimed = [e["source"] for e in events(spool) if e["event"] == "claimed"]
    assert claimed == ["urgent.yaml", "later.yaml", "older.yaml", "old.yaml"]


def test_junk_in_the_cancel_folder_never_stops_or_hangs_the_daemon(spool: Spool, standin_daemon) -> None:
    """Whoever can write the spool can write `.cancel/`: links to endless devices, pipes, huge or wrong files."""
    import os

    folder = spool.root / ".cancel"
    folder.mkdir()
    os.symlink("/dev/zero", folder / "zero.json")
    os.mkfifo(folder / "pipe.json")
    (folder / "huge.json").write_text(json.dumps({"target": "x.yaml", "asked": 1e18, "pad": "x" * 200_000}))
    (folder / "asked.json").write_text(json.dumps({"target": "x.yaml", "asked": "yesterday"}))
    (folder / "list.json").write_text("[1, 2]")
    (folder / "zero.answer.json").symlink_to("/dev/zero")
    spool.drop("after.yaml", "prompt: still here\n")
    wait_for(lambda: [m for m in spool.manifests() if m["source"] == "after.yaml"], what="the next job")
    missing = cli(spool, "cancel", "nope.yaml")
    assert missing.returncode == 1, missing.stderr  # the daemon read the folder, and answered nothing
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["zero.json", "pipe.json", "huge.json", "asked.json", "list.json", "zero.answer.json"]
    ), "not requests: left alone"
