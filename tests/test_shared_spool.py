"""Several daemons on one spool: each work folder has one owner; each daemon its own state."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from diffusiond.daemon.service import Daemon
from diffusiond.pipeline.errors import ConfigError
from diffusiond.pipeline.standin import StandInGenerator
from tests.conftest import (
    CEILING_S,
    REPO,
    Spool,
    figure,
    hold,
    start_daemon_process,
    start_daemon_thread,
    wait_for,
    wait_until_ready,
    write_config,
)
from tests.spool_checks import check_spool
from tests.test_crash_and_stop import stop


def hold_a_job(spool: Spool, process: subprocess.Popen[str], gate: Path, text: str) -> None:
    """Once `process` (started with `hold(gate)`) is ready, drop `held.yaml` and wait until it is held mid-job."""
    wait_until_ready(spool.config_path, process)
    spool.drop("held.yaml", text)
    wait_for(lambda: list(gate.glob("held-*")), what="the job held")


def test_a_second_daemon_with_the_same_instance_refuses_to_start(spool: Spool) -> None:
    with start_daemon_thread(spool, StandInGenerator()):
        second = Daemon(spool.config, generator_factory=lambda _config: StandInGenerator())
        with pytest.raises(ConfigError) as info:
            second.run()
        spool.drop("still.yaml", "prompt: the first one runs on\n")
        wait_for(spool.manifests, what="the first daemon's manifest")
    error = info.value
    assert (error.field, error.value) == ("instance", "test")
    assert "is in use by diffusiond pid" in error.message and "--instance NAME" in error.fix
    owner = json.loads((spool.root / "work" / "test" / ".owner").read_text())
    assert owner["pid"] == os.getpid()  # who holds it, for the message


def test_the_refusal_names_the_process_and_a_kill_9_frees_the_folder(spool: Spool, tmp_path: Path) -> None:
    """The lock is the kernel's: a crashed owner leaves nothing to clean by hand; its claim resumes."""
    gate = tmp_path / "gate"
    first = start_daemon_process(spool.config_path, standin=hold(gate))
    try:
        hold_a_job(spool, first, gate, "prompt: mid-way when the owner dies\nseed: 3\n")
        second = subprocess.run(
            [sys.executable, "-m", "diffusiond.daemon.cli", "run", "--config", str(spool.config_path)],
            capture_output=True,
            text=True,
            timeout=CEILING_S,
        )
        assert second.returncode == 78, second.stderr
        assert f"in use by diffusiond pid {first.pid} on " in second.stderr
        assert "Fix: stop that daemon, or give this one an instance of its own" in second.stderr
        first.send_signal(signal.SIGKILL)
        first.wait(CEILING_S)
    finally:
        first.kill()
    again = start_daemon_process(spool.config_path, "--oneshot", standin={})
    assert again.wait(CEILING_S) == 0, again.stdout.read() if again.stdout else ""
    [manifest] = spool.manifests()
    assert (manifest["source"], manifest["seeds"]) == ("held.yaml", [3])


def test_two_instances_share_a_spool_each_with_its_own_state(spool: Spool, test_models) -> None:
    write_config(spool.root, test_models, state_dir=None)  # both on the default, per-instance state dir
    config_b = spool.root / "config-b.yaml"
    config_b.write_text(spool.config_path.read_text().replace("instance: test", "instance: other"))
    daemons = [start_daemon_process(path, standin={}) for path in (spool.config_path, config_b)]
    try:
        for path, process in zip((spool.config_path, config_b), daemons, strict=True):
            wait_until_ready(path, process)
        for n in range(6):
            spool.drop(f"job{n}.yaml", f"prompt: number {n}\n")
        manifests = wait_for(lambda: len(spool.manifests()) == 6 and spool.manifests(), what="6 manifests")
    finally:
        for process in daemons:
            process.send_signal(signal.SIGTERM)
        for process in daemons:
            assert process.wait(CEILING_S) == 0
    assert sorted(m["source"] for m in manifests) == [f"job{n}.yaml" for n in range(6)]
    for instance, process in zip(("test", "other"), daemons, strict=True):
        status = json.loads((spool.root / ".state" / instance / "status.json").read_text())
        assert (status["pid"], status["state"]) == (process.pid, "stopped")


