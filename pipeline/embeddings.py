"""Textual-inversion embeddings: a configured embedding named in a prompt is loaded into the model.

As in AUTOMATIC1111, an embedding is used by writing its name (the file name without extension)
in the prompt or negative prompt. It is loaded once per model, into the tokenizer and text
encoder (SD 1.x, 2.x; SDXL files hold `clip_l` and `clip_g` for its two encoders), and stays: the
new token changes no other word's encoding, so a job that does not name it makes the same image
as before it was loaded. `.safetensors` files are read as tensors only; `.pt`/`.bin` (A1111's
`string_to_param` layout) with `torch.load(weights_only=True)`, which runs no code.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from diffusiond.pipeline.errors import Code, JobFailed
from diffusiond.pipeline.hashing import file_sha256

SUFFIXES = (".safetensors", ".pt", ".bin")


def named(texts: Sequence[str], names: Sequence[str]) -> list[str]:
    """The embeddings whose names stand as words in any of the texts, in the order configured."""
    return [n for n in names if any(re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", t) for t in texts)]


def apply(pipe: Any, texts: Sequence[str], files: Mapping[str, Path], loaded: set[str]) -> list[dict[str, Any]]:
    """Load the embeddings the texts name (once per model: `loaded`); what the manifest lists of each."""
    files = dict(files)  # a configured folder is listed here once per call, not once per lookup
    used = named(texts, list(files))
    for name in used:
        if name not in loaded:
            _load(pipe, name, files[name])
            loaded.add(name)
    return [_record(name, files[name]) for name in used]


def _load(pipe: Any, name: str, path: Path) -> None:
    try:
        state = _read(path)
        if "clip_l" in state and "clip_g" in state:  # SDXL: one embedding per text encoder
            pipe.load_textual_inversion(
                state["clip_l"], token=name, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
            )
            pipe.load_textual_inversion(
                state["clip_g"], token=name, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
            )
        else:
            pipe.load_textual_inversion(state, token=name)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise JobFailed(
            f"embedding {name!r} ({path}) could not be loaded: {type(exc).__name__}: {exc}",
            code=Code.MODEL_FAILED,
            field="prompt",
            value=name,
            fix="check that the file is a textual-inversion embedding for this model's family (its width "
            "must match the text encoder's), or rename it so the prompt does not name it",
        ) from exc


def _read(path: Path) -> dict[str, Any]:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    if not isinstance(state, dict):
        raise ValueError("not a mapping of tensors")
    return state


def _record(name: str, path: Path) -> dict[str, Any]:
    stat = os.stat(path)
    sha256 = _sha256(path, (stat.st_ino, stat.st_size, stat.st_mtime_ns))
    return {"name": name, "file": str(path), "sha256": sha256, "hash": sha256[:12]}


@functools.lru_cache(maxsize=64)
def _sha256(path: Path, stamp: tuple[int, int, int]) -> str:
    return file_sha256(path)
