"""Visible and invisible watermarks, as pure image -> image functions (PIL in, PIL out).

Four invisible methods (numbers: `bench/watermark_robustness.py`; the table is in the README):

- `tiled`, the default (`watermark_tiled.py`): made to outlive what the web does. Read back
  from every test image from 256 px up after JPEG 75 and 50, WebP 75, a resize to half,
  a 10 % crop, brightness +-10 % and their pairs; PSNR 38.5 dB. It carries a 32-bit mark
  id per image (the manifest and the C2PA soft binding record it), checked by a code keyed
  with the payload text, so a reader names the payload only when asked about it.
- `dwtDctSvd`: invisible-watermark's method (`watermark_dwt.py`): reads back from every
  image and survives JPEG 95 to 75, but not resizing, cropping or a brightness change.
- `dwtDct`: the method the Stable Diffusion reference scripts use, kept for compatibility
  (same algorithm, same strength). As invisible-watermark 0.2.0 ships it, it read back
  from 1 image in 24: lowering a block's largest coefficient to write a 0 can make another
  coefficient the largest, which the decoder then reads. `MarkResult.verified` says when.
- `rivaGan`: a neural mark, only where invisible-watermark (its ONNX models) and
  `onnxruntime` are installed. It read back from about 60 % of the images.

For the DWT methods the payload is framed so that a reader who does not know it can still
find it, and so that an unmarked image decodes as None rather than as garbage. The frame
is `FRAME_BITS` = 96 bits:

    payload, UTF-8, zero-padded to PAYLOAD_MAX_BYTES (10) | 16-bit check (keyed CRC-32)

The payload comes first and in the clear, so a plain `imwatermark.WatermarkDecoder
("bytes", 96)` reads it too (dwtDctSvd with `scales=[0, 56, 0]`, dwtDct with the
defaults). A decoded frame counts only when its check matches and its text is printable
with nothing but zero bytes after it. Payloads longer than 10 bytes are refused, not
truncated: the manifest must record what is really in the image.

Why 96 bits at strength 56 for dwtDctSvd (the library's default strength is 36): 96 bits
is the least that holds "diffusiond" and a check. At 512 px, 96 bits through JPEG 75
survived in 12 % of the images at strength 36, 96 % at 48, 100 % at 56 and 64; the PSNR
was 38.0, 36.8, 36.0 and 35.3 dB, the loss all in the chroma (U) channel.

rivaGan's model works on small frames, so the mark is made on a 256 x 256 copy and the
difference is scaled up to the image's size; decoding scales the image down to 256 x 256
first. Its 32 bits hold a keyed CRC-32 of the payload: `decode_invisible` names a payload
only when the image matches one of the payloads it was asked about (at most 2 bits off).

Images under `MIN_SIDE_PX` (256) on either side are not marked: `embed_invisible`
returns them unchanged with `embedded=False` and the reason. `too_small_reason` gives the
same answer before any generation runs, so a job that demands a mark can be refused early.
A `tiled` mark is still read from smaller copies (a 256 px image halved).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from functools import cache
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageColor, ImageDraw, ImageFont

from diffusiond.pipeline import watermark_dwt, watermark_tiled
from diffusiond.pipeline.job import (
    WATERMARK_METHODS,
    WATERMARK_MIN_SIDE_PX,
    WATERMARK_PAYLOAD_MAX_BYTES,
    WATERMARK_POSITIONS,
    WatermarkMethod,
    WatermarkPosition,
)

__all__ = [
    "DEFAULT_METHOD",
    "DEFAULT_PAYLOAD",
    "FRAME_BITS",
    "METHODS",
    "MIN_SIDE_PX",
    "PAYLOAD_MAX_BYTES",
    "POSITIONS",
    "InvisibleMark",
    "MarkResult",
    "Method",
    "Position",
    "VisibleMark",
    "apply_visible",
    "available_methods",
    "decode_invisible",
    "decode_marks",
    "embed_invisible",
    "frame_bits",
    "read_frame",
    "read_tiled",
    "too_small_reason",
    "verify_invisible",
]

Method = WatermarkMethod
Position = WatermarkPosition
METHODS: tuple[Method, ...] = WATERMARK_METHODS
POSITIONS: tuple[Position, ...] = WATERMARK_POSITIONS

DEFAULT_METHOD: Method = "tiled"
DEFAULT_PAYLOAD = "diffusiond"
MIN_SIDE_PX = WATERMARK_MIN_SIDE_PX
PAYLOAD_MAX_BYTES = WATERMARK_PAYLOAD_MAX_BYTES
FRAME_BITS = 96
_CHECK_BITS = FRAME_BITS - 8 * PAYLOAD_MAX_BYTES
_CHECK_KEY = b"diffusiond-mark-v1"
"""Keys the check, so another tool's 96-bit mark does not pass as ours; v2 can coexist."""

