"""What the config's model names point at, read from disk without importing torch.

The job validator needs to know whether `model: x4` is an upscaler before any
model is loaded, so a wrong pairing is rejected at validation time, not on the
GPU. The family also decides the pipeline class: the user never names one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


class ModelKind(StrEnum):
    """A model family: which pipelines it drives and how it was trained."""

    SD1 = "sd1"
    """Stable Diffusion 1.x (CLIP ViT-L text encoder, 512 px): txt2img, img2img."""
    SD2 = "sd2"
    """Stable Diffusion 2.x (OpenCLIP ViT-H, epsilon 512 px or v-prediction 768 px): txt2img, img2img."""
    SDXL = "sdxl"
    """Stable Diffusion XL (two text encoders, 1024 px): txt2img, img2img."""
    UPSCALER_X4 = "upscaler_x4"
    """The prompt-guided x4 upscaler (`stabilityai/stable-diffusion-x4-upscaler` layout)."""
    DEPTH2IMG = "depth2img"
    """SD 2 depth-to-image (`stabilityai/stable-diffusion-2-depth`): depth2img."""
    UNKNOWN = "unknown"
    """Not known before loading (a `.ckpt`, a missing path); loading says what it is or why not."""


TASKS_BY_KIND: dict[ModelKind, tuple[str, ...]] = {
    ModelKind.SD1: ("txt2img", "img2img"),
    ModelKind.SD2: ("txt2img", "img2img"),
    ModelKind.SDXL: ("txt2img", "img2img"),
    ModelKind.UPSCALER_X4: ("upscale",),
    ModelKind.DEPTH2IMG: ("depth2img",),
    ModelKind.UNKNOWN: (),
}


@dataclass(frozen=True)
class ModelEntry:
    """One `models:` entry of the config."""

    name: str
    path: Path
    kind: ModelKind
    config: Path | None = None
    """For a single file: a diffusers folder with the configs and tokenizers (weights not needed)."""
    prediction: str | None = None
    """`epsilon` or `v_prediction`, when the user says so (single SD 2 files cannot tell)."""

    @property
    def single_file(self) -> bool:
        return self.path.suffix.lower() in SINGLE_FILE_SUFFIXES


def detect_kind(path: Path) -> ModelKind:
    """The family of a diffusers folder, from its model_index.json and component configs."""
    try:
        class_name = _read_json(path / "model_index.json").get("_class_name", "")
    except (OSError, ValueError):
        return ModelKind.UNKNOWN
    if class_name.startswith("StableDiffusionXL"):
        return ModelKind.SDXL
    if class_name == "StableDiffusionUpscalePipeline":
        return ModelKind.UPSCALER_X4
    if class_name == "StableDiffusionDepth2ImgPipeline":
        return ModelKind.DEPTH2IMG
    if class_name.startswith("StableDiffusion"):
        return ModelKind.SD2 if _is_sd2(path) else ModelKind.SD1
    return ModelKind.UNKNOWN


def _is_sd2(path: Path) -> bool:
    """SD 2 uses OpenCLIP (gelu, not quick_gelu) and linear projections in its transformer blocks."""
    try:
        text = _read_json(path / "text_encoder" / "config.json")
        unet = _read_json(path / "unet" / "config.json")
    except (OSError, ValueError):
        return False
    return text.get("hidden_act") == "gelu" or bool(unet.get("use_linear_projection"))


def _read_json(path: Path) -> dict:
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def tasks_for(kind: ModelKind) -> tuple[str, ...]:
    """The job tasks a model of this kind can run."""
    return TASKS_BY_KIND[kind]


_FAMILY_SIZES = {ModelKind.SD1: 512, ModelKind.SD2: 512, ModelKind.SDXL: 1024, ModelKind.DEPTH2IMG: 512}


def kind_of_path(path: Path) -> ModelKind:
    """A diffusers folder's or a .safetensors file's family; `.ckpt` (a pickle) is only known when loaded."""
    if path.suffix.lower() == ".safetensors":
        from diffusiond.pipeline.checkpoint import kind_of_file  # reads the header only; no torch
        from diffusiond.pipeline.errors import DiffusiondError

        try:
            return kind_of_file(path)
        except DiffusiondError:
            return ModelKind.UNKNOWN  # loading it says why
    if path.suffix.lower() == ".ckpt":
        return ModelKind.UNKNOWN
    return detect_kind(path)


def native_size(path: Path, kind: ModelKind, prediction: str | None = None) -> int | None:
    """The side in pixels a model was trained at: its default txt2img size."""
    if path.is_dir():
        try:
            unet = _read_json(path / "unet" / "config.json")
            vae = _read_json(path / "vae" / "config.json")
            return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
        except (OSError, ValueError, KeyError, TypeError):
            return None
    if kind is ModelKind.SD2 and prediction == "v_prediction":
        return 768  # the SD 2.x 768-v models
    return _FAMILY_SIZES.get(kind)
