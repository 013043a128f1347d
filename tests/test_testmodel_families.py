"""The tiny SD 2.x (v), SDXL and depth-to-image test models: layout, offline loading, generation, determinism."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"

import diffusers
import transformers
from diffusers import (
    StableDiffusionDepth2ImgPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)

from diffusiond.pipeline.families import ModelKind, detect_kind
from diffusiond.pipeline.testmodel import FamilyModelPaths, is_test_model, make_family_models, make_test_model

PROMPT = "a photo of a cat"


@pytest.fixture(scope="session")
def family_models(tmp_path_factory: pytest.TempPathFactory) -> FamilyModelPaths:
    return make_family_models(tmp_path_factory.mktemp("family-models"))


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from a second thread, and when other processes keep both cores busy,
    2 OpenMP threads turned 0.05 s generations into 5-12 s ones (1 thread stayed under 0.4 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def _no_loader_warnings() -> Iterator[None]:
    """Fail on warnings diffusers or transformers log while loading (missing components, wrong types, ...).

    Both libraries' loggers do not propagate, so pytest's caplog would not see them. The one
    expected warning, transformers falling back to a PIL image processor because torchvision
    is not installed, is logged once per process at import time and is ignored here.
    """
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(level=logging.WARNING)
    loggers = [logging.getLogger("diffusers"), logging.getLogger("transformers")]
    for lib_logger in loggers:
        lib_logger.addHandler(handler)
    try:
        yield
    finally:
        for lib_logger in loggers:
            lib_logger.removeHandler(handler)
    messages = [r.getMessage() for r in records if "requires torchvision" not in r.getMessage()]
    assert not messages


def _load(cls: type, folder: Path):
    with _no_loader_warnings():
        pipe = cls.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(size: int = 64) -> Image.Image:
    return Image.linear_gradient("L").resize((size, size)).convert("RGB")


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(7)


@pytest.mark.parametrize(
    ("field", "kind"),
    [("sd2_v", ModelKind.SD2), ("sdxl", ModelKind.SDXL), ("depth2img", ModelKind.DEPTH2IMG)],
)
def test_detect_kind(family_models: FamilyModelPaths, field: str, kind: ModelKind) -> None:
    folder = getattr(family_models, field)
    assert detect_kind(folder) is kind
    assert is_test_model(folder)


def test_sd2_v_layout(family_models: FamilyModelPaths) -> None:
    folder = family_models.sd2_v
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler"
    assert scheduler["prediction_type"] == "v_prediction"
    assert json.loads((folder / "text_encoder" / "config.json").read_text())["hidden_act"] == "gelu"
    unet = json.loads((folder / "unet" / "config.json").read_text())
    assert unet["use_linear_projection"] is True
    assert unet["attention_head_dim"] == [2, 4, 8, 8]
    assert len(json.loads((folder / "vae" / "config.json").read_text())["block_out_channels"]) == 4
    assert json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())["pad_token"] == "!"


def test_sd2_v_txt2img_and_img2img(family_models: FamilyModelPaths) -> None:
    pipe = _load(StableDiffusionPipeline, family_models.sd2_v)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    image = pipe(PROMPT, height=64, width=64, num_inference_steps=2, generator=_generator()).images[0]
    assert image.size == (64, 64)

    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    image = img2img(PROMPT, image=_image(), strength=0.75, num_inference_steps=2, generator=_generator()).images[0]
    assert image.size == (64, 64)


def test_sdxl_txt2img_and_img2img(family_models: FamilyModelPaths) -> None:
    pipe = _load(StableDiffusionXLPipeline, family_models.sdxl)
    assert pipe.config.force_zeros_for_empty_prompt is True
    assert pipe.tokenizer.pad_token == "<|endoftext|>"
    assert pipe.tokenizer_2.pad_token == "!"
    assert pipe.unet.config.addition_embed_type == "text_time"
    image = pipe(PROMPT, height=64, width=64, num_inference_steps=2, generator=_generator()).images[0]
    assert image.size == (64, 64)

    # The base model's UNet takes 6 size/crop numbers; aesthetic scores (5 numbers) are the refiner's.
    img2img = StableDiffusionXLImg2ImgPipeline(**pipe.components, requires_aesthetics_score=False)
    img2img.set_progress_bar_config(disable=True)
    image = img2img(PROMPT, image=_image(), strength=0.75, num_inference_steps=2, generator=_generator()).images[0]
    assert image.size == (64, 64)


def test_sdxl_folder_loads_as_img2img(family_models: FamilyModelPaths) -> None:
    pipe = _load(StableDiffusionXLImg2ImgPipeline, family_models.sdxl)
    assert pipe.config.requires_aesthetics_score is False
    image = pipe(PROMPT, image=_image(), strength=0.5, num_inference_steps=2, generator=_generator()).images[0]
    assert image.size == (64, 64)


@pytest.mark.filterwarnings("ignore:In CPU autocast, but the target dtype is not supported:UserWarning")
def test_depth2img(family_models: FamilyModelPaths) -> None:
    pipe = _load(StableDiffusionDepth2ImgPipeline, family_models.depth2img)
    assert pipe.unet.config.in_channels == 5
    assert type(pipe.depth_estimator).__name__ == "DPTForDepthEstimation"
    # The depth estimator runs on the image (no depth_map given) ...
    image = pipe(PROMPT, image=_image(), strength=0.8, num_inference_steps=2, generator=_generator()).images[0]
    assert image.size == (64, 64)
    # ... or the caller passes a depth map (any size; the pipeline resizes it to the latent).
    depth = torch.linspace(0, 1, 64 * 64).reshape(1, 64, 64)
    image = pipe(PROMPT, image=_image(), depth_map=depth, num_inference_steps=2, generator=_generator()).images[0]
    assert image.size == (64, 64)


def _safetensors_hashes(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*.safetensors"))
    }


def test_family_build_is_deterministic_and_reused(family_models: FamilyModelPaths, tmp_path: Path) -> None:
    root = family_models.sdxl.parent
    again = make_family_models(tmp_path)
    first, second = _safetensors_hashes(root), _safetensors_hashes(tmp_path)
    assert len(first) == 14  # sd2-v 3, sdxl 4, depth 4, refiner 3
    assert first == second
    assert (family_models.sd2_v / "model_index.json").read_bytes() == (again.sd2_v / "model_index.json").read_bytes()

    # An existing test model is kept, not rebuilt.
    stamp = (again.sdxl / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    make_family_models(tmp_path)
    assert (again.sdxl / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp


def test_family_build_refuses_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "sdxl").mkdir()
    (tmp_path / "sdxl" / "mine.txt").write_text("not a test model")
    with pytest.raises(FileExistsError):
        make_family_models(tmp_path)
    assert (tmp_path / "sdxl" / "mine.txt").exists()


# sha256 of make_test_model's weights before make_family_models was added (random init depends on
# the library versions, so the check only applies to the versions they were recorded with).
_SD1_HASHES_VERSIONS = ("2.13.0+cpu", "0.42.1", "5.24.0")
_SD1_HASHES = {
    "sd/text_encoder/model.safetensors": "1fe27c4f36ea39c51a585ba16c6d68afc7e01a5ead6f399ecad1d173996128be",
    "sd/unet/diffusion_pytorch_model.safetensors": "496d2b08fa2074f9dfbb0e584d3d7cfe6044a0e23d2a740e6846d17df3937d71",
    "sd/vae/diffusion_pytorch_model.safetensors": "c46b87e0dde1cb1d1525cdf4c8c1184162f9e9cd8b4922b966360fbbb3afeb1e",
    "x4-upscaler/text_encoder/model.safetensors": "1fe27c4f36ea39c51a585ba16c6d68afc7e01a5ead6f399ecad1d173996128be",
    "x4-upscaler/unet/diffusion_pytorch_model.safetensors": (
        "5b7045b5f1d9bc28c022585e6e429752d491dfd8204c44c105ca1277677f449d"
    ),
    "x4-upscaler/vae/diffusion_pytorch_model.safetensors": (
        "7806bd235e3c3e0064529a12275939a9f9d695b7d8a4cea61ba927dc46198e58"
    ),
}


def test_make_test_model_unchanged(tmp_path: Path) -> None:
    versions = (torch.__version__, diffusers.__version__, transformers.__version__)
    if versions != _SD1_HASHES_VERSIONS:
        pytest.skip(f"hashes recorded with torch/diffusers/transformers {_SD1_HASHES_VERSIONS}, running {versions}")
    make_test_model(tmp_path)
    assert _safetensors_hashes(tmp_path) == _SD1_HASHES


def test_the_test_models_are_readable_by_every_user(test_models) -> None:
    """Made by root, read by a service's own user: no 0700 folder (mkdtemp) or 0600 weights (safetensors)."""
    umask = os.umask(0)
    os.umask(umask)
    for model in (test_models.sd, test_models.upscaler):
        paths = [model, *model.rglob("*")]
        assert any(p.suffix == ".safetensors" for p in paths)
        for path in paths:
            mode = path.stat().st_mode & 0o777
            assert mode == (0o777 if path.is_dir() else 0o666) & ~umask, f"{path}: {oct(mode)}"
