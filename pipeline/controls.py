"""ControlNet for sketches: each control's image prepared, and the pipeline call's control arguments.

A control's image is made the size the job runs at (its `resize` mode), then preprocessed by a
method that needs no downloaded weights: `invert` (a sketch's dark lines on white become the white
lines on black that scribble and lineart ControlNets were trained on), `scribble` (thresholded, then
inverted: every stroke darker than `threshold` is a line, whatever the paper's shade) or `canny`
(OpenCV's edge detector, the one A1111's `canny` module runs). Several controls are one
`MultiControlNetModel` call, each with its own weight and start and end.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from diffusiond.pipeline.errors import Code, DiffusiondError, JobFailed
from diffusiond.pipeline.families import safetensors_shapes
from diffusiond.pipeline.hashing import file_sha256
from diffusiond.pipeline.inputs import resized_input
from diffusiond.pipeline.job import ControlUse, Task


def prepare(image: Image.Image, use: ControlUse, size: tuple[int, int]) -> Image.Image:
    """The picture the ControlNet sees: `image` at `size`, preprocessed, in RGB."""
    # `fit` keeps the input's shape, which a control image cannot (it must be the job's size): as `fill`.
    fitted = resized_input(image.convert("RGB"), size, "fill" if use.resize == "fit" else use.resize)
    if use.preprocess == "none":
        return fitted
    if use.preprocess == "invert":
        return ImageOps.invert(fitted)
    gray = np.asarray(fitted.convert("L"))
    if use.preprocess == "scribble":
        lines = np.where(gray < use.threshold, 255, 0).astype(np.uint8)
        return Image.fromarray(lines).convert("RGB")
    import cv2  # opencv-python-headless (a dependency, for the DWT marks); imported here, where it is used

    edges = cv2.Canny(gray, use.low_threshold, use.high_threshold)
    return Image.fromarray(edges).convert("RGB")


def call_arguments(
    task: Task, uses: Sequence[ControlUse], images: Sequence[Image.Image], size: tuple[int, int]
) -> dict[str, Any]:
    """The ControlNet pipelines' arguments for these controls: one value for one control, lists for several."""
    prepared = [prepare(image, use, size) for use, image in zip(uses, images, strict=True)]
    # txt2img's control pipeline takes the control as `image`; img2img's (and inpaint's) has `image` for
    # the picture it redraws, and the control as `control_image`.
    key = "image" if task is Task.TXT2IMG else "control_image"
    single = len(uses) == 1
    return {
        key: prepared[0] if single else prepared,
        "controlnet_conditioning_scale": uses[0].weight if single else [u.weight for u in uses],
        "control_guidance_start": uses[0].start if single else [u.start for u in uses],
        "control_guidance_end": uses[0].end if single else [u.end for u in uses],
    }


# --- the ControlNet models ------------------------------------------------------------------

MAX_CONTROLNETS = 4
"""ControlNets kept loaded: more are unloaded, least recently used first."""


