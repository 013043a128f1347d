"""Slots and leases without Ray: a zombie slot is fenced and steps down, a lost daemon's claims are taken
over once, and a job that takes its host down goes to failed/ as `node_lost` after 3 takeovers.

Real daemon processes on the stand-in generator, real SIGSTOP/SIGCONT and SIGKILL, one spool.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

from diffusiond.daemon.faults import ENV
from diffusiond.pipeline.testmodel import TestModelPaths
from tests.conftest import CEILING_S, Spool, figure, hold, start_daemon_process, wait_for, write_config
from tests.spool_checks import check_spool
from tests.test_crash_and_stop import stop


def ready(state: Path, process: subprocess.Popen[str]) -> None:
    """Wait until the daemon process with state dir `state` says ready."""

    def is_ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"the daemon exited with {process.returncode}: {stop(process)}")
        try:
            return json.loads((state / "status.json").read_text())["state"] == "ready"
        except (OSError, ValueError, KeyError):
            return False

    wait_for(is_ready, what=f"{state.name} ready")


def slot(spool: Spool, name: str, tmp_path: Path, standin: dict[str, Any], *extra: str) -> subprocess.Popen[str]:
    """A daemon process as instance `name`, with a state dir of its own (as a cluster slot has on its node)."""
    state = tmp_path / f"state-{name}-{len(list(tmp_path.glob(f'state-{name}*')))}"
    process = start_daemon_process(
        spool.config_path, "--instance", name, "--state-dir", str(state), *extra, standin=standin
    )
    ready(state, process)
    return process


def terminate(*processes: subprocess.Popen[str] | None) -> None:
    """A warm stop of each daemon still running (SIGCONT first: it may be frozen); each must exit 0."""
    for process in processes:
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.send_signal(signal.SIGTERM)
            assert process.wait(CEILING_S) == 0, stop(process)


def claim_folders(spool: Spool, instance: str) -> list[Path]:
    work = spool.root / "work" / instance
    return sorted(p for p in work.iterdir() if p.is_dir() and not p.name.startswith(".")) if work.is_dir() else []


def test_a_zombie_slot_is_fenced_publishes_nothing_and_steps_down(spool: Spool, tmp_path: Path) -> None:
    """Two daemon loops with one slot name: the first, paused mid-job (a frozen node), is replaced by a
    second started with --take-over (Ray restarting the slot elsewhere); the first, thawed, finishes its
    job's steps but publishes nothing, sees the owner record name the second, and stops by itself."""
    gate = tmp_path / "gate"
    first = slot(spool, "gpu-00", tmp_path, hold(gate), "--take-over")
    second = None
    try:
        spool.drop("held.yaml", "prompt: frozen mid-way\nseed: 8\n")
        wait_for(lambda: list(gate.glob("held-*")), what="the job held")
        first.send_signal(signal.SIGSTOP)
        second = slot(spool, "gpu-00", tmp_path, {}, "--take-over")
        [manifest] = wait_for(spool.manifests, what="the second owner's manifest")
        assert (manifest["seeds"], manifest["attempt"], manifest["instance"]) == ([8], 2, "gpu-00")
        (gate / "release").touch()
        first.send_signal(signal.SIGCONT)
        output = stop(first)  # it exits by itself
        assert first.returncode == 0, output
        assert "another daemon took this work folder over" in output and "stepped down" in output, output
        assert "fenced" in output, output
        spool.drop("later.yaml", "prompt: after the thaw\nseed: 9\n")
        wait_for(lambda: len(spool.manifests()) == 2, what="the new owner serving on")
    finally:
        first.send_signal(signal.SIGCONT)
        first.kill()
        terminate(second)
    assert sorted(m["source"] for m in spool.manifests()) == ["held.yaml", "later.yaml"]
    check_spool(
        spool,
        {"held.yaml": b"prompt: frozen mid-way\nseed: 8\n", "later.yaml": b"prompt: after the thaw\nseed: 9\n"},
        jobs=2,
    )


