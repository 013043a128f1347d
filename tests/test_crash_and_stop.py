"""Crashes and stops with real subprocesses and real signals: nothing lost, nothing doubled, nothing half-written.

The daemons run on the stand-in generator (tests/standin_daemon.py): its gate holds the job a test
kills or stops at a step, so the signal lands mid-job on any machine, however fast or busy.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

from tests.conftest import CEILING_S, Spool, hold, start_daemon_process, wait_for, wait_until_ready

THREE_JOBS = (
    "prompt: quick one\nseed: 1\nsteps: 2\n---\n"
    "prompt: slow one\nseed: 2\nsize: 256x256\nsteps: 60\ncount: 2\n---\n"
    "prompt: quick two\nseed: 3\nsteps: 2\n"
)
STANDIN: dict[str, Any] = {}
"""The stand-in with no gate: every job runs straight through."""


def held(gate: Path) -> list[Path]:
    return list(gate.glob("held-*"))


def claim_folder(spool: Spool) -> Path | None:
    folders = spool.claims()
    return folders[0] if len(folders) == 1 else None


def stop(process: subprocess.Popen[str]) -> str:
    try:
        output, _ = process.communicate(timeout=CEILING_S)
    finally:
        process.kill()
    return output


def run_oneshot(spool: Spool, standin: dict[str, Any] | None = STANDIN) -> None:
    """The restart: the same config, once over what is there, on the stand-in (None: real diffusers).

    It exits 1 when an input it ended failed (a scenario's bad file may fail before the kill or after
    it), else 0: its last log line says how many failed."""
    restarted = start_daemon_process(spool.config_path, "--oneshot", standin=standin)
    code = restarted.wait(CEILING_S)
    output = stop(restarted)
    found = re.search(r"stopped: \d+ claims finished, (\d+) failed", output)
    assert found is not None and code == (1 if int(found[1]) else 0), output


def test_kill_9_mid_job_then_restart_loses_nothing_and_doubles_nothing(spool: Spool, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    spool.drop("three.yaml", THREE_JOBS)
    process = start_daemon_process(spool.config_path, standin=hold(gate, "slow one"))
    try:
        folder = wait_for(lambda: claim_folder(spool), what="the claim folder")
        wait_for(lambda: held(gate), what="job 2 held at its first step")
        wait_for(lambda: list(spool.outbox.glob("*.json")), what="job 1 published")
        first = json.loads(next(spool.outbox.glob("*.json")).read_text())
        process.send_signal(signal.SIGKILL)  # while job 2 is held mid-way
        process.wait(CEILING_S)
    finally:
        process.kill()
    assert len(spool.manifests()) == 1, "the kill landed while job 2 ran"
    assert (folder / "inbox" / "three.yaml").exists(), "the claimed input survives the crash"
    saved = json.loads((folder / "jobs.json").read_text())

    run_oneshot(spool)
    manifests = sorted(spool.manifests(), key=lambda m: m["index"])
    assert [m["index"] for m in manifests] == [1, 2, 3]
    assert manifests[0] == first, "job 1 finished before the crash and must not run again"
    assert [m["seeds"] for m in manifests] == [[1], [2, 3], [3]]
    assert [s["spec"]["seed"] for s in saved] == [1, 2, 3]
    expected = sorted([o["file"] for m in manifests for o in m["outputs"]] + [f"{m['job_id']}.json" for m in manifests])
    assert spool.visible_outputs() == expected, "no duplicate and no partial output"
    assert not [p for p in spool.outbox.iterdir() if p.name.startswith(".")], "no temp files left behind"
    assert (spool.archive / "three.yaml").read_text() == THREE_JOBS
    assert spool.claims() == []


def test_kill_9_before_any_output_reruns_with_the_recorded_seed(spool: Spool, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    spool.drop("one.yaml", "prompt: no seed given\nsize: 256x256\nsteps: 60\n")
    process = start_daemon_process(spool.config_path, standin=hold(gate))
    try:
        folder = wait_for(lambda: claim_folder(spool), what="the claim folder")
        wait_for(lambda: held(gate), what="the job held at its first step")
        jobs = json.loads((folder / "jobs.json").read_text())
        process.send_signal(signal.SIGKILL)
        process.wait(CEILING_S)
    finally:
        process.kill()
    assert spool.manifests() == []
    run_oneshot(spool)
    [manifest] = spool.manifests()
    assert manifest["seeds"] == [jobs[0]["spec"]["seed"]]


def test_sigterm_stops_the_running_job_at_a_step_and_puts_everything_back(spool: Spool, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    spool.drop("slow.yaml", "prompt: slow\nsize: 256x256\nsteps: 60\nseed: 9\n")
    process = start_daemon_process(spool.config_path, standin=hold(gate, "slow"))
    try:
        wait_for(lambda: held(gate), what="the slow job held at step 1 of 60")
        spool.drop("queued.yaml", "prompt: waits its turn\nseed: 10\n")  # dropped after: it waits behind it
        wait_for(lambda: len(spool.claims()) == 2, what="both claimed")
        process.send_signal(signal.SIGTERM)
        assert process.wait(CEILING_S) == 0
    finally:
        output = stop(process)
    assert "stopping the running job at its next step" in output
    assert spool.manifests() == [], "the slow job stopped between steps: nothing was written"
    assert sorted(p.name for p in spool.inbox.iterdir()) == ["queued.yaml", "slow.yaml"], "both back in the inbox"
    assert spool.claims() == []
    # The status agrees (R1): nothing listed as running, each claim's end one `released` event.
    state = spool.root / "state"
    final = json.loads((state / "status.json").read_text())
    assert (final["running"], final["queued"]) == ([], [])
    events = [json.loads(line) for line in (state / "events.jsonl").read_text().splitlines()]
    assert sorted(e["source"] for e in events if e["event"] == "released") == ["queued.yaml", "slow.yaml"]
    run_oneshot(spool)
    assert sorted(m["source"] for m in spool.manifests()) == ["queued.yaml", "slow.yaml"]
    assert next(m for m in spool.manifests() if m["source"] == "slow.yaml")["seeds"] == [9]


def test_polling_mode_sees_files_too(spool: Spool, test_models) -> None:
    from tests.conftest import write_config

    write_config(spool.root, test_models, watch={"mode": "poll"})
    process = start_daemon_process(spool.config_path, standin=STANDIN)
    try:
        wait_until_ready(spool.config_path, process)
        spool.drop("polled.yaml", "prompt: seen by polling\n")
        wait_for(spool.manifests, what="a manifest")
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(CEILING_S) == 0
    assert os.listdir(spool.inbox) == []


def test_crash_between_claim_record_and_rename_runs_the_job_once(spool: Spool) -> None:
    """The states a kill can leave inside `claim()`, made by hand, then a real restart."""
    work = spool.root / "work" / "test"
    # 1. Record written, rename not done: the file is still in the inbox.
    spool.drop("kept.yaml", "prompt: still in the inbox\n")
    recorded = work / "kept-20260101-000000-abcd"
    (recorded / "inbox").mkdir(parents=True)
    record = {"claim_id": recorded.name, "folder": None, "source": "kept.yaml", "files": ["kept.yaml"]}
    (recorded / "claim.json").write_text(json.dumps(record | {"bare_image": False, "problem": None, "claimed_at": 1.0}))
    # 2. Files moved but no readable record: they go back to the inbox.
    orphan = work / "orphan-20260101-000000-abcd"
    (orphan / "inbox").mkdir(parents=True)
    (orphan / "inbox" / "orphan.yaml").write_text("prompt: back to the inbox\n")
    run_oneshot(spool)
    assert sorted(m["source"] for m in spool.manifests()) == ["kept.yaml", "orphan.yaml"]
    assert spool.reports() == []
    assert spool.claims() == []


def test_a_torn_jobs_json_after_a_power_cut_is_validated_again(spool: Spool) -> None:
    """jobs.json is not fsynced: a power cut may leave it empty or cut off. Made by hand, then a real restart."""
    from diffusiond.daemon.claim import Claim

    work = spool.root / "work" / "test"
    for name, torn in [("empty", ""), ("cut", '[{"job_id": "cut-20260101-000000-abcd", "ind')]:
        folder = work / f"{name}-20260101-000000-abcd"
        (folder / "inbox").mkdir(parents=True)
        (folder / "inbox" / f"{name}.yaml").write_text(f"prompt: {name} before the power cut\nseed: 7\n")
        Claim(folder.name, folder, f"{name}.yaml", (f"{name}.yaml",), claimed_at=1.0).save()
        (folder / "jobs.json").write_text(torn)
    run_oneshot(spool)
    manifests = sorted(spool.manifests(), key=lambda m: m["source"])
    assert [(m["source"], m["seeds"]) for m in manifests] == [("cut.yaml", [7]), ("empty.yaml", [7])]
    assert spool.reports() == []
    assert spool.claims() == []
