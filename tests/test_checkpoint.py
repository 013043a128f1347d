"""Single-file checkpoints: family detection, config resolution, safe .ckpt reading, identical images.

The files are tiny SD 1.x and 2.x models that the tests write themselves in the original (LDM)
key layout (tests/ldm.py), so loading them goes through diffusers' real conversion code.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from diffusiond.pipeline.errors import Code, ConfigError, JobFailed
from diffusiond.pipeline.families import ModelEntry, ModelKind, detect_kind
from diffusiond.pipeline.metadata import read_parameters
from diffusiond.pipeline.single_file import (
    assemble_shipped_config,
    inspect_checkpoint,
    kind_of_file,
    load_single_file,
    missing_config_files,
    read_keys,
    resolve_config,
    shipped_config_name,
)
from tests import ldm

PROMPT = "a photo of a cat"


@dataclass
class Tiny:
    folder: Path
    """The diffusers folder: the `config:` of the single files."""
    safetensors: Path
    ckpt: Path
    image: np.ndarray
    """What the diffusers folder makes (2 steps, 64 px, seed 0)."""


def generate(pipe: Any) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    result = pipe(PROMPT, num_inference_steps=2, height=64, width=64, generator=generator, output_type="np")
    return result.images


def build(root: Path, family: str) -> Tiny:
    from diffusers import StableDiffusionPipeline

    pipe = ldm.make_tiny(root / "tiny", family)
    state = ldm.to_ldm(pipe, family)
    files = root / "files"
    files.mkdir()
    reference = StableDiffusionPipeline.from_pretrained(
        root / "tiny", local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    return Tiny(
        folder=root / "tiny",
        safetensors=ldm.save_safetensors(state, files / "tiny.safetensors"),
        ckpt=ldm.save_ckpt(state, files / "tiny.ckpt"),
        image=generate(reference),
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    """SD 1.x."""
    return build(tmp_path_factory.mktemp("sd1"), "sd1")


@pytest.fixture(scope="module")
def tiny_sd2(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    """SD 2.x 768-v style: OpenCLIP text encoder, v-prediction."""
    return build(tmp_path_factory.mktemp("sd2"), "sd2")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where shipped configs are assembled (never the user's ~/.cache)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _no_user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test that forgets `cache_dir` must not write into the user's cache."""
    monkeypatch.delenv("CACHE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def entry(path: Path, config: Path | None = None, prediction: str | None = None) -> ModelEntry:
    return ModelEntry("m", path, ModelKind.UNKNOWN, config=config, prediction=prediction)


# --- loading -------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["safetensors", "ckpt"])
def test_single_file_makes_the_same_image_as_the_diffusers_folder(tiny: Tiny, cache: Path, suffix: str) -> None:
    path = getattr(tiny, suffix)
    pipe = load_single_file(entry(path, config=tiny.folder), ModelKind.UNKNOWN, dtype=torch.float32, cache_dir=cache)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.safety_checker is None
    assert np.abs(generate(pipe) - tiny.image).max() == 0


@pytest.mark.parametrize("suffix", ["safetensors", "ckpt"])
def test_the_family_comes_from_the_keys(tiny: Tiny, suffix: str) -> None:
    path = getattr(tiny, suffix)
    assert kind_of_file(path) is ModelKind.SD1
    keys = read_keys(path)
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert any(key.startswith("cond_stage_model.transformer.text_model.") for key in keys)
    assert any(key.startswith("first_stage_model.decoder.up.3.") for key in keys)


def test_an_sd2_file_makes_the_same_image_as_its_folder(tiny_sd2: Tiny, cache: Path) -> None:
    assert kind_of_file(tiny_sd2.safetensors) is ModelKind.SD2
    pipe = load_single_file(entry(tiny_sd2.safetensors, config=tiny_sd2.folder), ModelKind.SD2, dtype=torch.float32)
    assert pipe.tokenizer.pad_token == "!"
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert np.abs(generate(pipe) - tiny_sd2.image).max() == 0


def test_prediction_type_from_the_entry_overrides_the_config(tiny_sd2: Tiny, tmp_path: Path) -> None:
    """An SD 2 768-v file with an epsilon config (a 2.1-base folder, say) still predicts v when told so."""
    config = tmp_path / "epsilon"
    shutil.copytree(tiny_sd2.folder, config)
    scheduler_config = config / "scheduler" / "scheduler_config.json"
    scheduler_config.write_text(
        scheduler_config.read_text(encoding="utf-8").replace('"v_prediction"', '"epsilon"'), encoding="utf-8"
    )
    chosen = entry(tiny_sd2.ckpt, config=config, prediction="v_prediction")
    pipe = load_single_file(chosen, ModelKind.UNKNOWN, dtype=torch.float32)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert np.abs(generate(pipe) - tiny_sd2.image).max() == 0


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_the_shipped_model_index_drives_a_single_file_load(tiny: Tiny, tmp_path: Path, cache: Path, name: str) -> None:
    """The shipped model_index.json (safety checker and feature extractor entries included) loads as it is."""
    config = tmp_path / "config"
    shutil.copytree(tiny.folder, config)
    shipped = assemble_shipped_config(name, cache_dir=cache)
    shutil.copy(shipped / "model_index.json", config / "model_index.json")
    pipe = load_single_file(entry(tiny.safetensors, config=config), ModelKind.SD1, dtype=torch.float32)
    assert np.abs(generate(pipe) - tiny.image).max() == 0


def test_a_file_of_another_family_than_expected_is_refused(tiny: Tiny, cache: Path) -> None:
    with pytest.raises(JobFailed, match="holds an sd1 model, but it was taken for sdxl") as caught:
        load_single_file(entry(tiny.safetensors, config=tiny.folder), ModelKind.SDXL, dtype=torch.float32)
    assert caught.value.code is Code.MODEL_FAILED
    assert caught.value.value == "m"


# --- .ckpt pickles -------------------------------------------------------------------------------


class _RunsACommand:
    """Unpickling this would run a shell command: what a malicious .ckpt does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_ckpt_that_needs_unsafe_pickle_loading_is_refused_and_never_run(
    tmp_path: Path, cache: Path, tiny: Tiny, writer: str
) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"w": torch.zeros(2)}, "callback": _RunsACommand(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))

    for attempt in (
        lambda: kind_of_file(path),
        lambda: load_single_file(entry(path, config=tiny.folder), ModelKind.UNKNOWN, dtype=torch.float32),
    ):
        with pytest.raises(JobFailed) as caught:
            attempt()
        assert caught.value.code is Code.MODEL_FAILED
        assert "needs unsafe pickle loading" in caught.value.message
        assert ".safetensors" in caught.value.fix
    assert not marker.exists()
    if writer == "torch.save":
        assert "posix.system" in caught.value.message or "os.system" in caught.value.message


def test_damaged_files_say_so(tmp_path: Path) -> None:
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 64)
    (tmp_path / "bad.ckpt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(JobFailed, match=r"not a readable \.safetensors file"):
        kind_of_file(tmp_path / "bad.safetensors")
    with pytest.raises(JobFailed, match="not a readable PyTorch checkpoint"):
        kind_of_file(tmp_path / "bad.ckpt")


# --- families from keys -----------------------------------------------------------------------

UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
SD1_TEXT = "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"
SD2_TEXT = "cond_stage_model.model.token_embedding.weight"
XL_TEXT_1 = "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight"
XL_TEXT_2 = "conditioner.embedders.1.model.positional_embedding"
XL_REFINER = "conditioner.embedders.0.model.positional_embedding"


@pytest.mark.parametrize(
    ("keys", "in_channels", "kind", "variant"),
    [
        ([SD1_TEXT], 4, ModelKind.SD1, "sd1"),
        ([SD2_TEXT], 4, ModelKind.SD2, "sd2"),
        ([XL_TEXT_1, XL_TEXT_2], 4, ModelKind.SDXL, "sdxl"),
        ([SD2_TEXT], 5, ModelKind.DEPTH2IMG, "sd2-depth"),
        ([SD2_TEXT], 7, ModelKind.UPSCALER_X4, "x4-upscaler"),
        ([SD1_TEXT], 9, ModelKind.UNKNOWN, "sd1-inpaint"),
        ([SD2_TEXT], 9, ModelKind.UNKNOWN, "sd2-inpaint"),
        ([XL_TEXT_1, XL_TEXT_2], 9, ModelKind.UNKNOWN, "sdxl-inpaint"),
        ([XL_REFINER], 4, ModelKind.UNKNOWN, "sdxl-refiner"),
        ([], 4, ModelKind.UNKNOWN, "unet-only"),
    ],
)
def test_families_and_variants_from_a_few_keys(
    tmp_path: Path, keys: list[str], in_channels: int, kind: ModelKind, variant: str
) -> None:
    shapes = {key: (2, 2) for key in keys} | {UNET_IN: (8, in_channels, 3, 3)}
    path = ldm.fake_checkpoint(tmp_path / "fake.safetensors", shapes)
    info = inspect_checkpoint(path)
    assert (info.kind, info.variant) == (kind, variant)
    assert bool(info.problem) == (kind is ModelKind.UNKNOWN)


def test_a_lora_is_not_a_model(tmp_path: Path) -> None:
    path = ldm.fake_checkpoint(tmp_path / "lora.safetensors", {"lora_unet_down_blocks_0.alpha": (1,)})
    info = inspect_checkpoint(path)
    assert info.kind is ModelKind.UNKNOWN
    assert "LoRA" in info.problem


def test_an_inpainting_file_is_refused_with_the_reason(tmp_path: Path) -> None:
    path = ldm.fake_checkpoint(tmp_path / "inpaint.safetensors", {SD1_TEXT: (2, 2), UNET_IN: (8, 9, 3, 3)})
    with pytest.raises(JobFailed, match="inpainting checkpoints load as diffusers folders only") as caught:
        load_single_file(entry(path), ModelKind.UNKNOWN, dtype=torch.float32)
    assert caught.value.code is Code.MODEL_FAILED


# --- where the configs come from ----------------------------------------------------------------


def test_a_config_folder_beside_the_file_is_found(tiny: Tiny, tmp_path: Path, cache: Path) -> None:
    shutil.copytree(tiny.folder, tmp_path / "tiny")
    shutil.copy(tiny.safetensors, tmp_path / "tiny.safetensors")
    assert resolve_config(entry(tmp_path / "tiny.safetensors"), ModelKind.SD1, cache_dir=cache) == tmp_path / "tiny"
    # A diffusers folder that also holds the single file (the layout of many published repos).
    shutil.copy(tiny.ckpt, tmp_path / "tiny" / "model.ckpt")
    assert resolve_config(entry(tmp_path / "tiny" / "model.ckpt"), ModelKind.SD1, cache_dir=cache) == tmp_path / "tiny"


def test_a_named_config_that_is_incomplete_says_exactly_what_is_missing(tiny: Tiny, tmp_path: Path) -> None:
    config = tmp_path / "config"
    shutil.copytree(tiny.folder, config)
    (config / "unet" / "config.json").unlink()
    (config / "tokenizer" / "merges.txt").unlink()
    (config / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    assert missing_config_files(config, ModelKind.SD1) == ["tokenizer/merges.txt", "unet/config.json"]
    with pytest.raises(ConfigError) as caught:
        resolve_config(entry(tiny.safetensors, config=config), ModelKind.SD1)
    error = caught.value
    assert f"the `config:` folder {config} is missing tokenizer/merges.txt, unet/config.json" in error.message
    assert "vae/config.json" not in error.message
    assert "stable-diffusion-v1-5" in error.fix
    assert "`config:`" in error.fix
    assert (error.field, error.value) == ("models", "m")


def test_a_named_config_that_does_not_exist(tiny: Tiny, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"folder .*nowhere does not exist"):
        resolve_config(entry(tiny.safetensors, config=tmp_path / "nowhere"), ModelKind.SD1)


def test_a_named_config_of_another_family_is_refused(tiny: Tiny, cache: Path) -> None:
    sd2 = assemble_shipped_config("sd2", cache_dir=cache)
    with pytest.raises(ConfigError, match="holds sd2 configs, but the file is sd1"):
        resolve_config(entry(tiny.safetensors, config=sd2), ModelKind.SD1)


def test_no_config_anywhere_lists_what_to_provide(tmp_path: Path, cache: Path) -> None:
    path = ldm.fake_checkpoint(tmp_path / "x4.safetensors", {SD2_TEXT: (2, 2), UNET_IN: (8, 7, 3, 3)})
    (tmp_path / "x4").mkdir()  # a folder of the file's name, but no diffusers layout in it
    with pytest.raises(ConfigError) as caught:
        resolve_config(entry(path), ModelKind.UPSCALER_X4, cache_dir=cache)
    error = caught.value
    assert f"{tmp_path / 'x4'} has no model_index.json" in error.message
    assert "the project ships none for upscaler_x4" in error.message
    assert "low_res_scheduler/scheduler_config.json" in error.fix
    assert "tokenizer/vocab.json" in error.fix


# --- the shipped configs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "prediction", "name", "size"),
    [
        (ModelKind.SD1, None, "sd1", 512),
        (ModelKind.SD2, None, "sd2", 512),
        (ModelKind.SD2, "v_prediction", "sd2-v", 768),
        (ModelKind.SDXL, None, "sdxl", 1024),
    ],
)
def test_shipped_configs_make_complete_folders(
    tmp_path: Path, cache: Path, kind: ModelKind, prediction: str | None, name: str, size: int
) -> None:
    from diffusers import UNet2DConditionModel

    assert shipped_config_name(kind, prediction) == name
    folder = resolve_config(entry(tmp_path / "model.safetensors", prediction=prediction), kind, cache_dir=cache)
    assert folder.parent == cache / "configs" and folder.name.startswith(name + "-")
    assert missing_config_files(folder, kind) == []
    assert detect_kind(folder) is kind
    assert UNet2DConditionModel.load_config(folder / "unet")["sample_size"] * 8 == size
    assert assemble_shipped_config(name, cache_dir=cache) == folder  # assembled once, then reused


def test_the_shipped_tokenizers_are_clips(cache: Path) -> None:
    from transformers import CLIPTokenizer

    sd1 = CLIPTokenizer.from_pretrained(assemble_shipped_config("sd1", cache_dir=cache) / "tokenizer")
    assert len(sd1) == 49408
    assert sd1(PROMPT).input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's own ids
    assert (sd1.pad_token, sd1.model_max_length) == ("<|endoftext|>", 77)
    sd2 = CLIPTokenizer.from_pretrained(assemble_shipped_config("sd2", cache_dir=cache) / "tokenizer")
    assert (sd2.pad_token, sd2.pad_token_id) == ("!", 0)  # OpenCLIP pads with zeros
    xl = assemble_shipped_config("sdxl", cache_dir=cache)
    assert CLIPTokenizer.from_pretrained(xl / "tokenizer").pad_token == "<|endoftext|>"
    assert CLIPTokenizer.from_pretrained(xl / "tokenizer_2").pad_token == "!"


@pytest.mark.parametrize(
    ("name", "unet", "text_encoders"),
    [
        ("sd1", 859_520_964, [123_060_480]),
        ("sd2", 865_910_724, [340_387_840]),
        ("sdxl", 2_567_463_684, [123_060_480, 694_659_840]),
    ],
)
def test_shipped_configs_describe_the_real_architectures(
    cache: Path, name: str, unet: int, text_encoders: list[int]
) -> None:
    """Parameter counts of the published models, built on the meta device (no memory, no weights)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = assemble_shipped_config(name, cache_dir=cache)

    def count(model: torch.nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    with init_empty_weights():
        assert count(UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))) == unet
        assert count(AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))) == 83_653_863
        classes = [CLIPTextModel, CLIPTextModelWithProjection]
        for sub, cls, expected in zip(["text_encoder", "text_encoder_2"], classes, text_encoders, strict=False):
            assert count(cls(CLIPTextConfig.from_pretrained(folder / sub))) == expected