def test_a_frozen_daemons_claim_is_taken_over_once_by_another(
    spool: Spool, test_models: TestModelPaths, tmp_path: Path
) -> None:
    """Daemon a, frozen mid-job, stops touching its lease; daemon b takes its claim over (judged by the
    file server's clock) and publishes it; a, thawed, finds the claim fenced and publishes nothing."""
    write_config(spool.root, test_models, lease_timeout_s=1.0)
    gate = tmp_path / "gate"
    frozen = slot(spool, "a", tmp_path, hold(gate))
    other = None
    try:
        spool.drop("held.yaml", "prompt: lost with its host\nseed: 4\n")
        wait_for(lambda: list(gate.glob("held-*")), what="the job held")
        frozen.send_signal(signal.SIGSTOP)
        other = slot(spool, "b", tmp_path, {})
        [manifest] = wait_for(spool.manifests, what="the taken-over job's manifest")
        assert (manifest["instance"], manifest["attempt"], manifest["seeds"]) == ("b", 2, [4])
        (gate / "release").touch()
        frozen.send_signal(signal.SIGCONT)
        state = tmp_path / "state-a-0"
        wait_for(lambda: "fenced" in (state / "events.jsonl").read_text(), what="a's fenced event")
        spool.drop("next.yaml", "prompt: both alive again\nseed: 5\n")
        wait_for(lambda: len(spool.manifests()) == 2, what="the next job")
    finally:
        terminate(frozen, other)
    assert sorted(m["source"] for m in spool.manifests()) == ["held.yaml", "next.yaml"]
    check_spool(
        spool,
        {"held.yaml": b"prompt: lost with its host\nseed: 4\n", "next.yaml": b"prompt: both alive again\nseed: 5\n"},
        jobs=2,
    )
    figure("lease takeover: a frozen daemon's claim published once by another, the thawed one fenced")


def test_a_job_that_takes_its_host_down_fails_as_node_lost_after_3_takeovers(
    spool: Spool, test_models: TestModelPaths, tmp_path: Path
) -> None:
    """A poison job kills each daemon that runs it (SIGKILL, as a host that dies would): three daemons
    take it over in turn and die; the fourth takeover sends it to failed/ with `node_lost`."""
    write_config(spool.root, test_models, lease_timeout_s=1.0)
    poison = {"kill": ["poison"]}
    daemons = [slot(spool, f"host{n}", tmp_path, poison) for n in range(4)]
    try:
        spool.drop("poison.yaml", "prompt: poison\nseed: 1\n")
        report = wait_for(lambda: spool.reports(), what="the node_lost report")[0]
        spool.drop("fine.yaml", "prompt: a healthy job\nseed: 2\n")
        wait_for(spool.manifests, what="the fine job, on the survivor")
        dead = [d for d in daemons if d.poll() is not None]
        assert [d.returncode for d in dead] == [-signal.SIGKILL] * 3
    finally:
        terminate(*daemons)
    assert report["code"] == "node_lost", report
    assert "stopped answering 3 times" in report["error"]
    check_spool(
        spool,
        {"poison.yaml": b"prompt: poison\nseed: 1\n", "fine.yaml": b"prompt: a healthy job\nseed: 2\n"},
        jobs=1,
        failed={"poison.yaml"},
    )
    figure("poison job: 3 daemons killed in turn, then failed/ with node_lost")


def test_a_kill_right_after_a_takeover_then_a_restart_completes_the_claim(
    spool: Spool, test_models: TestModelPaths, tmp_path: Path
) -> None:
    """The taker dies between renaming the lost claim into its folder and resuming it: its next start
    finds the claim in its own work folder and finishes it, once."""
    write_config(spool.root, test_models, lease_timeout_s=1.0)
    gate = tmp_path / "gate"
    lost = slot(spool, "lost", tmp_path, hold(gate))
    spool.drop("held.yaml", "prompt: taken over, then the taker dies\nseed: 6\n")
    wait_for(lambda: list(gate.glob("held-*")), what="the job held")
    lost.kill()
    lost.wait(CEILING_S)
    taker = start_daemon_process(
        spool.config_path,
        "--instance",
        "taker",
        "--state-dir",
        str(tmp_path / "taker"),
        standin={},
        env={ENV: "after_takeover"},
    )
    output = stop(taker)
    assert taker.returncode == -signal.SIGKILL and "fault point after_takeover" in output, output
    [folder] = claim_folders(spool, "taker")
    assert json.loads((folder / "claim.json").read_text())["takeovers"] == 1
    again = start_daemon_process(
        spool.config_path, "--instance", "taker", "--state-dir", str(tmp_path / "taker"), "--oneshot", standin={}
    )
    assert again.wait(CEILING_S) == 0, stop(again)
    [manifest] = spool.manifests()
    assert (manifest["instance"], manifest["seeds"]) == ("taker", [6])
    assert manifest["attempt"] == 2, "the lost daemon's run, then the taker's second start"
    check_spool(spool, {"held.yaml": b"prompt: taken over, then the taker dies\nseed: 6\n"}, jobs=1)
