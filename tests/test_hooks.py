"""Hooks: the config's commands after a job ends, through a real daemon process and real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from tests.conftest import CEILING_S, Spool, start_daemon_process, wait_for, wait_until_ready, write_config

RECORD = """\
import os, sys
line = [os.environ["DIFFUSIOND_EVENT"], *sys.argv[2:], os.environ["DIFFUSIOND_MANIFEST"]]
with open(sys.argv[1], "a") as out:
    out.write(" ".join(line) + "\\n")
print("hello from the hook")
"""
HANG = """\
import os, subprocess, sys, time
child = subprocess.Popen(["sleep", "3600"])
with open(sys.argv[1], "w") as out:
    out.write(f"{os.getpid()} {child.pid}")
time.sleep(3600)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = (
        Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] if Path(f"/proc/{pid}").exists() else "X"
    )
    return state != "Z"


def test_hooks_get_the_manifest_or_the_report_and_their_output_is_logged(
    spool: Spool, test_models, tmp_path: Path
) -> None:
    hooked = tmp_path / "hooked.txt"
    write_config(
        spool.root,
        test_models,
        outbox_failures=True,
        hooks={
            "on_done": [sys.executable, "-c", RECORD, str(hooked), "{job_id}", "{manifest}"],
            "on_failed": [sys.executable, "-c", RECORD, str(hooked), "{job_id}", "{report}"],
        },
    )
    process = start_daemon_process(spool.config_path, standin={})
    try:
        wait_until_ready(spool.config_path, process)
        spool.drop("fine.yaml", "prompt: fine\n")
        spool.drop("typo.yaml", "promt: typo\n")
        lines = wait_for(
            lambda: hooked.exists() and len(hooked.read_text().splitlines()) == 2 and hooked.read_text(),
            what="both hooks",
        )
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(CEILING_S)
        output = process.stdout.read() if process.stdout else ""
    [manifest] = spool.manifests()
    [failure] = spool.failures()
    done = next(line for line in lines.splitlines() if line.startswith("done "))
    manifest_path = str(spool.outbox / f"{manifest['job_id']}.json")
    assert done.split() == ["done", manifest["job_id"], manifest_path, manifest_path], "argument and environment"
    failed = next(line for line in lines.splitlines() if line.startswith("failed ")).split()
    assert failed[1] == failure["job_id"] and failed[2] == str(spool.failed / "typo.error.yaml")
    assert failed[3] == str(spool.outbox / f"{failure['job_id']}.failed.json")
    assert f"on_done hook for {manifest['job_id']}: hello from the hook" in output
    status = json.loads((spool.root / "state" / "status.json").read_text())
    assert status["counters"]["hooks_failed"] == 0


def test_a_hung_hook_is_killed_at_its_timeout_and_the_next_job_does_not_wait(
    spool: Spool, test_models, tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    script = tmp_path / "hang.py"  # a file: its braces in an argument would be taken for fields
    script.write_text(HANG)
    write_config(spool.root, test_models, hooks={"on_done": [sys.executable, str(script), str(pids)], "timeout_s": 8})
    process = start_daemon_process(spool.config_path, standin={})
    try:
        wait_until_ready(spool.config_path, process)
        spool.drop("first.yaml", "prompt: first\n")
        hook, child = map(int, wait_for(lambda: pids.exists() and pids.read_text().split(), what="the hook running"))
        spool.drop("second.yaml", "prompt: second\n")
        wait_for(lambda: len(spool.manifests()) == 2, what="the second job done")
        assert alive(hook), "the second job was done while the first one's hook still hung"
        wait_for(lambda: not alive(hook) and not alive(child), what="the hook and its child killed")
        status = wait_for(
            lambda: (
                (s := json.loads((spool.root / "state" / "status.json").read_text()))["counters"]["hooks_failed"] and s
            ),
            what="the hook counted as failed",
        )
        assert status["counters"]["done"] == 2 and status["counters"]["failed"] == 0
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(CEILING_S)
        output = process.stdout.read() if process.stdout else ""
    assert "still running after 8 s (hooks.timeout_s): killed" in output


def test_a_hook_naming_an_unknown_field_is_refused_with_the_list(spool: Spool, test_models) -> None:
    from diffusiond.daemon.config import load_config
    from diffusiond.pipeline.errors import ConfigError

    write_config(spool.root, test_models, hooks={"on_done": ["notify", "{manifst}"]})
    try:
        load_config(spool.config_path)
    except ConfigError as exc:
        assert "'manifst' is not one of {manifest}, {job_id}" in str(exc) and "hooks" in str(exc)
    else:
        raise AssertionError("a hook naming an unknown field was taken")
