"""The `tiled` invisible mark: one that outlives what the web does to an image.

No offline library does this (invisible-watermark's DWT methods are tied to the pixel grid
and lose the mark on a resize or a crop; the learned marks download their weights at first
use), so it is written here, in numpy. The design, and why (measurements in
`bench/watermark_robustness.py` and the README):

- **A fixed frame.** The mark lives on the image scaled so that its shorter side is
  `GRID_PX` (256) and is added to the full image as the upsampled difference. A reader
  scales any copy back to the same frame, so a resized copy reads like the original.
- **Tiles.** The frame is covered with copies of one `TILE_PX` (64) square. A reader
  adds up all the tiles it sees (the host image averages out, the mark does not) and
  finds where the tile starts by correlating with a known sync pattern: a crop only
  moves the tiles. A crop also rescales the frame (the shorter side is shorter), so the
  reader tries scales from 1 to 1.25 in steps of 0.5 %, best sync peaks first.
- **Cells.** A tile is 16 x 16 cells of `CELL_PX` (4) px: 64 carry the sync, the rest
  the 64 frame bits, 3 cells each, each cell a smoothed +-1 in luminance. 4 px cells sit
  at frequencies JPEG 50 and a half-size resize keep (measured: 93 % and 91 % of the
  mark's energy survive at 256 px; WebP 75 keeps 63 %).
- **Informed embedding.** The image itself is the largest noise a reader sees. The
  embedder reads its own mark back (as a reader would) and strengthens the bits the image
  works against, up to 3x, in 3 rounds; then scales the whole mark to `PSNR_DB` (38.5).
  Without it 96 bits failed on half the 256 px images; with it every bit held.
- **The frame** is 64 bits: a 32-bit mark id (which image it is; the manifest and the
  C2PA soft binding record it) and a 32-bit check keyed by the payload text. A reader
  names the payload only when it is one it was asked about (like rivaGan's fingerprint),
  so an unmarked image never "decodes": the chance is 2^-32 per try. When the hard bits
  fail the check the reader flips up to 3 of the 8 least certain bits (Chase decoding),
  which brings WebP 75's odd lost bit back; at most ~1,400 tries per image, so false
  positives stay under 1 in 3 million images.

Every pseudo-random choice comes from SHA-256 of a fixed key, not from numpy's generators,
whose streams may change between versions: a mark made today must read in ten years.
"""

from __future__ import annotations

import hashlib
import itertools
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = ["FRAME_BITS", "GRID_PX", "PSNR_DB", "TiledRead", "embed", "frame_bits", "mark_id_for", "read"]

GRID_PX = 256
TILE_PX = 64
CELL_PX = 4
SYNC_CELLS = 64
FRAME_BITS = 64
ID_BITS = 32
PSNR_DB = 38.5
_KEY = b"diffusiond-tiled-v1"
_ROUNDS = 3
_MAX_BOOST = 3.0
_SCALES = tuple(1 + 0.005 * k for k in range(51))
"""Frame scales a reader tries: 1 (no crop) to 1.25 (a fifth cut from the shorter side)."""
_CANDIDATES = 5
_CHASE_BITS = 8
_CHASE_FLIPS = 3
_CLIP_SIGMAS = 2.5
_MAX_ASPECT = 4
_TARGET_RMS = 255 / 10 ** (PSNR_DB / 20)


@dataclass(frozen=True)
class TiledRead:
    """What a reader found: the payload it matched, the image's mark id, and where the tiles were."""

    payload: str
    mark_id: int
    scale: float
    """How much larger the frame was than this copy's: 1.0 uncropped, 1.11 after a 10 % crop."""
    flipped_bits: int
    """Bits the check corrected (Chase decoding); 0 when every bit read right."""


# --- the frame ------------------------------------------------------------------------------


def mark_id_for(*parts: str) -> int:
    """A 32-bit id for one image from what names it (job id, file name): the same image, the same id."""
    return int.from_bytes(hashlib.sha256("\0".join(parts).encode()).digest()[:4], "big")


def frame_bits(payload: str, mark_id: int) -> np.ndarray:
    """The 64 bits: mark id, then a 32-bit check keyed by the payload text."""
    if not 0 <= mark_id < 1 << ID_BITS:
        raise ValueError(f"mark id should be a 32-bit number but is {mark_id}")
    word = (mark_id << 32) | _check(payload, mark_id)
    return np.unpackbits(np.frombuffer(word.to_bytes(8, "big"), dtype=np.uint8))


def _check(payload: str, mark_id: int) -> int:
    return zlib.crc32(_KEY + payload.encode() + b"\0" + mark_id.to_bytes(4, "big"))


