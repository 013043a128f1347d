"""kill -9 at every named fault point, then a restart: every input in one place, every job's outputs once.

The daemon kills itself with SIGKILL at the point named in `DIFFUSIOND_FAULT` (daemon/faults.py);
the restart runs the same config once over what is there. The daemons run on the stand-in
generator: the subject is the files, not the pixels (the last test runs real diffusers).
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from diffusiond.daemon import faults
from diffusiond.daemon.config import load_config
from diffusiond.daemon.faults import ENV, POINTS
from diffusiond.daemon.service import Daemon
from diffusiond.pipeline.standin import StandInGenerator
from tests.conftest import CEILING_S, Spool, figure, start_daemon_process, write_config
from tests.spool_checks import check_spool, check_status
from tests.test_crash_and_stop import run_oneshot, stop
from tests.test_end_to_end import sketch_png

KILLS = int(os.environ.get("DIFFUSIOND_SOAK_KILLS", "50"))
"""Randomized kills in the suite; `make soak` asks for more."""


def drop_scenario(spool: Spool, tag: str = "") -> dict[str, bytes]:
    """Two jobs of two images in one file, an img2img with its sketch, and a broken job file: 3 jobs."""
    files = {
        f"pair{tag}.yaml": b"prompt: one\nseed: 1\ncount: 2\n---\nprompt: two\nseed: 3\ncount: 2\n",
        f"fox{tag}.png": sketch_png(),
        f"fox{tag}.yaml": b"task: img2img\nprompt: a fox\nseed: 5\n",
        f"bad{tag}.yaml": b"prompt: [unclosed\n",
    }
    for name, data in files.items():
        spool.drop(name, data)
    return files


def crash_at(spool: Spool, point: str, *extra: str) -> str:
    """Run the daemon (one pass) until it kills itself at `point`; returns its output."""
    process = start_daemon_process(spool.config_path, "--oneshot", *extra, standin={}, env={ENV: point})
    output = stop(process)
    assert process.returncode == -signal.SIGKILL, f"fault point {point} was never reached:\n{output}"
    assert f"fault point {point.partition(':')[0]}: SIGKILL" in output
    return output


def check_after_restart(spool: Spool, dropped: dict[str, bytes], tag: str = "") -> None:
    manifests = check_spool(spool, dropped, jobs=3, failed={f"bad{tag}.yaml"})
    seeds = sorted((m["source"], m["index"], m["seeds"]) for m in manifests)
    assert seeds == [(f"fox{tag}.yaml", 1, [5]), (f"pair{tag}.yaml", 1, [1, 2]), (f"pair{tag}.yaml", 2, [3, 4])]
    check_status(spool, manifests)


@pytest.mark.parametrize("point", [p for p in POINTS if p not in ("after_fence", "after_keep_stage", "after_takeover")])
def test_a_kill_at_a_fault_point_then_a_restart_completes_every_job_once(spool: Spool, point: str) -> None:
    dropped = drop_scenario(spool)
    crash_at(spool, point)
    run_oneshot(spool)
    check_after_restart(spool, dropped)
    figure(f"fault point {point}: 1 kill survived, 3 jobs, 0 lost, 0 duplicated")


def test_a_kill_while_resuming_a_fenced_claim_then_a_restart_completes_it(spool: Spool) -> None:
    dropped = drop_scenario(spool)
    crash_at(spool, "after_stage_image")
    crash_at(spool, "after_fence")  # the restart renamed the claim folder, then died
    run_oneshot(spool)
    check_after_restart(spool, dropped)
    manifests = {m["source"]: m for m in spool.manifests()}
    assert max(m["attempt"] for m in manifests.values()) >= 2, "the interrupted claim ran again"


def test_a_job_that_kills_the_daemon_every_time_goes_to_failed_after_max_crashes(spool: Spool) -> None:
    spool.drop("poison.yaml", "prompt: poison\n")
    for _ in range(3):  # limits.max_crashes: 3 by default
        crash_at(spool, "after_stage_image")
    run_oneshot(spool)  # the fourth start does not run it again
    [report] = spool.reports()
    assert (report["code"], report["file"]) == ("crashed", "poison.yaml")
    assert "crashed 3 times" in report["error"] and "log_tail" in report["fix"]
    tail = "\n".join(report["log_tail"])
    assert "run 3 starts" in tail and "generating job poison-" in tail
    assert (spool.failed / "poison.yaml").read_text() == "prompt: poison\n"
    spool.drop("after.yaml", "prompt: fine\n")
    run_oneshot(spool)
    assert [m["source"] for m in spool.manifests()] == ["after.yaml"]
    figure("poison job: 3 crashes, then failed/ with code crashed and its log tail; the next job done")


def _run_forked(config_path: Path, fault: str | None, kill_after_s: float | None) -> int:
    """One pass of a daemon in a forked child (a real process, without the cost of a new interpreter).

    Dies at a random fault point (`fault`), or by a SIGKILL from here after `kill_after_s`; returns
    the wait status.
    """
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 70
        try:
            faults._armed = faults._Armed(fault) if fault else None
            daemon = Daemon(load_config(config_path), oneshot=True, generator_factory=lambda _c: StandInGenerator())
            code = daemon.run()
        finally:
            os._exit(code)
    if kill_after_s is not None:
        deadline = time.monotonic() + kill_after_s
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            time.sleep(0.005)
        os.kill(pid, signal.SIGKILL)  # not reaped yet: the pid is still the child's
    _, status = os.waitpid(pid, 0)
    return status


def test_randomized_kills_over_a_stream_lose_nothing_and_double_nothing(spool: Spool, test_models) -> None:
    """At least KILLS kills (50), at random fault points and at random moments, over rounds of jobs."""
    # Random kills land on every claim again and again: they must not make a good job "poison".
    write_config(spool.root, test_models, limits={"max_crashes": 10_000})
    rng = random.Random(13)
    kills = runs = jobs = rounds = 0
    dropped: dict[str, bytes] = {}
    failed: set[str] = set()
    while kills < KILLS:
        rounds += 1
        tag = f"-r{rounds}"
        dropped |= drop_scenario(spool, tag)
        failed.add(f"bad{tag}.yaml")
        jobs += 3
        while True:
            runs += 1
            external = runs % 3 == 0  # every third run is killed from outside, between any two system calls
            fault = None if external else f"random:0.12:{runs}"
            status = _run_forked(spool.config_path, fault, rng.uniform(0.0, 1.5) if external else None)
            if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
                kills += 1
                continue
            # 1: the round's bad file failed in this run (a run that only resumed good jobs exits 0).
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) in (0, 1), f"run {runs} ended with status {status}"
            if not spool.claims() and not [p for p in spool.inbox.iterdir() if not p.name.startswith(".")]:
                break
        assert runs < 40 * KILLS, "the stream never finished"
    manifests = check_spool(spool, dropped, jobs=jobs, failed=failed)
    check_status(spool, manifests)
    figure(f"randomized kills: {kills} kills survived over {runs} runs, {jobs} jobs, 0 lost, 0 duplicated")


def kill_after_the_first_published_image(spool: Spool) -> tuple[Path, bytes]:
    """Run the real daemon (one pass) until it kills itself with one image in the outbox, no manifest yet;
    returns that image and its bytes."""
    process = start_daemon_process(spool.config_path, "--oneshot", env={ENV: "after_publish_image"})
    output = stop(process)
    assert process.returncode == -signal.SIGKILL, output
    [first] = [p for p in spool.outbox.iterdir() if p.suffix == ".png"]
    assert not list(spool.outbox.glob("*.json")), "no manifest yet: the job is not done"
    return first, first.read_bytes()


def restart_to_the_manifest(spool: Spool) -> dict:
    """Run the daemon (one pass) again to the end; returns the one manifest in the outbox."""
    restarted = start_daemon_process(spool.config_path, "--oneshot")
    assert restarted.wait(CEILING_S) == 0, stop(restarted)
    [manifest] = spool.manifests()
    return manifest


def test_a_publish_interrupted_by_a_kill_is_finished_with_the_same_bytes_on_real_diffusers(spool: Spool) -> None:
    """Real diffusers: killed after the first image reached the outbox, the restart publishes the same
    staged files (it does not generate again), so a consumer that saw image 1 sees the same bytes."""
    spool.drop("left.yaml", "prompt: interrupted\nseed: 4\ncount: 2\n")
    first, seen = kill_after_the_first_published_image(spool)
    manifest = restart_to_the_manifest(spool)
    assert manifest["seeds"] == [4, 5] and manifest["attempt"] == 1, "published from the stage, not run again"
    assert first.read_bytes() == seen
    check_spool(spool, {"left.yaml": b"prompt: interrupted\nseed: 4\ncount: 2\n"}, jobs=1)


def test_an_unknown_fault_point_is_refused() -> None:
    with pytest.raises(ValueError, match="no fault point 'after_lunch'"):
        faults._Armed("after_lunch")


def test_every_fault_point_is_in_the_code_and_every_call_names_a_point() -> None:
    from tests.conftest import REPO

    source = "\n".join(p.read_text() for p in (REPO / "daemon").glob("*.py") if p.name != "faults.py")
    called = set(__import__("re").findall(r'fault_point\("(\w+)"\)', source))
    assert called == set(POINTS)


def test_reservations_left_by_a_kill_are_dropped_and_no_one_elses(spool: Spool) -> None:
    """A kill between reserving a claim id and making its folder (or writing the owner) leaves a
    reservation; the next start removes its own instance's, and empty ones an hour old."""
    outbox = spool.outbox
    outbox.mkdir(parents=True)
    mine, other = outbox / ".mine-20261201-000000-aaaaaaaaaaaa.reserved", outbox / ".theirs-x.reserved"
    empty_old, empty_new = outbox / ".empty-old.reserved", outbox / ".empty-new.reserved"
    mine.write_text("test\n")
    other.write_text("other\n")
    empty_old.touch()
    empty_new.touch()
    os.utime(empty_old, (time.time() - 7200, time.time() - 7200))
    work = spool.root / "work" / "test"
    work.mkdir(parents=True)
    (work / ".reserving-mine-20261201-000000-bbbbbbbbbbbb").write_text("test\n")
    run_oneshot(spool)
    assert sorted(p.name for p in outbox.iterdir()) == [empty_new.name, other.name]
    assert not [p for p in work.iterdir() if p.name.startswith(".reserving-")]


def test_a_poison_job_batched_with_a_good_one_fails_alone(spool: Spool, test_models) -> None:
    """batch_size 4: the poison and a good job share the first call and its crash; after that a
    claim that crashed runs alone, so the good one is done and only the poison one fails as crashed."""
    write_config(spool.root, test_models, batch_size=4, batch_wait_s=2.0)
    spool.drop("poison.yaml", "prompt: poison\nseed: 1\n")
    spool.drop("good.yaml", "prompt: good\nseed: 2\n")
    kill = {"kill": ["poison"]}
    starts = 0
    while not spool.reports():
        starts += 1
        process = start_daemon_process(spool.config_path, "--oneshot", standin=kill)
        output = stop(process)
        assert process.returncode in (0, -signal.SIGKILL), output
        assert starts <= 6, "the poison job was not stopped"
    [report] = spool.reports()
    assert (report["code"], report["file"]) == ("crashed", "poison.yaml")
    [manifest] = spool.manifests()
    assert manifest["source"] == "good.yaml" and manifest["batch_size"] == 1
    assert (spool.archive / "good.yaml").exists() and (spool.failed / "poison.yaml").exists()
    figure(f"poison job batched with a good one: {starts} starts, the good job done, only the poison one failed")