@pytest.mark.parametrize("suffix", ["safetensors", "ckpt"])
def test_a_single_file_model_through_the_daemon(tiny: Tiny, tmp_path: Path, test_models, suffix: str) -> None:
    """What a user does: name the file (and its configs) in the config, drop a job, read the manifest."""
    from tests.conftest import CEILING_S, Spool, start_daemon_thread, wait_for, write_config

    root = tmp_path / "spool"
    (root / "inbox").mkdir(parents=True)
    model = {"path": str(getattr(tiny, suffix)), "config": str(tiny.folder)}
    spool = Spool(root, write_config(root, test_models, models={"v15": model}, defaults={"all": {"model": "v15"}}))
    spool.drop("one.yaml", "prompt: from a single file\nseed: 0\nsize: 64x64\nsteps: 2\n")
    with start_daemon_thread(spool):
        [manifest] = wait_for(spool.manifests, timeout_s=CEILING_S, what="a manifest")
    digest = hashlib.sha256(getattr(tiny, suffix).read_bytes()).hexdigest()[:10]
    assert manifest["model"]["hash"] == digest, "AUTOMATIC1111's short hash of the file"
    assert manifest["model"]["family"] == "sd1"
    assert f"Model hash: {digest}" in read_parameters(str(spool.outbox / manifest["outputs"][0]["file"]))
