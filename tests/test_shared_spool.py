"""Several daemons on one spool: each work folder has one owner; each daemon its own state."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from diffusiond.daemon.service import Daemon
from diffusiond.pipeline.errors import ConfigError
from diffusiond.pipeline.standin import StandInGenerator
from tests.conftest import (
    CEILING_S,
    Spool,
    hold,
    start_daemon_process,
    start_daemon_thread,
    wait_for,
    wait_until_ready,
    write_config,
)


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
        wait_until_ready(spool.config_path, first)
        spool.drop("held.yaml", "prompt: mid-way when the owner dies\nseed: 3\n")
        wait_for(lambda: list(gate.glob("held-*")), what="the job held")
        second = subprocess.run(
            [sys.executable, "-m", "diffusiond.daemon.cli", "run", "--config", str(spool.config_path)],
            capture_output=True,
            text=True,
            timeout=CEILING_S,
        )
        assert second.returncode == 2, second.stderr
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
