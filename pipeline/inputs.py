"""Reading the user's input images: one place that turns PIL's errors into clear rejections."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from diffusiond.pipeline.errors import Code, JobRejected


def open_image(path: Path, *, label: str) -> Image.Image:
    """Decode an input fully (not lazily), upright and in RGB.

    `label` is the name the user knows the file by (its inbox path), used in errors.
    Decoding everything here means a truncated or fake image fails at pre-check,
    before any model runs.
    """
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise JobRejected(
            f"not a readable image ({type(exc).__name__}: {exc})",
            code=Code.BAD_IMAGE,
            path=label,
            fix="save the file again as a real PNG, JPEG or WebP image",
        ) from exc
    except Image.DecompressionBombError as exc:
        raise JobRejected(
            f"image is too large to decode safely ({exc})",
            code=Code.OVER_LIMIT,
            path=label,
            fix="scale the image down before dropping it",
        ) from exc
    return image


def fit_to_multiple_of_8(image: Image.Image, size: tuple[int, int] | None) -> Image.Image:
    """Resize to `size`, or crop the image down to multiples of 8 (the VAE needs them)."""
    if size is not None:
        return image.resize(size, Image.Resampling.LANCZOS) if image.size != size else image
    width, height = image.width - image.width % 8, image.height - image.height % 8
    if (width, height) == image.size:
        return image
    return image.crop((0, 0, width, height))
