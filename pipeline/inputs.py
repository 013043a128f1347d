"""Reading the user's input images: one place that turns PIL's errors into clear rejections.

The pre-check probes each input once (`probe_image`: the whole file decoded, its upright
size and sha256) and the job carries what it found; the generator decodes the pixels once
more when the job runs (`open_image`), and nothing else opens the file.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from diffusiond.pipeline.errors import Code, JobRejected, job_context
from diffusiond.pipeline.job import InputImage, RedrawJob, ResizeMode, fit_multiple_of_8, read_plain_file

MAX_DECODE_PIXELS = 89_478_485
"""Pillow's own bomb threshold, where it only warns (it refuses at twice this): an image this big
takes 256 MiB as RGB, and a 100-byte PNG can declare it."""


def probe_image(path: Path, *, label: str, max_file_bytes: int, field: str = "image") -> InputImage:
    """Check that an input is a plain, whole, decodable image within the size limit; its size and hash.

    `label` is the name the user knows the file by (its inbox path). The errors name the field
    `image` with `label` as its value; the caller's `job_context` adds the job file and position.
    """
    with job_context(field=field, value=label):
        data = read_plain_file(
            path,
            what="image",
            max_bytes=max_file_bytes,
            code=Code.BAD_IMAGE,
            fix_size="shrink the image, or raise limits.max_file_bytes in the config",
        )
        if not data:
            raise JobRejected(
                "the image is empty (0 bytes)",
                code=Code.BAD_IMAGE,
                fix="drop the image again: it was saved or copied empty",
            )
        image = _decode(io.BytesIO(data), name=label)
    return InputImage(label, path, image.size, hashlib.sha256(data).hexdigest())


def open_image(image: InputImage, *, field: str = "image") -> Image.Image:
    """The pixels of a probed input, upright and in RGB, decoded fully (not lazily)."""
    with job_context(field=field, value=image.name):
        return _decode(image.path, name=image.name)


def _decode(source: Path | io.BytesIO, *, name: str) -> Image.Image:
    """Decoding everything here means a truncated or fake image fails at pre-check, before any model runs."""
    try:
        with Image.open(source) as opened:
            width, height = opened.size
            if width * height > MAX_DECODE_PIXELS:  # refused on its header, before the pixels take memory
                raise JobRejected(
                    f"image is too large to decode safely ({width}x{height}, {width * height} pixels; "
                    f"the limit is {MAX_DECODE_PIXELS})",
                    code=Code.OVER_LIMIT,
                    fix="scale the image down before dropping it",
                )
            opened.load()
            return ImageOps.exif_transpose(opened).convert("RGB")
    except UnidentifiedImageError as exc:  # its text names what was opened: here, bytes in memory
        raise JobRejected(
            f"not a readable image (Pillow cannot identify {name!r} as an image)",
            code=Code.BAD_IMAGE,
            fix="save the file again as a real PNG, JPEG or WebP image",
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise JobRejected(
            f"not a readable image ({type(exc).__name__}: {exc})",
            code=Code.BAD_IMAGE,
            fix="save the file again as a real PNG, JPEG or WebP image",
        ) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # the warning under -W error
        raise JobRejected(
            f"image is too large to decode safely ({exc})",
            code=Code.OVER_LIMIT,
            fix="scale the image down before dropping it",
        ) from exc


def fit_to_multiple_of_8(image: Image.Image, size: tuple[int, int] | None) -> Image.Image:
    """Resize to `size`, or crop the image down to multiples of 8 (the VAE needs them)."""
    if size is not None:
        return image.resize(size, Image.Resampling.LANCZOS) if image.size != size else image
    width, height = fit_multiple_of_8(image.size)
    if (width, height) == image.size:
        return image
    return image.crop((0, 0, width, height))


def redraw_input(image: Image.Image, spec: RedrawJob) -> Image.Image:
    """An input (or its mask) as a redraw runs it: made its `size` by its `resize` mode, or its own size
    cropped to multiples of 8."""
    if spec.size is None:
        return fit_to_multiple_of_8(image, None)
    return resized_input(image, spec.run_size(image.size), spec.resize)


def resized_input(image: Image.Image, size: tuple[int, int], mode: ResizeMode) -> Image.Image:
    """The input made `size` (what the job runs at) by `mode`: A1111's resize modes, and `fit`.

    `fit` has chosen a `size` of the input's own shape, so it is a plain resize, like `stretch`;
    `crop` covers `size` and cuts the centre; `fill` fits inside and extends the edge pixels outwards
    (A1111 stretches the border strips; repeating the last row and column is the same where they are flat).
    """
    if image.size == size:
        return image
    if mode in ("stretch", "fit"):
        return image.resize(size, Image.Resampling.LANCZOS)
    if mode == "crop":
        return ImageOps.fit(image, size, Image.Resampling.LANCZOS)
    scale = min(size[0] / image.width, size[1] / image.height)
    inner = image.resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS
    )
    left, top = (size[0] - inner.width) // 2, (size[1] - inner.height) // 2
    pixels = np.pad(
        np.asarray(inner),
        ((top, size[1] - inner.height - top), (left, size[0] - inner.width - left), (0, 0)),
        mode="edge",
    )
    return Image.fromarray(pixels)
