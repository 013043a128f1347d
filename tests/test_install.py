"""A headless install: the watermark code needs no libGL or X11 (slim servers and containers lack them).

invisible-watermark requires the full opencv-python, whose cv2 loads libGL.so.1 and the X11 libraries
at import; diffusiond depends on opencv-python-headless instead and carries its own copy of the DWT
marks (pipeline/watermark_dwt.py). The proof: the marks are made and read in a process from which
tests/no_libgl.sh has hidden those libraries (where the full OpenCV fails with "libGL.so.1: cannot
open shared object file").
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from tests.conftest import CEILING_S

NO_LIBGL = Path(__file__).with_name("no_libgl.sh")
SNIPPET = """
import ctypes, sys
import numpy as np
from PIL import Image
from diffusiond.pipeline import inspect, watermark
try:
    ctypes.CDLL("libGL.so.1")
except OSError:
    pass
else:
    sys.exit("libGL.so.1 still loads")
pixels = np.linspace(40, 210, 256 * 256 * 3).reshape(256, 256, 3) + np.random.default_rng(0).normal(0, 8, (256, 256, 3))
image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
for method in ("tiled", "dwtDctSvd"):
    marked, result = watermark.embed_invisible(image, watermark.InvisibleMark(method=method), 3)
    assert result.verified and watermark.decode_invisible(marked)[method] == "diffusiond", (method, result)
assert "torch" not in sys.modules, "the watermark code imported torch"
import cv2
print("OK", cv2.__file__)
"""


def test_the_install_is_headless() -> None:
    requires = " ".join(metadata.requires("diffusiond") or [])
    assert "opencv-python-headless" in requires and "invisible-watermark" not in requires
    metadata.version("opencv-python-headless")
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.version("opencv-python")  # it would overwrite the headless cv2 with one that needs libGL


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_the_watermark_code_runs_with_no_libgl_on_the_machine() -> None:
    result = subprocess.run(
        [str(NO_LIBGL), sys.executable, SNIPPET],
        capture_output=True,
        text=True,
        timeout=CEILING_S,
        env=os.environ | {"NO_LIBGL_DEBUG": "1"},
    )
    if result.returncode == 125 and os.geteuid() != 0:
        pytest.skip(f"cannot hide libraries here (needs root or user namespaces): {result.stderr.strip()}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("OK ")
