"""`diffusiond submit` as a step of a chain: --json, exit codes, progress, and a producer with only the spool."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import CEILING_S, REPO, Spool, hold, start_daemon_process, wait_for, wait_until_ready


def submit(*args: str, cwd: Path, timeout: float = 2 * CEILING_S) -> subprocess.CompletedProcess[str]:
    """`diffusiond submit` from a folder with no config (and none in /etc here)."""
    env = os.environ | {"PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "diffusiond.daemon.cli", "submit", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def test_with_only_the_spool_submit_waits_prints_json_and_shows_progress(spool: Spool, tmp_path: Path) -> None:
    process = start_daemon_process(spool.config_path, standin={})
    try:
        wait_until_ready(spool.config_path, process)
        job = tmp_path / "lamp.yaml"
        job.write_text("prompt: a lamp\nmodel: test\nsteps: 4\ncount: 2\n")
        result = submit(str(job), "--spool", str(spool.root), "--wait", "--json", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        assert answer["status"] == "done" and answer["source"].startswith("lamp-")
        [manifest_path] = answer["manifests"]
        manifest = json.loads(Path(manifest_path).read_text())
        assert [str(spool.outbox / o["file"]) for o in manifest["outputs"]] == answer["outputs"]
        assert all(Path(p).exists() for p in answer["outputs"]) and len(answer["outputs"]) == 2
        assert f"step 4/4 {manifest['job_id']}" in result.stderr.splitlines(), result.stderr

        wrong = tmp_path / "wrong.yaml"
        wrong.write_text("prompt: x\nmodel: sdxl-turbo\n")
        refused = submit(str(wrong), "--spool", str(spool.root), "--wait", cwd=tmp_path)
        assert refused.returncode == 2, "the running daemon announced its models: a name it lacks fails at once"
        assert "model 'sdxl-turbo' is not in the config's models; known: test, test-x4" in refused.stderr
        assert not list(spool.inbox.iterdir())

        failing = tmp_path / "broken.yaml"
        failing.write_text("task: img2img\nprompt: x\nmodel: test\n")
        (tmp_path / "broken.png").write_bytes(b"not an image")
        failed = submit(str(failing), "--spool", str(spool.root), "--wait", "--json", cwd=tmp_path)
        assert failed.returncode == 1
        body = json.loads(failed.stdout)
        assert body["status"] == "failed" and body["code"] == "bad_image" and Path(body["report"]).exists()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(CEILING_S)


def test_with_no_daemon_running_submit_wait_exits_4_at_once_and_drops_nothing(spool: Spool, tmp_path: Path) -> None:
    job = tmp_path / "lamp.yaml"
    job.write_text("prompt: a lamp\n")
    never = submit(str(job), "--spool", str(spool.root), "--wait", "--timeout", "3600", "--json", cwd=tmp_path)
    assert never.returncode == 4 and json.loads(never.stdout)["status"] == "no_daemon"
    assert "no daemon is running on" in never.stderr
    assert not spool.inbox.exists() or not list(spool.inbox.iterdir()), "nothing dropped"

    process = start_daemon_process(spool.config_path, standin={})
    wait_until_ready(spool.config_path, process)
    assert (spool.root / ".daemons" / "test.json").exists()
    process.send_signal(signal.SIGKILL)  # its entry stays behind, with a dead pid
    process.wait(CEILING_S)
    dead = submit(str(job), "--spool", str(spool.root), "--wait", "--timeout", "3600", cwd=tmp_path)
    assert dead.returncode == 4, dead.stderr
    plain = submit(str(job), "--spool", str(spool.root), cwd=tmp_path)
    assert plain.returncode == 0 and "the job waits in the inbox" in plain.stderr
    assert [p.name for p in spool.inbox.iterdir() if p.suffix == ".yaml"] == ["lamp.yaml"]


def test_a_daemon_that_dies_during_the_wait_ends_it_with_4(spool: Spool, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    process = start_daemon_process(spool.config_path, standin=hold(gate, "held"))
    try:
        wait_until_ready(spool.config_path, process)
        job = tmp_path / "held.yaml"
        job.write_text("prompt: held\n")
        env = os.environ | {"PYTHONPATH": str(REPO)}
        command = [sys.executable, "-m", "diffusiond.daemon.cli", "submit", str(job), "--spool", str(spool.root)]
        waiting = subprocess.Popen(
            [*command, "--wait", "--timeout", "3600"],
            cwd=tmp_path,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        wait_for(lambda: any(gate.glob("held-*")), what="the job held mid-way")
        process.send_signal(signal.SIGKILL)
        assert waiting.wait(CEILING_S) == 4
        assert "no daemon is running on" in (waiting.stderr.read() if waiting.stderr else "")
    finally:
        process.kill()
        process.wait(CEILING_S)
