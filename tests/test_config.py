"""The config file: defaults, model entries, relative paths, and errors that stop the start."""

from __future__ import annotations

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
    ],
)
def test_a_wrong_config_names_the_field(tmp_path: Path, text: str, field: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert caught.value.field == field
    assert says in caught.value.message
    assert caught.value.fix
