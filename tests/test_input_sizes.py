"""Inputs of any size: A1111's resize modes, and a phone photo scaled to the pixel limit instead of refused."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from diffusiond.pipeline.inputs import resized_input
from diffusiond.pipeline.job import fit_inside, fit_pixels
from tests.conftest import Spool, start_daemon_thread, wait_for, write_config


def halves(size: tuple[int, int]) -> Image.Image:
    """Left half red, right half blue."""
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[:, : size[0] // 2] = (255, 0, 0)
    pixels[:, size[0] // 2 :] = (0, 0, 255)
    return Image.fromarray(pixels)


def test_each_resize_mode_makes_the_size_as_a1111_does() -> None:
    wide = halves((200, 100))
    for mode in ("crop", "fill", "stretch"):
        assert resized_input(wide, (64, 64), mode).size == (64, 64)  # type: ignore[arg-type]
    cropped = np.asarray(resized_input(wide, (64, 64), "crop"))
    assert tuple(cropped[32, 0]) == (255, 0, 0) and tuple(cropped[32, 63]) == (0, 0, 255)  # the centre, cut
    filled = np.asarray(resized_input(wide, (64, 64), "fill"))
    assert (filled[0] == filled[16]).all() and (filled[-1] == filled[-17]).all()  # edges extended, not cut
    assert fit_inside((200, 100), (64, 64)) == (64, 32)  # `fit` keeps the shape
    assert fit_pixels((4032, 3024), 4096 * 3072) == (4032, 3024)  # never scaled up
    width, height = fit_pixels((3024, 4032), 72 * 96)
    assert (width, height) == (72, 96) and width % 8 == 0 and height % 8 == 0


def phone_photo() -> bytes:
    """A 4032x3024 JPEG whose EXIF says: rotate 90 degrees clockwise to show it (orientation 6)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    halves((4032, 3024)).save(buffer, format="JPEG", quality=80, exif=exif.tobytes())
    return buffer.getvalue()


def test_a_phone_photo_is_turned_upright_and_scaled_to_the_limit_not_refused(spool: Spool, test_models: Any) -> None:
    write_config(
        spool.root, test_models, limits={"max_pixels": 72 * 96}, defaults={"all": {"model": "test", "steps": 4}}
    )
    spool.drop("photo.jpg", phone_photo())
    spool.drop("photo.yaml", "task: img2img\nprompt: a watercolor\nstrength: 0.5\nseed: 1\n")
    buffer = io.BytesIO()
    halves((100, 100)).save(buffer, format="PNG")
    spool.drop("square.png", buffer.getvalue())
    spool.drop("square.yaml", "task: img2img\nprompt: x\nsize: 64x32\nresize: fit\nseed: 1\n")
    with start_daemon_thread(spool):
        manifests = wait_for(lambda: len(spool.manifests()) == 2 and spool.manifests(), what="both jobs")
    by_source = {m["source"]: m for m in manifests}
    photo = by_source["photo.yaml"]
    assert (photo["input_image"]["width"], photo["input_image"]["height"]) == (3024, 4032)  # upright
    assert photo["input_image"]["run_size"] == [72, 96] and photo["job"]["size"] == [72, 96]
    assert (photo["outputs"][0]["width"], photo["outputs"][0]["height"]) == (72, 96)
    square = by_source["square.yaml"]
    assert square["input_image"]["run_size"] == [32, 32]
    assert (square["outputs"][0]["width"], square["outputs"][0]["height"]) == (32, 32)
    assert spool.reports() == []
