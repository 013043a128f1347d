"""What the config's model names point at, read from disk without importing torch.

The job validator needs to know whether `model: x4` is an upscaler before any
model is loaded, so a wrong pairing is rejected at validation time, not on the
GPU. The family also decides the pipeline class: the user never names one.

A diffusers folder says its family in `model_index.json` and its component
configs; a single `.safetensors` file says it in its tensor names, read from the
header alone. A `.ckpt` is a pickle: its family is known only when
`single_file.inspect_checkpoint` reads it (with torch, `weights_only=True`).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from diffusiond.pipeline.errors import Code, DiffusiondError, JobFailed

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
"""The UNet's input conv: its in_channels tell txt2img (4), depth (5), x4 upscaler (7) and inpaint (9) apart."""
_MAX_HEADER = 100_000_000


class ModelKind(StrEnum):
    """A model family: which pipelines it drives and how it was trained."""

    SD1 = "sd1"
    """Stable Diffusion 1.x (CLIP ViT-L text encoder, 512 px): txt2img, img2img."""
    SD2 = "sd2"
    """Stable Diffusion 2.x (OpenCLIP ViT-H, epsilon 512 px or v-prediction 768 px): txt2img, img2img."""
    SDXL = "sdxl"
    """Stable Diffusion XL (two text encoders, 1024 px): txt2img, img2img."""
    SDXL_REFINER = "sdxl_refiner"
    """The SDXL refiner (its second text encoder only, aesthetic-score conditioning): img2img, as a stage."""
    SD1_INPAINT = "sd1_inpaint"
    """An SD 1.x inpainting model (9-channel UNet: latents, mask, masked image): img2img with a mask."""
    SD2_INPAINT = "sd2_inpaint"
    """An SD 2.x inpainting model (`stabilityai/stable-diffusion-2-inpainting`): img2img with a mask."""
    SDXL_INPAINT = "sdxl_inpaint"
    """An SDXL inpainting model (9-channel UNet): img2img with a mask."""
    UPSCALER_X4 = "upscaler_x4"
    """The prompt-guided x4 upscaler (`stabilityai/stable-diffusion-x4-upscaler` layout)."""
    DEPTH2IMG = "depth2img"
    """SD 2 depth-to-image (`stabilityai/stable-diffusion-2-depth`): depth2img."""
    UNKNOWN = "unknown"
    """Not known before loading (a `.ckpt`, a missing path); loading says what it is or why not."""


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
    vae: Path | None = None
    """A VAE that replaces the model's own (a diffusers folder or a single .safetensors)."""

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
        index = _read_json(path / "model_index.json")
        first_encoder = index.get("text_encoder") or [None]
        if first_encoder[0] is None:
            return ModelKind.SDXL_REFINER
        return ModelKind.SDXL_INPAINT if _unet_in_channels(path) == 9 else ModelKind.SDXL
    if class_name == "StableDiffusionUpscalePipeline":
        return ModelKind.UPSCALER_X4
    if class_name == "StableDiffusionDepth2ImgPipeline":
        return ModelKind.DEPTH2IMG
    if class_name.startswith("StableDiffusion"):
        sd2 = _is_sd2(path)
        if _unet_in_channels(path) == 9:  # the inpainting UNet, whatever class the folder was saved as
            return ModelKind.SD2_INPAINT if sd2 else ModelKind.SD1_INPAINT
        return ModelKind.SD2 if sd2 else ModelKind.SD1
    return ModelKind.UNKNOWN


INPAINT_KINDS = (ModelKind.SD1_INPAINT, ModelKind.SD2_INPAINT, ModelKind.SDXL_INPAINT)
"""Inpainting models: the UNet also takes the mask and the masked image (9 input channels)."""


def _unet_in_channels(path: Path) -> int | None:
    try:
        value = _read_json(path / "unet" / "config.json").get("in_channels")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, int) else None


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


_FAMILY_SIZES = {
    ModelKind.SD1: 512,
    ModelKind.SD2: 512,
    ModelKind.SDXL: 1024,
    ModelKind.SDXL_REFINER: 1024,
    ModelKind.DEPTH2IMG: 512,
    ModelKind.SD1_INPAINT: 512,
    ModelKind.SD2_INPAINT: 512,
    ModelKind.SDXL_INPAINT: 1024,
}