def _matching_payload(bits: np.ndarray, payloads: Sequence[str]) -> tuple[str, int] | None:
    word = int.from_bytes(np.packbits(bits).tobytes(), "big")
    mark_id, check = word >> 32, word & 0xFFFFFFFF
    for payload in payloads:
        if _check(payload, mark_id) == check:
            return payload, mark_id
    return None


# --- the patterns ---------------------------------------------------------------------------


def _stream(label: bytes, count: int) -> np.ndarray:
    """`count` pseudo-random 64-bit words from SHA-256 (stable across numpy versions)."""
    blocks = (hashlib.sha256(_KEY + label + i.to_bytes(4, "big")).digest() for i in range(-(-count // 4)))
    return np.frombuffer(b"".join(blocks), dtype=">u8")[:count].astype(np.uint64)


@cache
def _patterns() -> tuple[np.ndarray, np.ndarray]:
    """The sync tile and one tile per frame bit (each the bit's cells, smoothed, signed)."""
    side = TILE_PX // CELL_PX
    cells = side * side
    order = np.argsort(_stream(b"cells", cells), kind="stable")
    signs = np.where(_stream(b"signs", cells) & np.uint64(1), 1.0, -1.0)
    owner = np.full(cells, -1)
    owner[order[SYNC_CELLS:]] = np.arange(cells - SYNC_CELLS) % FRAME_BITS

    def tile(chosen: np.ndarray) -> np.ndarray:
        grid = np.where(chosen, signs, 0.0).reshape(side, side)
        blocky = np.kron(grid, np.ones((CELL_PX, CELL_PX)))
        return ndimage.gaussian_filter(blocky, CELL_PX / 3, mode="wrap").astype(np.float32)

    sync = tile(owner == -1)
    bits = np.stack([tile(owner == i) for i in range(FRAME_BITS)])
    sync.setflags(write=False)
    bits.setflags(write=False)
    return sync, bits


# --- embedding ------------------------------------------------------------------------------


def embed(rgb: np.ndarray, payload: str, mark_id: int) -> np.ndarray:
    """`rgb` (H x W x 3 uint8, shorter side >= 256) with the mark added to its luminance."""
    height, width = rgb.shape[:2]
    sync, bit_tiles = _patterns()
    signs = frame_bits(payload, mark_id).astype(np.float32) * 2 - 1
    grid_w, grid_h = _grid_size(width, height, GRID_PX)
    luma = _luma(rgb)
    boost = np.ones(FRAME_BITS, dtype=np.float32)
    target = gain = 0.0
    for round_ in range(_ROUNDS + 1):
        tile = sync + np.tensordot(signs * boost, bit_tiles, 1)
        mark = _upsample(_tiled(tile, grid_w, grid_h), width, height)
        mark = mark * _scale_to_target(mark)
        if round_ == _ROUNDS:
            break
        # Read it back as a reader would, at the known place, and strengthen the bits the image works against.
        margins = _soft_bits(_fold(_band(luma + mark, GRID_PX)), (0, 0)) * signs
        if round_ == 0:
            target = gain = float(np.median(margins))
        boost = np.minimum(boost + np.maximum(0.0, target - margins) / max(gain, 1e-6), _MAX_BOOST)
    marked = rgb.astype(np.float32) + mark[..., None]
    return np.clip(marked, 0, 255).round().astype(np.uint8)


def _scale_to_target(mark: np.ndarray) -> float:
    return _TARGET_RMS / max(float(np.sqrt(np.mean(mark * mark))), 1e-6)


def _tiled(tile: np.ndarray, grid_w: int, grid_h: int) -> np.ndarray:
    return np.tile(tile, (-(-grid_h // TILE_PX), -(-grid_w // TILE_PX)))[:grid_h, :grid_w]


def _sync_correlation(folded: np.ndarray) -> np.ndarray:
    sync, _ = _patterns()
    return np.real(np.fft.ifft2(np.fft.fft2(folded) * np.conj(np.fft.fft2(sync))))


# --- reading --------------------------------------------------------------------------------


def read(rgb: np.ndarray, payloads: Iterable[str], *, search: bool = True) -> TiledRead | None:
    """The mark in `rgb` (any size, cropped or not), if it carries one of `payloads`; else None.

    `search=False` tries only the uncropped frame (the stamp's own check of a file it wrote):
    fast, and what a resize, recompression or brightness change still passes.
    """
    payloads = list(dict.fromkeys(payloads))
    if not payloads or min(rgb.shape[:2]) < 16:
        return None
    # A thin image would be scaled up to a frame many times its size at every try: read its middle,
    # at most 4 times as long as it is wide (the short side, hence the frame's scale, is kept; the
    # tiles there carry the whole mark).
    height, width = rgb.shape[:2]
    longest = _MAX_ASPECT * min(height, width)
    top, left = max(0, (height - longest) // 2), max(0, (width - longest) // 2)
    luma = _luma(rgb[top : top + longest, left : left + longest])
    height, width = luma.shape
    if min(height, width) > 2 * GRID_PX:  # scale big images once; each try then costs ~1 ms
        luma = _resize(luma, *_grid_size(width, height, 2 * GRID_PX))
    found = _read_at(luma, (1.0,), payloads)
    if found is None and search:
        found = _read_at(luma, _SCALES[1:], payloads)
    return found


def _read_at(luma: np.ndarray, scales: Sequence[float], payloads: Sequence[str]) -> TiledRead | None:
    tries = []
    for scale in scales:
        folded = _fold(_band(luma, GRID_PX / scale))
        correlation = _sync_correlation(folded)
        peak = int(np.argmax(correlation))
        z = (correlation.flat[peak] - correlation.mean()) / (correlation.std() + 1e-9)
        tries.append((float(z), scale, np.unravel_index(peak, correlation.shape), folded))
    tries.sort(key=lambda t: -t[0])
    for _z, scale, shift, folded in tries[:_CANDIDATES]:
        soft = _soft_bits(folded, (int(shift[0]), int(shift[1])))
        decoded = _chase(soft, payloads)
        if decoded is not None:
            (payload, mark_id), flipped = decoded
            return TiledRead(payload, mark_id, scale, flipped)
    return None


def _chase(soft: np.ndarray, payloads: Sequence[str]) -> tuple[tuple[str, int], int] | None:
    """The hard bits, or them with up to 3 of the 8 least certain flipped, that pass the check."""
    hard = (soft > 0).astype(np.uint8)
    weakest = np.argsort(np.abs(soft))[:_CHASE_BITS]
    for flips in range(_CHASE_FLIPS + 1):
        for chosen in itertools.combinations(weakest, flips):
            bits = hard.copy()
            bits[list(chosen)] ^= 1
            match = _matching_payload(bits, payloads)
            if match is not None:
                return match, flips
    return None


def _soft_bits(folded: np.ndarray, shift: tuple[int, int]) -> np.ndarray:
    aligned = np.roll(folded, (-shift[0], -shift[1]), axis=(0, 1))
    return np.tensordot(_patterns()[1], aligned, ((1, 2), (0, 1)))


def _band(luma: np.ndarray, short_px: float) -> np.ndarray:
    """The luminance at the frame's scale, without its smooth part, large values clipped.

    Clipping keeps an edge of the picture from outweighing the many small cells around it.
    """
    height, width = luma.shape
    frame = _resize(luma, *_grid_size(width, height, short_px))
    detail = frame - ndimage.gaussian_filter(frame, CELL_PX)
    limit = _CLIP_SIGMAS * (float(np.std(detail)) + 1e-6)
    return np.clip(detail, -limit, limit)


def _fold(frame: np.ndarray) -> np.ndarray:
    """All tiles of `frame` added into one (a part tile at the edges counts for what it covers)."""
    height, width = frame.shape
    padded = np.zeros((-(-height // TILE_PX) * TILE_PX, -(-width // TILE_PX) * TILE_PX), dtype=np.float32)
    padded[:height, :width] = frame
    return padded.reshape(padded.shape[0] // TILE_PX, TILE_PX, padded.shape[1] // TILE_PX, TILE_PX).sum(axis=(0, 2))


# --- pixels ---------------------------------------------------------------------------------


def _luma(rgb: np.ndarray) -> np.ndarray:
    pixels = rgb.astype(np.float32)
    return 0.299 * pixels[..., 0] + 0.587 * pixels[..., 1] + 0.114 * pixels[..., 2]


def _grid_size(width: int, height: int, short_px: float) -> tuple[int, int]:
    factor = short_px / min(width, height)
    return max(1, round(width * factor)), max(1, round(height * factor))


def _resize(plane: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pillow's resize of a float plane (antialiased when it shrinks)."""
    image = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), "F")
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))


def _upsample(mark: np.ndarray, width: int, height: int) -> np.ndarray:
    image = Image.fromarray(np.ascontiguousarray(mark, dtype=np.float32), "F")
    return np.asarray(image.resize((width, height), Image.Resampling.BICUBIC))
