"""invisible-watermark's two DWT marks (`dwtDct`, `dwtDctSvd`), kept for the Stable Diffusion reference scripts' marks.

Adapted from invisible-watermark 0.2.0 (`imwatermark/maxDct.py`, `imwatermark/dwtDctSvd.py`,
MIT licence, (c) ShieldMnt), arithmetic unchanged, so marks read both ways: the package
itself cannot be a dependency, because it requires the full `opencv-python` (which needs
libGL and X11 at import: slim servers and containers lack them) and imports torch. Here
OpenCV comes from `opencv-python-headless`; `tests/test_watermark.py` checks that this
code writes the same pixels as the package did.

Both embed each bit in 4 x 4 blocks of the Haar DWT's approximation band of the Y and U
channels (the package never marks V): dwtDct moves the block's largest coefficient (its
first left out; no DCT is taken, despite the name) onto a lattice, dwtDctSvd the largest
singular value of the block's DCT.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import cv2
import numpy as np
import pywt

DwtMethod = Literal["dwtDct", "dwtDctSvd"]
_BLOCK = 4


def encode(bgr: np.ndarray, method: DwtMethod, bits: Sequence[int], scales: Sequence[int]) -> np.ndarray:
    """`bgr` (uint8, OpenCV's channel order) with `bits` embedded in the channels `scales` names."""
    rows, cols = bgr.shape[:2]
    yuv = cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV)
    for channel in range(2):
        if scales[channel] <= 0:
            continue
        ca1, (h1, v1, d1) = pywt.dwt2(yuv[: rows // 4 * 4, : cols // 4 * 4, channel], "haar")
        _encode_frame(ca1, method, bits, scales[channel])
        # The detail bands go back swapped, as the package does.
        yuv[: rows // 4 * 4, : cols // 4 * 4, channel] = pywt.idwt2((ca1, (v1, h1, d1)), "haar")
    return cv2.cvtColor(yuv, cv2.COLOR_YUV2BGR)


def decode(bgr: np.ndarray, method: DwtMethod, length: int, scales: Sequence[int]) -> list[int]:
    """The `length` bits read from `bgr` (each bit the vote of all blocks that carry it)."""
    rows, cols = bgr.shape[:2]
    yuv = cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV)
    scores: list[list[float]] = [[] for _ in range(length)]
    for channel in range(2):
        if scales[channel] <= 0:
            continue
        ca1, _details = pywt.dwt2(yuv[: rows // 4 * 4, : cols // 4 * 4, channel], "haar")
        _decode_frame(ca1, method, scales[channel], scores)
    return [int(np.array(s).mean() * 255 > 127) for s in scores]


def _blocks(frame: np.ndarray) -> list[tuple[int, int]]:
    rows, cols = frame.shape
    return [(i, j) for i in range(rows // _BLOCK) for j in range(cols // _BLOCK)]


def _encode_frame(frame: np.ndarray, method: DwtMethod, bits: Sequence[int], scale: int) -> None:
    for num, (i, j) in enumerate(_blocks(frame)):
        window = (slice(i * _BLOCK, (i + 1) * _BLOCK), slice(j * _BLOCK, (j + 1) * _BLOCK))
        bit = bits[num % len(bits)]
        block = frame[window]
        frame[window] = (
            _diffuse_dct_svd(block, bit, scale) if method == "dwtDctSvd" else _diffuse_dct(block, bit, scale)
        )


def _decode_frame(frame: np.ndarray, method: DwtMethod, scale: int, scores: list[list[float]]) -> None:
    for num, (i, j) in enumerate(_blocks(frame)):
        block = frame[i * _BLOCK : (i + 1) * _BLOCK, j * _BLOCK : (j + 1) * _BLOCK]
        score = _infer_dct_svd(block, scale) if method == "dwtDctSvd" else _infer_dct(block, scale)
        scores[num % len(scores)].append(score)


def _diffuse_dct_svd(block: np.ndarray, bit: int, scale: int) -> np.ndarray:
    u, s, v = np.linalg.svd(cv2.dct(block))
    s[0] = (s[0] // scale + 0.25 + 0.5 * bit) * scale
    return np.asarray(cv2.idct(np.dot(u, np.dot(np.diag(s), v))))


def _infer_dct_svd(block: np.ndarray, scale: int) -> int:
    _u, s, _v = np.linalg.svd(cv2.dct(block))
    return int((s[0] % scale) > scale * 0.5)


def _diffuse_dct(block: np.ndarray, bit: int, scale: int) -> np.ndarray:
    pos = int(np.argmax(abs(block.flatten()[1:]))) + 1
    i, j = pos // _BLOCK, pos % _BLOCK
    value = block[i][j]
    if value >= 0.0:
        block[i][j] = (value // scale + 0.25 + 0.5 * bit) * scale
    else:
        block[i][j] = -1.0 * (abs(value) // scale + 0.25 + 0.5 * bit) * scale
    return block


def _infer_dct(block: np.ndarray, scale: int) -> int:
    pos = int(np.argmax(abs(block.flatten()[1:]))) + 1
    value = abs(block[pos // _BLOCK][pos % _BLOCK])
    return int((value % scale) > 0.5 * scale)
