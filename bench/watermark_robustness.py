"""How well each invisible watermark method survives what happens to images after us.

Embeds a payload in each image with each available method, applies what the web does, one
thing or a pair at a time (JPEG 75 and 50, WebP 75, resize to 50 %, a 10 % crop, brightness
+-10 %, and pairs), decodes as `diffusiond inspect` does, and prints the share of images
whose payload (and, for tiled, mark id) came back exactly, as a Markdown table per size.
Also: embed+verify and decode times, PSNR of the marked image against the original, and
false positives: a mark "found" in unmarked images (`--negatives` of them per size).

    python bench/watermark_robustness.py [--images 24] [--sizes 256 512 1024] [--negatives 1000] [--folder DIR]

Images are synthesized (gradients, 1/f texture, shapes, noise; seeded, so runs repeat)
unless `--folder` names a folder of images, which are scaled to `--size` on the shorter
side. rivaGan is measured only where onnxruntime is installed.
"""

from __future__ import annotations

import argparse
import io
import string
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from diffusiond.pipeline.watermark import (
    InvisibleMark,
    available_methods,
    decode_invisible,
    embed_invisible,
    read_tiled,
    verify_invisible,
)

Transform = Callable[[Image.Image], Image.Image]


def jpeg(quality: int) -> Transform:
    def apply(image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)  # Pillow's default 4:2:0 chroma subsampling
        buffer.seek(0)
        return Image.open(buffer).convert("RGB")

    return apply


def resize_half(image: Image.Image) -> Image.Image:
    return image.resize((image.width // 2, image.height // 2), Image.Resampling.LANCZOS)


def crop_10_percent(image: Image.Image) -> Image.Image:
    """Cut 10 % of the width and height, half from each side (what a reframing does)."""
    dx, dy = image.width // 20, image.height // 20
    return image.crop((dx, dy, image.width - dx, image.height - dy))


def webp(quality: int) -> Transform:
    def apply(image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, "WEBP", quality=quality)
        buffer.seek(0)
        return Image.open(buffer).convert("RGB")

    return apply


def brightness(factor: float) -> Transform:
    def apply(image: Image.Image) -> Image.Image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) * factor
        return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))

    return apply


def then(*steps: Transform) -> Transform:
    def apply(image: Image.Image) -> Image.Image:
        for step in steps:
            image = step(image)
        return image

    return apply


TRANSFORMS: dict[str, Transform] = {
    "none": lambda image: image,
    "JPEG 75": jpeg(75),
    "JPEG 50": jpeg(50),
    "WebP 75": webp(75),
    "resize 50 %": resize_half,
    "crop 10 %": crop_10_percent,
    "bright +10 %": brightness(1.1),
    "bright -10 %": brightness(0.9),
    "resize+JPEG 75": then(resize_half, jpeg(75)),
    "crop+JPEG 75": then(crop_10_percent, jpeg(75)),
    "bright+JPEG 75": then(brightness(1.1), jpeg(75)),
    "resize+crop": then(resize_half, crop_10_percent),
    "crop+WebP 75": then(crop_10_percent, webp(75)),
}


def pink_noise(rng: np.random.Generator, size_px: int) -> np.ndarray:
    """1/f^2-power noise, zero mean and unit variance: texture with natural images' statistics."""
    freq2 = np.fft.fftfreq(size_px)[:, None] ** 2 + np.fft.fftfreq(size_px)[None, :] ** 2
    freq2[0, 0] = 1.0
    spectrum = (rng.normal(size=(size_px, size_px)) + 1j * rng.normal(size=(size_px, size_px))) / freq2
    spectrum[0, 0] = 0.0
    field = np.real(np.fft.ifft2(spectrum))
    return (field - field.mean()) / field.std()