@pytest.mark.parametrize("mode", ["auto", "poll"])
def test_two_daemons_share_500_jobs_and_none_is_done_twice(tmp_path: Path, test_models, mode: str) -> None:
    """Two instances on one spool (inotify, then polling as on NFS) race for a stream of 500 job files."""
    root = tmp_path / "spool"
    (root / "inbox").mkdir(parents=True)
    spool = Spool(root, write_config(root, test_models, watch={"mode": mode}))
    config_b = spool.root / "config-b.yaml"
    config_b.write_text(
        spool.config_path.read_text().replace("instance: test", "instance: other").replace("/state", "/state-b")
    )
    configs, logs = (spool.config_path, config_b), (tmp_path / "a.log", tmp_path / "b.log")
    daemons = [start_daemon_process(c, standin={}, log=log) for c, log in zip(configs, logs, strict=True)]
    dropped: dict[str, bytes] = {}
    try:
        for path, process in zip((spool.config_path, config_b), daemons, strict=True):
            wait_until_ready(path, process)
        for n in range(500):
            dropped[f"job{n:03}.yaml"] = f"prompt: number {n}\nseed: {n}\nsize: 8x8\nsteps: 1\n".encode()
            spool.drop(f"job{n:03}.yaml", dropped[f"job{n:03}.yaml"])
        wait_for(lambda: len(list(spool.archive.iterdir())) == 500, what="500 inputs archived")
    finally:
        for process in daemons:
            process.send_signal(signal.SIGTERM)
        for process in daemons:
            assert process.wait(CEILING_S) == 0
    manifests = check_spool(spool, dropped, jobs=500)
    by_instance = Counter(m["instance"] for m in manifests)
    sources = Counter(m["source"] for m in manifests)
    doubled = sum(n - 1 for n in sources.values())
    assert doubled == 0 and sorted(sources) == sorted(dropped)
    assert set(by_instance) == {"test", "other"}, f"both daemons took jobs: {by_instance}"
    figure(f"two daemons, {mode} mode: 500 jobs, {dict(by_instance)}, 0 lost, {doubled} double-processed")


MOVER = """
import sys
from pathlib import Path
from diffusiond.daemon import fsutil
from diffusiond.daemon.fsutil import move_unique
src, dest = Path(sys.argv[1]), Path(sys.argv[2])
if sys.argv[3] == "link":
    fsutil._renameat2 = None  # as on NFS, which has no RENAME_NOREPLACE: link, then unlink
names = sorted(p.name for p in src.iterdir())
(src.parent / (src.name + ".ready")).touch()
while not (src.parent / "go").exists():
    pass
for name in names:
    move_unique(src / name, dest, name)
"""


@pytest.mark.parametrize("way", ["renameat2", "link"])
def test_two_processes_moving_the_same_names_at_once_lose_nothing(tmp_path: Path, way: str) -> None:
    """move_unique never replaces: 2 x 2,000 same-named files moved into one folder at the same instant,
    by RENAME_NOREPLACE (local filesystems) and by link-then-unlink (NFS)."""
    dest = tmp_path / "archive"
    sources = [tmp_path / "a", tmp_path / "b"]
    for who, folder in enumerate(sources):
        folder.mkdir()
        for n in range(2_000):
            (folder / f"job{n}.yaml").write_text(f"{who} {n}")
    movers = [subprocess.Popen([sys.executable, "-c", MOVER, str(s), str(dest), way], cwd=REPO) for s in sources]
    wait_for(lambda: all((s.parent / f"{s.name}.ready").exists() for s in sources), what="both movers ready")
    (tmp_path / "go").touch()
    for mover in movers:
        assert mover.wait(CEILING_S) == 0
    contents = sorted(p.read_text() for p in dest.iterdir())
    assert len(contents) == 4_000, f"{4_000 - len(contents)} files lost"
    assert contents == sorted(f"{who} {n}" for who in (0, 1) for n in range(2_000))
    figure(f"move race ({way}): 2 processes x 2,000 same-named files moved into one folder, 0 lost")


def test_a_predecessor_that_lost_its_lock_is_fenced_and_publishes_nothing(spool: Spool, tmp_path: Path) -> None:
    """A daemon paused mid-job whose lock is gone (removed, an NFS lock lost): the next daemon of the
    instance resumes the claim by renaming its folder, and the paused one, let go, publishes nothing."""
    gate = tmp_path / "gate"
    first = start_daemon_process(spool.config_path, standin=hold(gate))
    try:
        hold_a_job(spool, first, gate, "prompt: two owners\nseed: 8\n")
        first.send_signal(signal.SIGSTOP)
        (spool.root / "work" / "test" / ".lock").unlink()  # the lock is lost: a new file is a new lock
        second = start_daemon_process(spool.config_path, "--oneshot", standin={})
        assert second.wait(CEILING_S) == 0, stop(second)
        [manifest] = spool.manifests()
        assert (manifest["seeds"], manifest["attempt"]) == ([8], 2)
        (gate / "release").touch()
        first.send_signal(signal.SIGCONT)
        wait_for(lambda: "held.yaml" in fenced_sources(spool), what="the fenced event")
    finally:
        first.send_signal(signal.SIGCONT)
        output = stop(first)  # the owner record names the second daemon now: the first steps down by itself
    assert first.returncode == 0 and "stepped down" in output, output
    assert spool.manifests() == [manifest], "the fenced daemon published nothing"
    check_spool(spool, {"held.yaml": b"prompt: two owners\nseed: 8\n"}, jobs=1)


def fenced_sources(spool: Spool) -> list[str]:
    """The sources of the `fenced` events the first daemon wrote in its state dir."""
    events = spool.root / "state" / "events.jsonl"
    lines = events.read_text().splitlines() if events.exists() else []
    return [e["source"] for e in map(json.loads, lines) if e["event"] == "fenced"]