_DWT_SCALES: dict[str, list[int]] = {
    # imwatermark's `scales` per YUV channel. dwtDct: the library default, as the SD
    # reference scripts use it. dwtDctSvd: U channel only, stronger than the default 36
    # so that 96 bits survive JPEG 75 (module docstring).
    "dwtDct": [0, 36, 36],
    "dwtDctSvd": [0, 56, 0],
}
_TILED_MIN_READ_PX = 64
"""A tiled mark is read from copies down to this size (a 256 px image halved is 128 px)."""
_RIVAGAN_SIDE_PX = 256
_RIVAGAN_BITS = 32
_RIVAGAN_MAX_PASSES = 3
_RIVAGAN_MAX_BIT_ERRORS = 2
"""A random 32-bit word lands within 2 bits of a given fingerprint with p = 1.2e-7."""


# --- invisible marks: options and result -------------------------------------------------


@dataclass(frozen=True)
class InvisibleMark:
    """What to embed: `payload` text (at most 10 UTF-8 bytes, printable) and the method."""

    payload: str = DEFAULT_PAYLOAD
    method: Method = DEFAULT_METHOD

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"watermark method should be one of {', '.join(METHODS)} but is {self.method!r}")
        if self.method == "rivaGan" and not _have_onnxruntime():
            raise ValueError(
                "watermark method 'rivaGan' needs invisible-watermark and onnxruntime, which are not installed "
                "(pip install --no-deps invisible-watermark onnxruntime), or choose tiled"
            )
        _check_payload(self.payload)


@dataclass(frozen=True)
class MarkResult:
    """What happened to one image; goes into the manifest as `to_dict()`."""

    method: str
    payload: str
    embedded: bool
    verified: bool
    reason: str | None = None
    """Why the mark is missing or did not verify; None when all went well."""
    mark_id: str | None = None
    """The `tiled` mark's id of this image (8 hex digits): what ties a stripped copy to its credentials."""
    fallback: str | None = None
    """Why another method than the one asked for marks this image (`method` is the one used)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def available_methods() -> tuple[Method, ...]:
    """The methods this installation can embed and decode (rivaGan needs invisible-watermark and onnxruntime)."""
    return METHODS if _have_onnxruntime() else tuple(m for m in METHODS if m != "rivaGan")


def too_small_reason(width_px: int, height_px: int) -> str | None:
    """Why an image of this size cannot carry an invisible mark, or None if it can.

    Cheap and pure, so a job that demands a mark can be refused before generating.
    """
    if min(width_px, height_px) < MIN_SIDE_PX:
        return (
            f"image is {width_px}x{height_px} px; an invisible watermark needs at least {MIN_SIDE_PX} px on each side"
        )
    return None


# --- the frame -----------------------------------------------------------------------------


def frame_bits(payload: str) -> list[int]:
    """The 96 bits the DWT methods embed: padded payload, then a keyed 16-bit check."""
    _check_payload(payload)
    data = payload.encode("utf-8").ljust(PAYLOAD_MAX_BYTES, b"\0")
    check = _check_value(data).to_bytes(_CHECK_BITS // 8, "big")
    return [int(b) for b in np.unpackbits(np.frombuffer(data + check, dtype=np.uint8))]


def read_frame(bits: Iterable[int]) -> str | None:
    """The payload a 96-bit frame holds, or None when it is not a valid frame (noise)."""
    bit_array = np.asarray(list(bits), dtype=np.uint8)
    if bit_array.size != FRAME_BITS:
        return None
    raw = np.packbits(bit_array).tobytes()
    data, check = raw[:PAYLOAD_MAX_BYTES], raw[PAYLOAD_MAX_BYTES:]
    if int.from_bytes(check, "big") != _check_value(data):
        return None
    text_bytes = data.rstrip(b"\0")
    if not text_bytes or b"\0" in text_bytes:
        return None
    try:
        text = text_bytes.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text.isprintable() else None


def _check_value(data: bytes) -> int:
    return zlib.crc32(_CHECK_KEY + data) & ((1 << _CHECK_BITS) - 1)


def _fingerprint_bits(payload: str) -> np.ndarray:
    """rivaGan's 32 bits: a keyed CRC-32 of the payload (32 bits cannot hold the text)."""
    value = zlib.crc32(_CHECK_KEY + b"/rivaGan/" + payload.encode("utf-8"))
    return np.unpackbits(np.frombuffer(value.to_bytes(4, "big"), dtype=np.uint8))