def kind_of_path(path: Path) -> ModelKind:
    """A diffusers folder's or a .safetensors file's family; `.ckpt` (a pickle) is only known when loaded."""
    if path.suffix.lower() == ".safetensors":
        try:
            return inspect_shapes(safetensors_shapes(path)).kind
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


# --- what a single file's tensor names say ---------------------------------------------------


@dataclass(frozen=True)
class CheckpointInfo:
    """What a single file's tensor names say about it."""

    kind: ModelKind
    variant: str
    """In words: sd1, sd2, sdxl, sd2-depth, x4-upscaler, or an unsupported one (sd1-inpaint, sdxl-refiner, ...)."""
    problem: str = ""
    """Why the daemon cannot load this file; empty when it can."""


def inspect_shapes(shapes: Mapping[str, tuple[int, ...]]) -> CheckpointInfo:
    """The family from an original-layout state dict's names (and one shape), without its values."""

    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in shapes)

    unet_in = shapes.get(UNET_IN, ())
    in_channels = unet_in[1] if len(unet_in) >= 2 else None
    inpaint = (
        "inpainting checkpoints load as diffusers folders only; convert it once where the hub can be reached "
        "(diffusers' StableDiffusionInpaintPipeline.from_single_file(file).save_pretrained(folder)) and name "
        "the folder"
    )
    if has("conditioner.embedders."):
        if not has("conditioner.embedders.1."):
            return CheckpointInfo(
                ModelKind.UNKNOWN, "sdxl-refiner", "an SDXL refiner checkpoint: only SDXL base models are supported"
            )
        if in_channels == 9:
            return CheckpointInfo(ModelKind.UNKNOWN, "sdxl-inpaint", f"an SDXL inpainting checkpoint: {inpaint}")
        return CheckpointInfo(ModelKind.SDXL, "sdxl")
    if has("cond_stage_model.model."):  # OpenCLIP ViT-H: the SD 2.x family
        if in_channels == 5:
            return CheckpointInfo(ModelKind.DEPTH2IMG, "sd2-depth")
        if in_channels == 7:
            return CheckpointInfo(ModelKind.UPSCALER_X4, "x4-upscaler")
        if in_channels == 9:
            return CheckpointInfo(ModelKind.UNKNOWN, "sd2-inpaint", f"an SD 2 inpainting checkpoint: {inpaint}")
        return CheckpointInfo(ModelKind.SD2, "sd2")
    if has("cond_stage_model.transformer."):  # OpenAI CLIP ViT-L: the SD 1.x family
        if in_channels == 9:
            return CheckpointInfo(ModelKind.UNKNOWN, "sd1-inpaint", f"an SD 1 inpainting checkpoint: {inpaint}")
        if in_channels == 8:
            return CheckpointInfo(
                ModelKind.UNKNOWN, "sd1-instruct-pix2pix", "an InstructPix2Pix checkpoint: not supported"
            )
        return CheckpointInfo(ModelKind.SD1, "sd1")
    if has("model.diffusion_model."):
        return CheckpointInfo(
            ModelKind.UNKNOWN, "unet-only", "it holds a UNet but no text encoder (cond_stage_model.* / conditioner.*)"
        )
    return CheckpointInfo(
        ModelKind.UNKNOWN,
        "unknown",
        "it is not a Stable Diffusion checkpoint in the original layout (no model.diffusion_model.*, "
        "cond_stage_model.* or conditioner.* tensors): a LoRA, a VAE, an embedding or a diffusers-layout file "
        "cannot be loaded as a model",
    )


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a .safetensors header (8-byte little-endian length, then JSON): no torch."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(8)
            if len(raw) != 8:
                raise ValueError("shorter than a safetensors header")
            (length,) = struct.unpack("<Q", raw)
            if length > _MAX_HEADER:
                raise ValueError(f"a {length}-byte header")
            header: Any = json.loads(handle.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        header.pop("__metadata__", None)
        return {key: tuple(int(n) for n in meta["shape"]) for key, meta in header.items()}
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise model_file_error(path, f"is not a readable .safetensors file ({exc})") from exc


def model_file_error(path: Path, what: str) -> JobFailed:
    """A single file that cannot serve as a model, with the fix that applies to all such files."""
    return JobFailed(
        f"{path} {what}",
        code=Code.MODEL_FAILED,
        fix="point `models:` at a Stable Diffusion .safetensors/.ckpt file in the original layout, "
        "or at a diffusers folder",
    )
