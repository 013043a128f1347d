"""The config file: defaults, model entries, relative paths, and errors that stop the start."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from diffusiond.daemon.config import load_config
from diffusiond.pipeline.errors import ConfigError
from diffusiond.pipeline.families import ModelKind
from diffusiond.pipeline.testmodel import TestModelPaths


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "etc" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_no_file_gives_working_defaults(tmp_path: Path) -> None:
    config = load_config(None, spool=tmp_path / "spool")
    assert config.inbox == tmp_path / "spool" / "inbox"
    assert (config.device, config.dtype, config.memory, config.batch_size) == ("auto", "auto", "auto", 1)
    assert config.state == tmp_path / "spool" / ".state" / socket.gethostname()  # each instance its own
    assert config.models == {}


def test_model_entries_short_and_long_forms(tmp_path: Path, test_models: TestModelPaths) -> None:
    (tmp_path / "models").mkdir()
    checkpoint = tmp_path / "models" / "v2-1_768.ckpt"
    checkpoint.write_bytes(b"")
    path = write(
        tmp_path,
        f"spool: ../spool\n"
        f"models:\n"
        f"  test: {test_models.sd}\n"
        f"  sd21:\n"
        f"    path: ../models/v2-1_768.ckpt\n"
        f"    config: ../models/sd21-config\n"
        f"    prediction: v_prediction\n"
        f"    defaults: {{negative_prompt: 'lowres'}}\n"
        f"preload: [test]\n",
    )
    config = load_config(path)
    entries = config.model_entries()
    assert entries["test"].kind is ModelKind.SD1 and not entries["test"].single_file
    sd21 = entries["sd21"]
    assert sd21.path == checkpoint and sd21.single_file and sd21.kind is ModelKind.UNKNOWN
    assert sd21.config == tmp_path / "models" / "sd21-config" and sd21.prediction == "v_prediction"
    rules = config.rules()
    assert rules.model_defaults == {"sd21": {"negative_prompt": "lowres"}}
    assert rules.native_sizes["test"] == 64 and "sd21" not in rules.native_sizes


@pytest.mark.parametrize(
    ("text", "field", "says"),
    [
        ("device: tpu\n", "device", "cuda:N"),
        ("memory: tiny\n", "memory", "'auto', 'normal', 'low' or 'minimal'"),
        ("preload: [nope]\n", "", "preload names models that are not in `models:`: nope"),
        ("models: {x: {path: a, prediction: vee}}\n", "models.x.prediction", "epsilon"),
        ("defaults: {txt2image: {steps: 3}}\n", "defaults", "unknown keys"),
        ("profiles: {s: {task: img2img, strength: 7}}\n", "profiles.s.strength", "less than or equal to 1"),
        ("batch_size: 0\n", "batch_size", "greater than or equal to 1"),
        # A misspelt default was dropped without a word: each is an error with a guess.
        ("defaults: {all: {stpes: 10}}\n", "defaults.all.stpes", "unknown field 'stpes' (did you mean 'steps'?)"),
        ("defaults: {txt2img: {strength: 0.5}}\n", "defaults.txt2img.strength", "fields a txt2img job accepts"),
        ("defaults: {all: {cfg_scale: 5}}\n", "defaults.all.cfg_scale", "AUTOMATIC1111's name for it"),
        (
            "models: {x: {path: ., defaults: {negatve_prompt: a}}}\n",
            "models.x.defaults.negatve_prompt",
            "negative_prompt",
        ),
        ("profiles: {s: {task: img2img, stregth: 0.5}}\n", "profiles.s.stregth", "did you mean 'strength'"),
        ("models: {x: ../models/nope}\n", "models.x", "models/nope does not exist"),
        ("threads: 0\n", "threads", "at least 1"),
    ],
)
def test_a_wrong_config_names_the_field(tmp_path: Path, text: str, field: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert caught.value.field == field
    assert says in caught.value.message
    assert caught.value.fix


def test_watermark_false_is_off_in_the_config_as_in_a_job(tmp_path: Path) -> None:
    from diffusiond.pipeline.job import WatermarkSpec

    off = load_config(write(tmp_path, "watermark: {invisible: false}\n"))
    assert off.watermark.invisible is None and off.marks(WatermarkSpec()).invisible is None
    on = load_config(write(tmp_path, "watermark: {invisible: true, visible: true}\n"))
    assert on.watermark.invisible is not None and on.watermark.visible is not None


def test_run_without_config_reads_the_folders_config_and_says_so_first(tmp_path: Path, test_models) -> None:
    """`diffusiond init` then `diffusiond run` in that folder: its config.yaml, named in the first log line."""
    import subprocess
    import sys

    (tmp_path / "config.yaml").write_text(f"spool: here\nmodels: {{test: {test_models.sd}}}\n")
    run = subprocess.run(
        [sys.executable, "-m", "diffusiond.daemon.cli", "run", "--oneshot"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    first = run.stderr.splitlines()[0]
    assert f"config {tmp_path / 'config.yaml'}, spool {tmp_path / 'here'}, state " in first, first


def test_threads_sets_torchs_threads_for_generation(spool, test_models) -> None:
    from diffusiond.daemon.config import usable_cpus
    from diffusiond.pipeline.standin import StandInGenerator
    from tests.conftest import start_daemon_thread, wait_for, write_config

    write_config(spool.root, test_models, threads=2)
    with start_daemon_thread(spool, StandInGenerator()):
        status = wait_for(
            lambda: (s := json.loads((spool.root / "state" / "status.json").read_text()))["threads"] and s,
            what="status.json naming the threads",
        )
    assert status["threads"] == 2
    assert load_config(write(spool.root, "")).torch_threads() == max(1, usable_cpus() - 1), "auto keeps a CPU free"