def _check_payload(payload: str) -> None:
    if not isinstance(payload, str) or not payload:
        raise ValueError(f"watermark payload should be non-empty text but is {payload!r}")
    size = len(payload.encode("utf-8"))
    if size > PAYLOAD_MAX_BYTES:
        raise ValueError(
            f"watermark payload {payload!r} is {size} bytes in UTF-8; the invisible mark "
            f"carries at most {PAYLOAD_MAX_BYTES}"
        )
    if not payload.isprintable():
        raise ValueError(f"watermark payload {payload!r} has control characters; use printable text")


# --- invisible marks: embed, decode, verify -------------------------------------------------


def embed_invisible(
    image: Image.Image, mark: InvisibleMark, mark_id: int | None = None
) -> tuple[Image.Image, MarkResult]:
    """Embed `mark`, then decode it again to check it holds.

    `mark_id` is the `tiled` mark's 32-bit id of this image (default: one made from the
    payload); the other methods carry none. Returns RGB (RGBA when the input has alpha; the
    alpha is kept as it was). An image under the minimum size comes back unchanged with
    `embedded=False` and the reason. Verification is of the returned pixels: a lossy save
    (JPEG, WebP) can still lose the mark, so check the saved file with `verify_invisible`.
    """
    # 1. Check the size
    tiled_id = _tiled_id(mark, mark_id)
    shown_id = None if tiled_id is None else f"{tiled_id:08x}"
    reason = too_small_reason(*image.size)
    if reason is not None:
        return image, MarkResult(mark.method, mark.payload, False, False, reason, shown_id)

    # 2. Embed into the colour channels
    rgb, alpha = _split_alpha(image)
    pixels = np.asarray(rgb)
    if tiled_id is not None:
        marked_rgb = watermark_tiled.embed(pixels, mark.payload, tiled_id)
    elif mark.method == "rivaGan":
        marked_rgb = _embed_rivagan(pixels, _fingerprint_bits(mark.payload))
    else:
        marked_rgb = _embed_dwt(pixels, mark.method, frame_bits(mark.payload))
    marked = Image.fromarray(marked_rgb, "RGB")
    if alpha is not None:
        marked.putalpha(alpha)

    # 3. Decode it again. Where the image's own texture drowns the tiled mark (measured: noise in the
    # mark's band, like the random test model's output), dwtDctSvd, which the host cannot drown, marks it.
    verified = verify_invisible(marked, mark, tiled_id)
    if not verified and tiled_id is not None:
        fallback = InvisibleMark(payload=mark.payload, method="dwtDctSvd")
        marked_rgb = _embed_dwt(pixels, fallback.method, frame_bits(mark.payload))
        fallback_image = Image.fromarray(marked_rgb, "RGB")
        if alpha is not None:
            fallback_image.putalpha(alpha)
        if verify_invisible(fallback_image, fallback):
            why = (
                "the tiled mark did not hold against this image's texture; "
                "dwtDctSvd was used (it does not survive resizing or crops)"
            )
            return fallback_image, MarkResult(fallback.method, mark.payload, True, True, None, None, why)
    reason = (
        None
        if verified
        else (
            f"the {mark.method} mark did not decode right after embedding (this image's detail defeats it"
            + ("; tiled is the robust method)" if mark.method != "tiled" else ")")
        )
    )
    return marked, MarkResult(mark.method, mark.payload, True, verified, reason, shown_id)


