"""Watermarks on real pixels: invisible marks round-trip, the tiled mark survives what the web does
to an image (real JPEG, WebP, resizes, crops), the DWT marks write what invisible-watermark wrote,
visible marks land where they are asked to, and unmarked images decode as nothing."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from diffusiond.pipeline import watermark
from diffusiond.pipeline.watermark import (
    DEFAULT_METHOD,
    FRAME_BITS,
    METHODS,
    POSITIONS,
    InvisibleMark,
    VisibleMark,
    apply_visible,
    available_methods,
    decode_invisible,
    embed_invisible,
    frame_bits,
    read_frame,
    read_tiled,
    too_small_reason,
    verify_invisible,
)


def smooth_image(size_px: int = 512, seed: int = 0) -> Image.Image:
    """Gradients with a little noise: the easy case, like a sky or a studio backdrop."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size_px, 0:size_px] / size_px
    a, b = rng.uniform(0.5, 2.0, 2)
    pixels = np.stack([60 + 140 * xx**a, 50 + 150 * yy**b, 180 - 100 * xx * yy], -1)
    pixels += rng.normal(0, 1.0, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


def detailed_image(size_px: int = 512, seed: int = 0) -> Image.Image:
    """Shapes over a gradient, blurred, with noise: the harder case."""
    rng = np.random.default_rng(seed)
    image = smooth_image(size_px, seed)
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = (int(v) for v in rng.integers(0, size_px, 2))
        r = int(rng.integers(size_px // 16, size_px // 5))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(30, 226, 3)))
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float32)
    pixels += rng.normal(0, 3.0, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


def noisy_image(size_px: int = 512, seed: int = 0) -> Image.Image:
    """Grey with Gaussian noise (sigma 10): the one kind of image dwtDct reliably reads back."""
    pixels = np.random.default_rng(seed).normal(128, 10, (size_px, size_px, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def changed_box(before: Image.Image, after: Image.Image) -> tuple[int, int, int, int] | None:
    return ImageChops.difference(before.convert("RGB"), after.convert("RGB")).getbbox()


def method_params() -> list:
    return [
        pytest.param(m, marks=pytest.mark.skipif(m not in available_methods(), reason=f"{m} needs onnxruntime"))
        for m in METHODS
    ]


# Each method with an image it verifies on: dwtDct misreads smooth and detailed images
# (module docstring), rivaGan misreads smooth ones.
IMAGE_FOR = {"tiled": detailed_image, "dwtDct": noisy_image, "dwtDctSvd": smooth_image, "rivaGan": detailed_image}


# --- the frame ---------------------------------------------------------------------------


@pytest.mark.parametrize("payload", ["diffusiond", "x", "Größe", "studio 42"])
def test_frame_round_trips(payload: str) -> None:
    bits = frame_bits(payload)
    assert len(bits) == FRAME_BITS
    assert read_frame(bits) == payload


def test_a_damaged_or_empty_frame_reads_as_none() -> None:
    bits = frame_bits("diffusiond")
    for i in (0, 40, FRAME_BITS - 1):
        flipped = list(bits)
        flipped[i] ^= 1
        assert read_frame(flipped) is None
    assert read_frame([0] * FRAME_BITS) is None
    assert read_frame([1] * FRAME_BITS) is None
    assert read_frame(bits[:-8]) is None


@pytest.mark.parametrize("payload", ["", "StableDiffusionV1", "tab\there", "ümlautsüü"])
def test_payloads_that_do_not_fit_are_refused_not_truncated(payload: str) -> None:
    with pytest.raises(ValueError, match="payload"):
        InvisibleMark(payload=payload)


def test_unknown_method_is_refused() -> None:
    with pytest.raises(ValueError, match="tiled"):
        InvisibleMark(method="lsb")  # type: ignore[arg-type]


def test_rivagan_without_onnxruntime_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watermark, "_have_onnxruntime", lambda: False)
    with pytest.raises(ValueError, match="onnxruntime"):
        InvisibleMark(method="rivaGan")
    assert "rivaGan" not in available_methods()


# --- invisible marks -----------------------------------------------------------------------


@pytest.mark.parametrize("method", method_params())
def test_invisible_round_trip_at_512_px(method: str) -> None:
    mark = InvisibleMark(payload="test-123", method=method)  # type: ignore[arg-type]
    image = IMAGE_FOR[method](512, seed=1)
    marked, result = embed_invisible(image, mark, 0xC0FFEE42)

    assert result.to_dict() == {
        "method": method,
        "payload": "test-123",
        "embedded": True,
        "verified": True,
        "reason": None,
        "mark_id": "c0ffee42" if method == "tiled" else None,
        "fallback": None,
    }
    assert marked.size == image.size and marked.mode == "RGB"
    assert changed_box(image, marked) is not None
    saved = io.BytesIO()
    marked.save(saved, "PNG")
    decoded = decode_invisible(Image.open(saved), known_payloads=["other", "test-123"])
    assert decoded[method] == "test-123"


@pytest.mark.parametrize("make_image", [smooth_image, detailed_image])
def test_dwtdctsvd_survives_jpeg_75(make_image) -> None:
    mark = InvisibleMark(payload="diffusiond", method="dwtDctSvd")
    marked, result = embed_invisible(make_image(512, seed=2), mark)
    assert result.verified
    compressed = jpeg(marked, 75)
    assert verify_invisible(compressed, mark)
    assert decode_invisible(compressed)["dwtDctSvd"] == "diffusiond"


# What the web does to an image, each on real encoded files (the full table is bench/watermark_robustness.py).
def webp(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "WEBP", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def half(image: Image.Image) -> Image.Image:
    return image.resize((image.width // 2, image.height // 2), Image.Resampling.LANCZOS)


def crop_10(image: Image.Image) -> Image.Image:
    """10 % of the width and height cut, half from each side."""
    dx, dy = image.width // 20, image.height // 20
    return image.crop((dx, dy, image.width - dx, image.height - dy))


def brightness(image: Image.Image, factor: float) -> Image.Image:
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) * factor
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


ATTACKS = {
    "JPEG 75": lambda i: jpeg(i, 75),
    "JPEG 50": lambda i: jpeg(i, 50),
    "WebP 75": lambda i: webp(i, 75),
    "resize 50 %": half,
    "crop 10 %": crop_10,
    "brightness +10 %": lambda i: brightness(i, 1.1),
    "brightness -10 %": lambda i: brightness(i, 0.9),
    "resize 50 % then JPEG 75": lambda i: jpeg(half(i), 75),
    "crop 10 % then JPEG 75": lambda i: jpeg(crop_10(i), 75),
}


def psnr_db(a: Image.Image, b: Image.Image) -> float:
    error = np.asarray(a.convert("RGB"), dtype=np.float64) - np.asarray(b.convert("RGB"), dtype=np.float64)
    return float(10 * np.log10(255**2 / np.mean(error**2)))


@pytest.mark.parametrize("size_px", [256, 512])
@pytest.mark.parametrize("make_image", [smooth_image, detailed_image])
def test_the_tiled_mark_survives_what_the_web_does(make_image, size_px: int) -> None:
    mark = InvisibleMark(payload="diffusiond")
    assert mark.method == DEFAULT_METHOD == "tiled"
    image = make_image(size_px, seed=5)
    marked, result = embed_invisible(image, mark, 0x5EED0001)
    assert result.verified and result.mark_id == "5eed0001"
    assert 38.0 <= psnr_db(image, marked) < 40
    lost = []
    for name, attack in ATTACKS.items():
        found = read_tiled(attack(marked), ["other", "diffusiond"])
        if found is None or (found.payload, found.mark_id) != ("diffusiond", 0x5EED0001):
            lost.append(name)
    assert lost == []
    assert read_tiled(image) is None  # the unmarked original
    assert read_tiled(crop_10(marked), ["another-tool"]) is None  # a payload it was not made with


def test_an_image_that_drowns_the_tiled_mark_gets_dwtdctsvd_and_says_so() -> None:
    """Noise in the tiled mark's own band (what the random test model paints: 4 px blobs at 256 px)."""
    rng = np.random.default_rng(8)
    blobs = rng.normal(0, 1, (64, 64, 3))
    pixels = np.kron(blobs, np.ones((8, 8, 1)))
    image = Image.fromarray(np.clip(128 + 45 * pixels, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(2))
    marked, result = embed_invisible(image, InvisibleMark(), 9)
    assert (result.method, result.verified, result.mark_id) == ("dwtDctSvd", True, None)
    assert result.fallback is not None and "tiled mark did not hold" in result.fallback
    assert verify_invisible(marked, InvisibleMark(method="dwtDctSvd"))


def test_a_tiled_mark_in_a_non_square_image_survives_a_one_sided_crop() -> None:
    image = detailed_image(512, seed=6).resize((384, 640))
    marked, result = embed_invisible(image, InvisibleMark(), 7)
    assert result.verified
    cropped = marked.crop((0, 64, 384, 640))  # the top tenth cut off (the longer side: no rescale)
    reframed = marked.crop((38, 0, 384, 640))  # the left tenth (the shorter side: the frame rescales)
    for copy in (cropped, reframed, jpeg(half(reframed), 75)):
        found = read_tiled(copy)
        assert found is not None and found.mark_id == 7


# Pixels invisible-watermark 0.2.0 wrote (WatermarkEncoder().encode(bgr, method, scales=...)) for these
# inputs, measured with the package itself on 2026-12-02: diffusiond's own copy of the code must match.
IMWATERMARK_0_2_0 = {
    "dwtDct": (noisy_image, [0, 36, 36], "c09b722bd40c4c82aab4ac2e7e463baa0ab1669271992a0e2bb0c33b5686c470"),
    "dwtDctSvd": (smooth_image, [0, 56, 0], "4144e03aee8e4681af5105d213e9113287cf68faac6ce75c12a3cc850d353449"),
}


@pytest.mark.parametrize("method", ["dwtDct", "dwtDctSvd"])
def test_the_dwt_marks_write_what_invisible_watermark_wrote(method: str) -> None:
    import hashlib

    from diffusiond.pipeline import watermark_dwt

    make_image, scales, digest = IMWATERMARK_0_2_0[method]
    bgr = np.ascontiguousarray(np.asarray(make_image(256, seed=0))[..., ::-1])
    marked = watermark_dwt.encode(bgr, method, frame_bits("diffusiond"), scales)  # type: ignore[arg-type]
    assert hashlib.sha256(np.ascontiguousarray(marked).tobytes()).hexdigest() == digest
    assert read_frame(watermark_dwt.decode(marked, method, FRAME_BITS, scales)) == "diffusiond"  # type: ignore[arg-type]


def test_a_mark_that_does_not_read_back_is_reported() -> None:
    """dwtDct on a smooth image: embedded, but it does not decode; the result says so."""
    mark = InvisibleMark(payload="test-123", method="dwtDct")
    marked, result = embed_invisible(smooth_image(512, seed=1), mark)
    assert result.embedded and not result.verified
    assert result.reason is not None and "did not decode" in result.reason
    assert decode_invisible(marked)["dwtDct"] is None


def test_a_small_image_is_reported_not_embedded() -> None:
    image = smooth_image(128)
    marked, result = embed_invisible(image, InvisibleMark())
    assert marked is image
    assert not result.embedded and not result.verified
    assert result.reason is not None and "128x128" in result.reason and "256" in result.reason
    assert too_small_reason(128, 128) == result.reason
    assert too_small_reason(512, 255) is not None
    assert too_small_reason(256, 256) is None
    assert all(v is None for v in decode_invisible(image).values())
    assert decode_invisible(Image.new("RGB", (8, 8)))["tiled"] is None


def test_unmarked_images_decode_as_none_for_every_method() -> None:
    flat = Image.new("RGB", (512, 512), (128, 128, 128))
    images = [
        flat,
        noisy_image(320),
        *(smooth_image(512, s) for s in range(2)),
        *(detailed_image(s * 128 + 256, s) for s in range(3)),
    ]
    for image in images:
        decoded = decode_invisible(image)
        assert set(decoded) == set(available_methods())
        assert all(v is None for v in decoded.values()), decoded


def test_alpha_is_kept() -> None:
    image = smooth_image(512, seed=3).convert("RGBA")
    image.putalpha(Image.linear_gradient("L").resize(image.size))
    marked, result = embed_invisible(image, InvisibleMark())
    assert result.verified
    assert marked.mode == "RGBA"
    assert marked.getchannel("A").tobytes() == image.getchannel("A").tobytes()


# --- visible marks -------------------------------------------------------------------------


def inside(box: tuple[int, int, int, int], region: tuple[float, float, float, float]) -> bool:
    left, top, right, bottom = region
    return box[0] >= left and box[1] >= top and box[2] <= right and box[3] <= bottom


@pytest.mark.parametrize("position", POSITIONS)
def test_text_lands_at_its_position(position: str) -> None:
    image = Image.new("RGB", (512, 384), (90, 110, 130))
    mark = VisibleMark(text="AI generated", position=position, size=0.06, margin=0.03)  # type: ignore[arg-type]
    out = apply_visible(image, mark)
    box = changed_box(image, out)
    assert box is not None
    width, height, margin = 512, 384, round(0.03 * 384)
    expected = {
        "top-left": (margin - 2, margin - 2, width / 2, height / 2),
        "top-right": (width / 2, margin - 2, width - margin + 2, height / 2),
        "bottom-left": (margin - 2, height / 2, width / 2, height - margin + 2),
        "bottom-right": (width / 2, height / 2, width - margin + 2, height - margin + 2),
        "center": (width / 4, height / 4, 3 * width / 4, 3 * height / 4),
    }[position]
    assert inside(box, expected), (box, expected)
    text_height = box[3] - box[1]
    assert 0.04 * height <= text_height <= 0.09 * height  # scales with the image


def test_text_too_wide_is_shrunk_to_fit() -> None:
    image = Image.new("RGB", (300, 300), (0, 0, 0))
    out = apply_visible(image, VisibleMark(text="a very long label that cannot fit", size=0.2, margin=0.05))
    box = changed_box(image, out)
    assert box is not None and box[0] >= 13 and box[2] <= 287


def test_opacity_zero_changes_nothing() -> None:
    image = detailed_image(256)
    out = apply_visible(image, VisibleMark(text="AI generated", opacity=0.0))
    assert changed_box(image, out) is None


def test_opacity_scales_the_mark() -> None:
    image = Image.new("RGB", (256, 256), (0, 0, 0))
    mark = VisibleMark(text="AI", position="center", size=0.3, color="white", outline_color=None)
    full = np.asarray(apply_visible(image, mark)).max()
    half = np.asarray(apply_visible(image, VisibleMark(**{**mark.__dict__, "opacity": 0.5}))).max()
    assert full >= 200 and 100 <= half <= 130


def test_logo_lands_in_its_corner(tmp_path: Path) -> None:
    logo_path = tmp_path / "logo.png"
    logo = Image.new("RGBA", (40, 20), (255, 0, 0, 255))
    logo.save(logo_path)
    image = Image.new("RGB", (512, 512), (0, 0, 255))
    out = apply_visible(image, VisibleMark(logo=logo_path, position="top-right", size=0.2, margin=0.02, opacity=1))
    box = changed_box(image, out)
    # 0.2 x 512 = 102 px wide, 51 px high, 10 px from the top and right edges
    assert box is not None and abs(box[0] - 400) <= 2 and abs(box[1] - 10) <= 2 and abs(box[2] - 502) <= 2
    assert abs(box[3] - 61) <= 2
    assert out.getpixel((450, 35)) == (255, 0, 0)


def test_visible_then_invisible_both_hold() -> None:
    image = smooth_image(512, seed=4)
    labelled = apply_visible(image, VisibleMark(text="AI generated", position="bottom-left"))
    marked, result = embed_invisible(labelled, InvisibleMark(payload="both"))
    assert result.verified
    assert decode_invisible(jpeg(marked, 90), known_payloads=["both"])["tiled"] == "both"
    # the label still stands out from the unlabelled image by far more than the invisible mark's noise
    diff = np.abs(np.asarray(marked, dtype=int) - np.asarray(image, dtype=int)).max(-1)
    label_box = changed_box(image, labelled)
    assert label_box is not None
    left, top, right, bottom = label_box
    assert diff[top:bottom, left:right].max() > 100
    assert np.percentile(diff[: 512 // 2], 99) < 20


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "either"),
        ({"text": "a", "logo": Path("x.png")}, "either"),
        ({"text": "a", "position": "middle"}, "position"),
        ({"text": "a", "opacity": 1.5}, "opacity"),
        ({"text": "a", "size": 0}, "size"),
        ({"text": "a", "color": "not-a-colour"}, "color"),
        ({"logo": Path("/nonexistent/logo.png")}, "not a file"),
    ],
)
def test_visible_options_are_checked(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        VisibleMark(**kwargs)


def test_a_thin_image_is_read_from_its_middle() -> None:
    """A panorama 6x as long as wide keeps its mark; a 64 x 20,000 strip is read at a bounded frame."""
    image = detailed_image(256, seed=12).resize((1536, 256))
    marked, result = embed_invisible(image, InvisibleMark(), 21)
    assert result.verified
    found = read_tiled(jpeg(marked, 75))
    assert found is not None and found.mark_id == 21
    assert read_tiled(Image.new("RGB", (20_000, 64), (90, 90, 90))) is None