def synth_image(seed: int, size_px: int) -> Image.Image:
    """A gradient, 1/f texture of random strength, a few flat shapes, slight blur and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size_px, 0:size_px] / size_px
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (xx * np.cos(angle) + yy * np.sin(angle))[..., None]
    ramp = (ramp - ramp.min()) / (np.ptp(ramp) + 1e-9)
    start, end = rng.uniform(40, 215, 3), rng.uniform(40, 215, 3)
    texture = np.stack([pink_noise(rng, size_px) for _ in range(3)], -1) * rng.uniform(3, 35)
    image = Image.fromarray(np.clip(start + (end - start) * ramp + texture, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 9))):
        x, y = (int(v) for v in rng.integers(0, size_px, 2))
        radius = int(rng.integers(size_px // 20, size_px // 4))
        colour = tuple(int(c) for c in rng.integers(20, 236, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x - radius, y - radius, x + radius, y + radius // 2], fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, rng.uniform(0.5, 4), (size_px, size_px, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


def folder_images(folder: Path, size_px: int, count: int) -> list[Image.Image]:
    images = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in {".png", ".jpg", ".jpeg", ".webp"}:
            continue
        with Image.open(path) as image:
            scale = size_px / min(image.size)
            images.append(
                image.convert("RGB").resize(
                    (round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS
                )
            )
        if len(images) == count:
            break
    return images


def psnr_db(a: Image.Image, b: Image.Image) -> float:
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b.convert("RGB"), dtype=np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))


def random_payload(rng: np.random.Generator) -> str:
    alphabet = string.ascii_letters + string.digits + "-"
    return "".join(rng.choice(list(alphabet), size=10))


def found(method: str, image: Image.Image, mark: InvisibleMark, mark_id: int) -> bool:
    """Whether a reader gets the mark back exactly: tiled searches crops and checks the id too."""
    if method == "tiled":
        read = read_tiled(image, [mark.payload])
        return read is not None and read.mark_id == mark_id
    return verify_invisible(image, mark)


def measure(method: str, images: list[Image.Image], negatives: list[Image.Image], seed: int) -> dict[str, float]:
    """One table row: mean embed and decode times and PSNR, success share per transform, false positives."""
    rng = np.random.default_rng(seed)
    ok = dict.fromkeys(TRANSFORMS, 0)
    embed_s = decode_s = 0.0
    decodes = 0
    psnrs = []
    fallbacks = 0
    for number, image in enumerate(images):
        mark = InvisibleMark(payload=random_payload(rng), method=method)  # type: ignore[arg-type]
        start = time.perf_counter()
        marked, result = embed_invisible(image, mark, number)
        embed_s += time.perf_counter() - start
        fallbacks += result.fallback is not None
        psnrs.append(psnr_db(image, marked))
        for name, transform in TRANSFORMS.items():
            attacked = transform(marked)
            start = time.perf_counter()
            ok[name] += found(method, attacked, mark, number)
            decode_s += time.perf_counter() - start
            decodes += 1
    false_positives = 0
    for image in negatives:
        decoded = decode_invisible(image, known_payloads=["diffusiond"])
        false_positives += decoded.get(method) is not None
    n = len(images)
    row = {
        "embed_s": embed_s / n,
        "decode_s": decode_s / decodes,
        "psnr_db": float(np.mean(psnrs)),
        "psnr_min": float(np.min(psnrs)),
        "false_pos": false_positives,
        "negatives": len(negatives),
        "fallbacks": fallbacks,
    }
    row.update({name: count / n for name, count in ok.items()})
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=24, help="marked images per size (default 24)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024], help="image sides in px")
    parser.add_argument("--negatives", type=int, default=1000, help="unmarked images per size for false positives")
    parser.add_argument("--folder", type=Path, help="use images from this folder instead of synthesizing")
    parser.add_argument("--methods", nargs="+", default=list(available_methods()), help="default: all available")
    args = parser.parse_args(argv)

    for size in args.sizes:
        if args.folder:
            images = folder_images(args.folder, size, args.images)
        else:
            images = [synth_image(seed, size) for seed in range(args.images)]
        if not images:
            parser.error(f"no images in {args.folder}")
        negatives = [synth_image(10_000 + seed, size) for seed in range(args.negatives)]
        print(f"\n{size} px: {len(images)} images; share decoded exactly; false positives in unmarked images\n")
        header = ["method", "embed+verify ms", "decode ms", "PSNR dB (min)", *TRANSFORMS, "false pos."]
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for method in args.methods:
            # The DWT readers take no payload to check against: 100 unmarked images show their rate.
            row = measure(method, images, negatives if method == "tiled" else negatives[:100], 1)
            cells = [method, f"{row['embed_s'] * 1000:.0f}", f"{row['decode_s'] * 1000:.0f}"]
            cells.append(f"{row['psnr_db']:.1f} ({row['psnr_min']:.1f})")
            cells += [f"{row[name]:.0%}" for name in TRANSFORMS]
            cells.append(f"{row['false_pos']:.0f} / {row['negatives']:.0f}")
            if row["fallbacks"]:
                cells[0] += f" ({row['fallbacks']:.0f} fell back to dwtDctSvd)"
            print("| " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