def verify_invisible(image: Image.Image, mark: InvisibleMark, mark_id: int | None = None) -> bool:
    """Whether `image` carries `mark` (its method and payload; for `tiled`, this id too).

    For `tiled` only the uncropped frame is tried (the stamp's check of what it wrote):
    `read_tiled` also finds the mark in a cropped copy.
    """
    rgb = np.asarray(image.convert("RGB"))
    tiled_id = _tiled_id(mark, mark_id)
    if tiled_id is not None:
        found = watermark_tiled.read(rgb, [mark.payload], search=False)
        return found is not None and found.mark_id == tiled_id
    if too_small_reason(*image.size) is not None:
        return False
    if mark.method == "rivaGan":
        return _rivagan_matches(_decode_rivagan(rgb), mark.payload)
    return read_frame(_decode_dwt(rgb, mark.method)) == mark.payload


def read_tiled(
    image: Image.Image, known_payloads: Iterable[str] = (DEFAULT_PAYLOAD,)
) -> watermark_tiled.TiledRead | None:
    """The `tiled` mark in `image` (resized, recompressed or cropped) if it carries one of `known_payloads`."""
    if min(image.size) < _TILED_MIN_READ_PX:
        return None
    return watermark_tiled.read(np.asarray(image.convert("RGB")), known_payloads)


def decode_invisible(image: Image.Image, known_payloads: Iterable[str] = (DEFAULT_PAYLOAD,)) -> dict[str, str | None]:
    """Each available method -> the payload it finds in `image`, or None.

    The DWT methods read the payload from the image itself. `tiled` and rivaGan carry only
    a check of it, so they can only name one of `known_payloads` (say, the configured one).
    """
    return decode_marks(image, known_payloads)[0]


def decode_marks(
    image: Image.Image, known_payloads: Iterable[str] = (DEFAULT_PAYLOAD,)
) -> tuple[dict[str, str | None], watermark_tiled.TiledRead | None]:
    """`decode_invisible`'s answer, and the tiled mark it read (its id and where), from one search."""
    known = list(known_payloads)
    found: dict[str, str | None] = dict.fromkeys(available_methods())
    tiled = read_tiled(image, known)
    found["tiled"] = tiled.payload if tiled else None
    if too_small_reason(*image.size) is not None:
        return found, tiled
    rgb = np.asarray(image.convert("RGB"))
    for method in found:
        if method == "rivaGan":
            bits = _decode_rivagan(rgb)
            found[method] = next((p for p in known if _rivagan_matches(bits, p)), None)
        elif method != "tiled":
            found[method] = read_frame(_decode_dwt(rgb, method))
    return found, tiled


def _tiled_id(mark: InvisibleMark, mark_id: int | None) -> int | None:
    if mark.method != "tiled":
        return None
    return watermark_tiled.mark_id_for(mark.payload) if mark_id is None else mark_id


def _embed_dwt(rgb: np.ndarray, method: str, bits: list[int]) -> np.ndarray:
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    return np.ascontiguousarray(watermark_dwt.encode(bgr, method, bits, _DWT_SCALES[method])[..., ::-1])  # type: ignore[arg-type]


def _decode_dwt(rgb: np.ndarray, method: str) -> list[int]:
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    return watermark_dwt.decode(bgr, method, FRAME_BITS, _DWT_SCALES[method])  # type: ignore[arg-type]


