"""What the config's model names point at, read from disk without importing torch.

The job validator needs to know whether `model: x4` is an upscaler before any
model is loaded, so a wrong pairing is rejected at validation time, not on the GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path


class ModelKind(StrEnum):
    """Which pipelines a model can drive."""

    SD = "sd"
    """A Stable Diffusion model: txt2img and img2img."""
    UPSCALER_X4 = "upscaler_x4"
    """The prompt-guided x4 upscaler (`stabilityai/stable-diffusion-x4-upscaler` layout)."""
    UNKNOWN = "unknown"
    """A path that is missing or not a diffusers folder; loading it will say why."""


# model_index.json `_class_name` → kind. Any Stable Diffusion pipeline class names
# the same weights layout, so img2img/inpaint exports load as txt2img models too.
_CLASS_KINDS = {
    "StableDiffusionPipeline": ModelKind.SD,
    "StableDiffusionImg2ImgPipeline": ModelKind.SD,
    "StableDiffusionUpscalePipeline": ModelKind.UPSCALER_X4,
}


@dataclass(frozen=True)
class ModelEntry:
    """One `models:` entry of the config."""

    name: str
    path: Path
    kind: ModelKind


def detect_kind(path: Path) -> ModelKind:
    """Read the kind from a diffusers folder's model_index.json."""
    index = path / "model_index.json"
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
    except (OSError, ValueError):
        return ModelKind.UNKNOWN
    return _CLASS_KINDS.get(class_name, ModelKind.UNKNOWN)


def tasks_for(kind: ModelKind) -> tuple[str, ...]:
    """The job tasks a model of this kind can run."""
    if kind is ModelKind.SD:
        return ("txt2img", "img2img")
    if kind is ModelKind.UPSCALER_X4:
        return ("upscale",)
    return ()
