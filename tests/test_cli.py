"""The `diffusiond` command as a user types it, in real subprocesses."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from diffusiond.daemon.config import load_config
from diffusiond.pipeline.errors import ConfigError
from tests.conftest import CEILING_S, Spool, start_daemon_process, wait_until_ready


def cli(*args: str, cwd: Path | None = None, timeout: float = 2 * CEILING_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "diffusiond.daemon.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )


def test_help_for_every_command() -> None:
    for command in (
        [],
        ["run"],
        ["submit"],
        ["validate"],
        ["inspect"],
        ["init"],
        ["make-test-model"],
        ["events"],
        ["reload"],
        ["schema"],
        ["status"],
    ):
        result = cli(*command, "--help")
        assert result.returncode == 0 and "usage: diffusiond" in result.stdout


def test_submit_wait_prints_the_output_paths(spool: Spool, daemon, tmp_path: Path) -> None:
    job = tmp_path / "fox.yaml"
    job.write_text("task: img2img\nprompt: a fox\nseed: 3\ncount: 2\n")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 90, 20)).save(buffer, format="PNG")
    (tmp_path / "fox.png").write_bytes(buffer.getvalue())
    result = cli("submit", str(job), "--wait", "--config", str(spool.config_path), "--timeout", str(CEILING_S))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("submitted ")
    paths = [Path(line) for line in lines[1:]]
    assert len(paths) == 3 and all(p.exists() for p in paths)
    manifest = json.loads(paths[-1].read_text())
    assert [o["file"] for o in manifest["outputs"]] == [p.name for p in paths[:2]]
    assert manifest["input_image"]["sha256"] == hashlib.sha256(buffer.getvalue()).hexdigest()
    assert job.exists(), "submit copies; the user's own file stays"


def test_submit_wait_exits_non_zero_and_says_why_when_the_job_fails(spool: Spool, daemon, tmp_path: Path) -> None:
    job = tmp_path / "broken.yaml"
    job.write_text("task: img2img\nprompt: x\n")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    result = cli("submit", str(job), "--wait", "--config", str(spool.config_path), "--timeout", str(CEILING_S))
    assert result.returncode == 1
    assert "not a readable image" in result.stderr and "fix:" in result.stderr


def test_submit_refuses_an_invalid_job_before_dropping_it(spool: Spool, tmp_path: Path) -> None:
    job = tmp_path / "typo.yaml"
    job.write_text("promt: typo\n")
    result = cli("submit", str(job), "--config", str(spool.config_path))
    assert result.returncode == 2
    assert "field 'promt'" in result.stderr and "did you mean 'prompt'" in result.stderr
    assert list(spool.inbox.iterdir()) == []


def test_validate_reports_each_file(spool: Spool, tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("prompt: fine\n---\ntask: upscale\nmethod: lanczos\nscale: 2\nimage: x.png\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prompt: fine\n---\nsteps: many\n")
    ok = cli("validate", str(good), "--config", str(spool.config_path))
    assert ok.returncode == 0 and "ok, 2 job(s)" in ok.stdout
    assert "not next to the job file" in ok.stdout
    result = cli("validate", str(good), str(bad), "--config", str(spool.config_path))
    assert result.returncode == 1
    assert f"{bad} (job 2), field 'steps'" in result.stdout


def test_validate_follows_a_link_the_user_names(spool: Spool, tmp_path: Path) -> None:
    """Only the inbox refuses links; a path typed on the command line is the user's own."""
    real = tmp_path / "real.yaml"
    real.write_text("prompt: fine\n")
    (tmp_path / "link.yaml").symlink_to(real)
    result = cli("validate", str(tmp_path / "link.yaml"), "--config", str(spool.config_path))
    assert result.returncode == 0 and "ok, 1 job(s)" in result.stdout, result.stdout + result.stderr


def test_init_makes_folders_and_a_config_that_loads(tmp_path: Path, test_models) -> None:
    result = cli("init", str(tmp_path / "spool"))
    assert result.returncode == 0, result.stderr
    for name in ("inbox", "outbox", "archive", "failed", "inbox/sketches"):
        assert (tmp_path / "spool" / name).is_dir()
    # Its models come next (`make-test-model`, as it says): until then the config names what is missing.
    assert "next: diffusiond make-test-model" in result.stdout
    with pytest.raises(ConfigError) as missing:
        load_config(tmp_path / "spool" / "config.yaml")
    assert missing.value.field == "models.test" and "models/test/sd does not exist" in missing.value.message
    made = tmp_path / "spool" / "models" / "test"
    made.mkdir(parents=True)
    for name in ("sd", "x4-upscaler"):
        (made / name).symlink_to(getattr(test_models, "sd" if name == "sd" else "upscaler"))
    config = load_config(tmp_path / "spool" / "config.yaml")
    assert config.inbox == (tmp_path / "spool" / "inbox").absolute()
    assert set(config.models) == {"test", "test-x4"}


def test_run_with_no_config_file_at_all(tmp_path: Path) -> None:
    """`diffusiond run --spool DIR` works with defaults; a model-free job (lanczos) runs."""
    spool = tmp_path / "bare"
    (spool / "inbox").mkdir(parents=True)
    buffer = io.BytesIO()
    Image.new("RGB", (40, 24), (10, 200, 30)).save(buffer, format="PNG")
    (spool / "inbox" / "small.png").write_bytes(buffer.getvalue())
    (spool / "inbox" / "small.yaml").write_text("task: upscale\nmethod: lanczos\nscale: 3\n")
    (spool / "inbox" / "nomodel.yaml").write_text("prompt: needs a model\n")
    command = [sys.executable, "-m", "diffusiond.daemon.cli", "run", "--spool", str(spool), "--oneshot"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=CEILING_S, cwd=tmp_path)
    assert result.returncode == 1, result.stderr  # a job failed: a script running --oneshot can tell
    [manifest] = [json.loads(p.read_text()) for p in (spool / "outbox").glob("*.json")]
    with Image.open(spool / "outbox" / manifest["outputs"][0]["file"]) as image:
        assert image.size == (120, 72)
    report = yaml.safe_load((spool / "failed" / "nomodel.error.yaml").read_text())
    assert report["field"] == "model" and "add `model:`" in report["fix"]
    (spool / "inbox" / "again.png").write_bytes(buffer.getvalue())
    (spool / "inbox" / "again.yaml").write_text("task: upscale\nmethod: lanczos\nscale: 2\n")
    again = subprocess.run(command, capture_output=True, text=True, timeout=CEILING_S, cwd=tmp_path)
    assert again.returncode == 0, again.stderr  # every job of this run succeeded


def test_a_bad_config_stops_the_start_with_a_clear_message(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("device: tpu\n")
    result = cli("run", "--config", str(config), "--spool", str(tmp_path / "s"))
    assert result.returncode == 78, "EX_CONFIG: the units do not restart it (RestartPreventExitStatus=78)"
    assert "field 'device'" in result.stderr and "cuda:N" in result.stderr


def test_sigint_stops_a_running_daemon_cleanly(spool: Spool) -> None:
    process = start_daemon_process(spool.config_path, standin={})
    wait_until_ready(spool.config_path, process)  # its handlers are installed: the work folder came earlier
    process.send_signal(signal.SIGINT)
    assert process.wait(CEILING_S) == 0
    assert process.stdout is not None and "stopped:" in process.stdout.read()
