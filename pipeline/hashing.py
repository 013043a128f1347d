"""Model hashes that match what other tools show, computed once per file version.

- A single file: AUTOMATIC1111's hash, the first 10 hex digits of `sha256(file)`,
  so a checkpoint shows the same `Model hash:` here as in its infotext and on model sites.
- A diffusers folder: the first 10 hex digits of the sha256 of `sha256sum`'s
  listing of every file in the folder, in sorted order, which a shell reproduces:

      cd MODEL && find . -type f ! -name '.*' | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-10

Hashes are cached in `<state_dir>/model-hashes.json`, keyed by path, size and
mtime of every hashed file, so a restart does not re-read gigabytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import BinaryIO

from diffusiond.pipeline.families import ModelEntry

_lock = threading.Lock()


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return stream_sha256(handle)


def stream_sha256(handle: BinaryIO) -> str:
    """The sha256 of what is left to read in `handle`, read 1 MiB at a time."""
    digest = hashlib.sha256()
    for block in iter(lambda: handle.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def lora_hash(path: Path) -> str:
    """AUTOMATIC1111's short hash of a LoRA (its `Lora hashes:` entry): the first 12 hex digits of the
    sha256 of a .safetensors file's tensor data, after its JSON header (kohya's "addnet" hash)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        header = int.from_bytes(handle.read(8), "little")
        handle.seek(8 + header)
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def _files(root: Path) -> list[Path]:
    out = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        out += [Path(folder) / n for n in names if not n.startswith(".")]
    return sorted(out, key=lambda p: ("./" + p.relative_to(root).as_posix()).encode())


def _stamp(paths: list[Path]) -> list[list[int]]:
    return [[p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


def model_hash(entry: ModelEntry, state_dir: Path | None) -> str:
    """The model's short hash (10 hex digits), from the cache when nothing changed."""
    path = entry.path
    files = [path] if path.is_file() else _files(path)
    stamp = _stamp(files)
    cache_path = state_dir / "model-hashes.json" if state_dir else None
    key = str(path.absolute())
    with _lock:
        cache = _read(cache_path)
        cached = cache.get(key)
        if cached and cached.get("stamp") == stamp:
            return str(cached["hash"])
    if path.is_file():
        short = file_sha256(path)[:10]
    else:
        listing = "".join(f"{file_sha256(f)}  ./{f.relative_to(path).as_posix()}\n" for f in files)
        short = hashlib.sha256(listing.encode()).hexdigest()[:10]
    if cache_path is not None:
        with _lock:
            cache = _read(cache_path)
            cache[key] = {"stamp": stamp, "hash": short}
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_path.with_name(f".{cache_path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=1), encoding="utf-8")
            os.replace(tmp, cache_path)
    return short


def _read(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
