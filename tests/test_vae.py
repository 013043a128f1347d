"""A VAE per model (`models: {name: {path, vae}}`): a diffusers folder or an original-layout .safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from diffusiond.daemon.config import load_config
from diffusiond.pipeline.errors import ConfigError
from tests import ldm
from tests.conftest import Spool, start_daemon_thread, wait_for, write_config


def brighter(vae: AutoencoderKL) -> AutoencoderKL:
    """The same VAE with its last decoder layer's bias raised: every decoded image comes out different."""
    with torch.no_grad():
        vae.decoder.conv_out.bias += 0.5
    return vae


def test_a_vae_folder_and_a_single_file_replace_the_model_s_own(spool: Spool, test_models: Any, tmp_path: Path) -> None:
    folder = tmp_path / "bright-vae"
    brighter(AutoencoderKL.from_pretrained(test_models.sd / "vae")).save_pretrained(folder)
    tiny = ldm.make_tiny(tmp_path / "tiny")  # the original block layout, so its VAE converts to a single file
    single = ldm.save_safetensors(ldm.vae_to_ldm(brighter(tiny.vae).state_dict()), tmp_path / "bright.vae.safetensors")
    models = {
        "test": str(test_models.sd),
        "test-bright": {"path": str(test_models.sd), "vae": str(folder)},
        "tiny": str(tmp_path / "tiny"),
        "tiny-bright": {"path": str(tmp_path / "tiny"), "vae": str(single)},
    }
    write_config(spool.root, test_models, models=models)
    with start_daemon_thread(spool):
        for name in models:
            spool.drop(f"{name}.yaml", f"prompt: a fox\nseed: 2\nmodel: {name}\n")
        manifests = wait_for(lambda: len(spool.manifests()) == 4 and spool.manifests(), what="four jobs")
    by_model = {m["job"]["model"]: m for m in manifests}
    pixels = {
        n: Image.open(spool.outbox / m["outputs"][0]["file"]).convert("RGB").tobytes() for n, m in by_model.items()
    }
    assert pixels["test-bright"] != pixels["test"] and pixels["tiny-bright"] != pixels["tiny"]
    for name, vae in (("test-bright", "bright-vae"), ("tiny-bright", "bright.vae.safetensors")):
        record = by_model[name]["model"]
        assert record["vae"] == vae and len(record["vae_hash"]) == 10
        with Image.open(spool.outbox / by_model[name]["outputs"][0]["file"]) as image:
            assert f"VAE hash: {record['vae_hash']}, VAE: {vae}" in image.text["parameters"]
    assert by_model["test"]["model"]["vae"] is None
    assert "VAE" not in Image.open(spool.outbox / by_model["test"]["outputs"][0]["file"]).text["parameters"]


def test_a_pickled_vae_is_refused_when_the_config_loads(spool: Spool, test_models: Any, tmp_path: Path) -> None:
    write_config(spool.root, test_models, models={"test": {"path": str(test_models.sd), "vae": str(tmp_path / "v.pt")}})
    with pytest.raises(ConfigError) as caught:
        load_config(spool.config_path)
    assert "a VAE must be a .safetensors file or a diffusers folder" in str(caught.value)