def load_controlnet(name: str, path: Path, *, dtype: Any, base: Any) -> Any:
    """A ControlNet from a diffusers folder, or a single `.safetensors` (its config from the model's UNet)."""
    from diffusers import ControlNetModel

    try:
        if path.is_dir():
            return ControlNetModel.from_pretrained(path, dtype=dtype, local_files_only=True)
        if path.suffix.lower() != ".safetensors":  # a pickle can run code when loaded
            raise ValueError("a ControlNet file must be .safetensors (a .pth/.ckpt pickle is not loaded)")
        with tempfile.TemporaryDirectory(prefix="diffusiond-controlnet-") as folder:
            # A ControlNet has the architecture of its base model's UNet, plus an encoder of the control
            # image whose widths the file's shapes tell: that is the config diffusers' converter needs
            # (the one it would fetch from the hub cannot be reached).
            channels = _conditioning_channels(safetensors_shapes(path))
            ControlNetModel.from_unet(
                base.unet, conditioning_embedding_out_channels=channels, load_weights_from_unet=False
            ).save_config(folder)
            config = Path(folder) / "config.json"
            # It takes the 4 latent channels, also beside an inpainting model's 9-channel UNet.
            config.write_text(json.dumps(json.loads(config.read_text()) | {"in_channels": 4}), encoding="utf-8")
            return ControlNetModel.from_single_file(str(path), config=folder, dtype=dtype, local_files_only=True)
    except DiffusiondError as exc:  # its header is not a safetensors header
        raise JobFailed(
            f"ControlNet {name!r} at {path}: {exc.message}",
            code=Code.MODEL_FAILED,
            field="control",
            value=name,
            fix="replace the file with a complete ControlNet .safetensors",
        ) from exc
    except PermissionError as exc:
        raise JobFailed(
            f"ControlNet {name!r}: {exc.filename or path} cannot be read (permission denied)",
            code=Code.MODEL_FAILED,
            field="control",
            value=name,
            fix=f"let the daemon's user read it: chmod -R a+rX {path}",
        ) from exc
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise JobFailed(
            f"ControlNet {name!r} could not be loaded from {path}: {type(exc).__name__}: {exc}",
            code=Code.MODEL_FAILED,
            field="control",
            value=name,
            fix="point the config's `controlnets:` at diffusers ControlNet folders (config.json and weights) "
            "or ControlNet .safetensors files",
        ) from exc


_CONDITIONING_CONVS = {
    "original": ("input_hint_block.0", "input_hint_block.4", "input_hint_block.8", "input_hint_block.12"),
    "diffusers": (
        "controlnet_cond_embedding.conv_in",
        "controlnet_cond_embedding.blocks.1",
        "controlnet_cond_embedding.blocks.3",
        "controlnet_cond_embedding.blocks.5",
    ),
}
"""The convolutions whose output widths are `conditioning_embedding_out_channels`, in each layout."""


def _conditioning_channels(shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    for names in _CONDITIONING_CONVS.values():
        widths = [
            shape[0]
            for name in names
            for key, shape in shapes.items()
            if key.removeprefix("control_model.") == f"{name}.weight"
        ]
        if len(widths) == len(names):
            return tuple(widths)
    raise ValueError("it holds no ControlNet control-image encoder (input_hint_block / controlnet_cond_embedding)")


def check_fits(name: str, controlnet: Any, model: str, pipe: Any) -> None:
    """A ControlNet steers the UNet of the family it was trained for: an SD 1.5 one on SDXL is refused."""
    ours, theirs = pipe.unet.config, controlnet.config
    for key in ("cross_attention_dim", "addition_embed_type", "block_out_channels"):
        if _plain(ours.get(key)) != _plain(theirs.get(key)):
            raise JobFailed(
                f"ControlNet {name!r} was made for another model family than model '{model}' "
                f"({key} {_plain(theirs.get(key))} vs {_plain(ours.get(key))})",
                code=Code.MODEL_FAILED,
                field="control",
                value=name,
                fix="use a ControlNet made for this model's family (SD 1.x, 2.x or SDXL), or another model",
            )


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, list | tuple) else value


def controlnet_record(name: str, path: Path) -> dict[str, Any]:
    """What the manifest lists of a ControlNet: its weights' file and sha256, and A1111's short hash of it."""
    weights = path if path.is_file() else _weights_file(path)
    sha256 = file_sha256(weights) if weights is not None else None
    return {"name": name, "file": str(path), "sha256": sha256, "hash": old_a1111_hash(weights) if weights else None}


def old_a1111_hash(path: Path) -> str:
    """The hash sd-webui-controlnet shows beside a ControlNet (`control_v11p_sd15_canny [d14c016b]`):
    A1111's old model hash, the sha256 of the 64 KiB at offset 1 MiB, 8 hex digits."""
    with open(path, "rb") as handle:
        handle.seek(0x100000)
        return hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]


def _weights_file(folder: Path) -> Path | None:
    """The file `from_pretrained` loads: the plain name first (not a `.fp16` variant)."""
    plain = folder / "diffusion_pytorch_model.safetensors"
    others = sorted(folder.glob("diffusion_pytorch_model*.safetensors")) + sorted(folder.glob("*.bin"))
    return plain if plain.is_file() else next(iter(others), None)
