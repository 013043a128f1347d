"""How an image says how it was made: AUTOMATIC1111 infotext and the full job as JSON.

PNG carries `parameters` (tEXt, the infotext every prompt reader parses) and
`diffusiond` (iTXt, the job and its manifest entry as JSON). JPEG and WebP carry
the infotext in EXIF UserComment, where AUTOMATIC1111 puts it.
"""

from __future__ import annotations

import io
import json
from typing import Any

import piexif
import piexif.helper
from PIL import Image, PngImagePlugin

from diffusiond import __version__
from diffusiond.pipeline.job import Depth2ImgJob, Img2ImgJob, OutputSpec, Spec, UpscaleJob

SUFFIXES = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}


def _quote(value: str) -> str:
    """Quote a value the way AUTOMATIC1111 does when it holds a separator."""
    if "," not in value and ":" not in value and '"' not in value and "\n" not in value:
        return value
    return json.dumps(value, ensure_ascii=False)


def infotext(
    spec: Spec,
    *,
    seed: int,
    size: tuple[int, int],
    model_name: str | None,
    sampler: str,
    model_hash: str | None = None,
) -> str:
    """The AUTOMATIC1111 `parameters` text: prompt, negative prompt, then `Key: value` pairs."""
    lines = [spec.prompt]
    if spec.negative_prompt:
        lines.append(f"Negative prompt: {spec.negative_prompt}")
    pairs: list[tuple[str, Any]] = [
        ("Steps", spec.steps),
        ("Sampler", sampler),
        ("CFG scale", f"{spec.guidance:g}"),
        ("Seed", seed),
        ("Size", f"{size[0]}x{size[1]}"),
    ]
    if model_hash:
        pairs.append(("Model hash", model_hash))
    if model_name:
        pairs.append(("Model", model_name))
    if isinstance(spec, Img2ImgJob | Depth2ImgJob):
        pairs.append(("Denoising strength", f"{spec.strength:g}"))
    if isinstance(spec, UpscaleJob):
        pairs.append(("Upscaler", spec.method))
    pairs.append(("Version", f"diffusiond {__version__}"))
    lines.append(", ".join(f"{key}: {_quote(str(value))}" for key, value in pairs))
    return "\n".join(lines)


def encode(image: Image.Image, output: OutputSpec, *, parameters: str, record: dict[str, Any]) -> bytes:
    """The image file's bytes with the metadata embedded."""
    buffer = io.BytesIO()
    record_json = json.dumps(record, ensure_ascii=False, sort_keys=True)
    if output.format == "png":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
        info.add_itxt("diffusiond", record_json)
        image.save(buffer, format="PNG", pnginfo=info)
    else:
        comment = piexif.helper.UserComment.dump(parameters, encoding="unicode")
        exif = piexif.dump({"Exif": {piexif.ExifIFD.UserComment: comment}})
        pil_format = "JPEG" if output.format == "jpeg" else "WEBP"
        image.save(buffer, format=pil_format, quality=output.quality, exif=exif)
    return buffer.getvalue()


def read_parameters(path: str) -> str | None:
    """The infotext of an image file, from PNG text or EXIF UserComment; None if it has none."""
    with Image.open(path) as image:
        if "parameters" in image.info:
            return str(image.info["parameters"])
        exif = image.info.get("exif")
    if not exif:
        return None
    comment = piexif.load(exif).get("Exif", {}).get(piexif.ExifIFD.UserComment)
    return piexif.helper.UserComment.load(comment) if comment else None
