"""The two file operations every stage relies on: an atomic write and a collision-free move."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path


def atomic_write(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write to a hidden temp name in the same folder, fsync, then rename over `path`.

    A reader (or a crash) sees the old file or the whole new one, never a part.
    Temp names start with a dot, which every inbox filter (ours too) ignores.
    `durable=False` skips the fsyncs, for files rewritten all the time whose
    loss in a power cut does not matter (status.json): readers still never see a part.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make renames in `folder` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def unique_path(folder: Path, name: str) -> Path:
    """`folder/name`, or `folder/stem-2.ext`, `-3`, ... when that is taken."""
    candidate = folder / name
    stem, dot, suffix = name.partition(".")
    n = 2
    while candidate.exists():
        candidate = folder / f"{stem}-{n}{dot}{suffix}"
        n += 1
    return candidate


def move_unique(src: Path, folder: Path, name: str | None = None) -> Path:
    """Rename `src` into `folder` without overwriting anything there; returns the new path."""
    folder.mkdir(parents=True, exist_ok=True)
    dest = unique_path(folder, name or src.name)
    try:
        os.rename(src, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        shutil.move(src, dest)  # archive/failed on another filesystem: copy, then delete
    return dest