def _embed_rivagan(rgb: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Mark a 256 x 256 copy, add the difference, scaled up, to the full image.

    One pass leaves bits wrong on many images, and each pass costs 3 to 5 dB of PSNR,
    so passes are added (up to 3) only until the full-size result decodes exactly.
    """
    import cv2
    from imwatermark.rivaGan import RivaWatermark

    _load_rivagan()
    side = _RIVAGAN_SIDE_PX
    height, width = rgb.shape[:2]
    small = cv2.resize(rgb, (side, side), interpolation=cv2.INTER_AREA)
    encoder = RivaWatermark(watermarks=[int(b) for b in bits], wmLen=_RIVAGAN_BITS)
    marked_small = np.ascontiguousarray(small[..., ::-1])  # the model was trained on BGR frames
    for _ in range(_RIVAGAN_MAX_PASSES):
        marked_small = encoder.encode(marked_small)
        difference = marked_small[..., ::-1].astype(np.float32) - small.astype(np.float32)
        difference = cv2.resize(difference, (width, height), interpolation=cv2.INTER_LINEAR)
        marked = np.clip(rgb.astype(np.float32) + difference, 0, 255).round().astype(np.uint8)
        if np.array_equal(_decode_rivagan(marked), bits):
            break
    return marked


def _decode_rivagan(rgb: np.ndarray) -> np.ndarray:
    """The 32 decoded bits. The model outputs logits: threshold at 0 (imwatermark uses 0.52)."""
    import cv2
    from imwatermark.rivaGan import RivaWatermark

    _load_rivagan()
    small = cv2.resize(rgb, (_RIVAGAN_SIDE_PX, _RIVAGAN_SIDE_PX), interpolation=cv2.INTER_AREA)
    frame = small[..., ::-1].astype(np.float32)[None] / 127.5 - 1.0  # (1, H, W, C) BGR in [-1, 1]
    frame = frame.transpose(3, 0, 1, 2)[None]  # (N=1, C, L=1, H, W)
    logits = RivaWatermark.decoder.run(None, {"frame": frame})[0][0]
    return (logits > 0).astype(np.uint8)


def _rivagan_matches(bits: np.ndarray, payload: str) -> bool:
    return int(np.sum(bits != _fingerprint_bits(payload))) <= _RIVAGAN_MAX_BIT_ERRORS


@cache
def _load_rivagan() -> None:
    from imwatermark.rivaGan import RivaWatermark

    RivaWatermark.loadModel()


@cache
def _have_onnxruntime() -> bool:
    """rivaGan's models ship in invisible-watermark, which runs them with onnxruntime."""
    return find_spec("onnxruntime") is not None and find_spec("imwatermark") is not None


def _split_alpha(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return rgba.convert("RGB"), rgba.getchannel("A")
    return image.convert("RGB"), None


# --- visible marks -------------------------------------------------------------------------


@dataclass(frozen=True)
class VisibleMark:
    """A text label or a logo drawn on the image.

    `size` is a fraction of the image's shorter side: the text's height, or the logo's
    width. `margin` is a fraction of the shorter side too. `opacity` 0 draws nothing.
    """

    text: str | None = None
    logo: Path | None = None
    position: Position = "bottom-right"
    size: float = 0.05
    margin: float = 0.02
    opacity: float = 0.8
    color: str = "white"
    outline_color: str | None = "black"
    """Draws a thin outline around the text so it reads on light and dark images alike."""
    font: Path | None = None
    """A TrueType/OpenType file; None = Pillow's built-in scalable font (Latin only)."""

    def __post_init__(self) -> None:
        if (self.text is None) == (self.logo is None):
            raise ValueError("a visible watermark needs either `text` or `logo`, not both and not neither")
        if self.text is not None and not self.text.strip():
            raise ValueError(f"visible watermark `text` should be non-empty but is {self.text!r}")
        if self.position not in POSITIONS:
            raise ValueError(
                f"visible watermark `position` should be one of {', '.join(POSITIONS)} but is {self.position!r}"
            )
        if not 0 < self.size <= 1:
            raise ValueError(
                f"visible watermark `size` should be in (0, 1] (a fraction of the shorter side) but is {self.size}"
            )
        if not 0 <= self.margin < 0.5:
            raise ValueError(f"visible watermark `margin` should be in [0, 0.5) but is {self.margin}")
        if not 0 <= self.opacity <= 1:
            raise ValueError(f"visible watermark `opacity` should be in [0, 1] but is {self.opacity}")
        for name in ("color", "outline_color"):
            value = getattr(self, name)
            if value is not None:
                try:
                    ImageColor.getrgb(value)
                except ValueError:
                    raise ValueError(
                        f"visible watermark `{name}` should be a colour name or #rrggbb but is {value!r}"
                    ) from None
        for name in ("logo", "font"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"visible watermark `{name}` {str(path)!r} is not a file")
        if self.logo is not None:
            _load_logo(Path(self.logo))  # fail now, not on the first job


def apply_visible(image: Image.Image, mark: VisibleMark) -> Image.Image:
    """Draw `mark` on a copy of `image`; RGB out (RGBA when the input has alpha).

    Apply it before the invisible mark, so that the invisible one is made on (and verified
    against) the final pixels. Text too wide for the image is drawn smaller to fit.
    """
    rgb, alpha = _split_alpha(image)
    base = rgb.convert("RGBA")
    if mark.opacity > 0:
        layer = _text_layer(base.size, mark) if mark.text is not None else _logo_layer(base.size, mark)
        layer.putalpha(layer.getchannel("A").point(lambda a: round(a * mark.opacity)))
        base = Image.alpha_composite(base, layer)
    out = base.convert("RGB")
    if alpha is not None:
        out.putalpha(alpha)
    return out


def _text_layer(size_px: tuple[int, int], mark: VisibleMark) -> Image.Image:
    assert mark.text is not None
    width, height = size_px
    short_side = min(width, height)
    margin_px = round(mark.margin * short_side)
    font_px = max(6, round(mark.size * short_side))
    font, stroke_px, box = _fit_text(mark, font_px, width - 2 * margin_px)
    left, top, right, bottom = box
    x, y = _place((right - left, bottom - top), size_px, mark.position, margin_px)
    layer = Image.new("RGBA", size_px, (0, 0, 0, 0))
    ImageDraw.Draw(layer).text(
        (x - left, y - top),
        mark.text,
        font=font,
        fill=ImageColor.getrgb(mark.color),
        stroke_width=stroke_px,
        stroke_fill=ImageColor.getrgb(mark.outline_color) if stroke_px else None,
    )
    return layer


def _fit_text(
    mark: VisibleMark, font_px: int, max_width_px: int
) -> tuple[ImageFont.FreeTypeFont | ImageFont.ImageFont, int, tuple[int, int, int, int]]:
    """The font, outline width and text box; shrunk once if the text is wider than allowed."""
    assert mark.text is not None
    for _ in range(2):
        font = _font(mark.font, font_px)
        stroke_px = max(1, round(font_px / 16)) if mark.outline_color else 0
        left, top, right, bottom = (int(v) for v in font.getbbox(mark.text, stroke_width=stroke_px))
        text_width = right - left
        if text_width <= max_width_px or font_px <= 6:
            break
        font_px = max(6, int(font_px * max_width_px / text_width))
    return font, stroke_px, (left, top, right, bottom)


def _font(path: Path | None, size_px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if path is not None:
        return ImageFont.truetype(str(path), size_px)
    return ImageFont.load_default(size=size_px)  # scalable (FreeType) since Pillow 10.1


def _logo_layer(size_px: tuple[int, int], mark: VisibleMark) -> Image.Image:
    assert mark.logo is not None
    width, height = size_px
    short_side = min(width, height)
    margin_px = round(mark.margin * short_side)
    logo = _load_logo(Path(mark.logo))
    logo_w = max(1, round(mark.size * short_side))
    logo_h = max(1, round(logo_w * logo.height / logo.width))
    fit = min(1.0, (width - 2 * margin_px) / logo_w, (height - 2 * margin_px) / logo_h)
    logo_w, logo_h = max(1, int(logo_w * fit)), max(1, int(logo_h * fit))
    logo = logo.resize((logo_w, logo_h), Image.Resampling.LANCZOS)
    layer = Image.new("RGBA", size_px, (0, 0, 0, 0))
    layer.paste(logo, _place((logo_w, logo_h), size_px, mark.position, margin_px))
    return layer


def _load_logo(path: Path) -> Image.Image:
    try:
        with Image.open(path) as logo:
            return logo.convert("RGBA")
    except (OSError, ValueError) as exc:
        raise ValueError(f"visible watermark `logo` {str(path)!r} is not a readable image: {exc}") from exc


def _place(box_px: tuple[int, int], size_px: tuple[int, int], position: Position, margin_px: int) -> tuple[int, int]:
    """Top-left corner of a box of `box_px` at `position`, `margin_px` from the edges."""
    box_w, box_h = box_px
    width, height = size_px
    x = {"left": margin_px, "right": width - margin_px - box_w, "center": (width - box_w) // 2}
    y = {"top": margin_px, "bottom": height - margin_px - box_h, "center": (height - box_h) // 2}
    if position == "center":
        return x["center"], y["center"]
    vertical, horizontal = position.split("-")
    return x[horizontal], y[vertical]
