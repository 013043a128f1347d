"""The error report beside a failed input: what happened, to which job and field, and how to fix it."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import yaml

from diffusiond import __version__
from diffusiond.daemon.fsutil import atomic_write, unique_path
from diffusiond.pipeline.errors import DiffusiondError


def write_report(
    failed: Path,
    stem: str,
    error: DiffusiondError,
    *,
    inputs: list[str],
    done_jobs: list[str],
) -> Path:
    """Write `failed/<stem>.error.yaml` (a free name) last, after the inputs moved there."""
    report = error.report() | {
        "inputs": inputs,
        "finished_jobs": done_jobs,
        "failed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "daemon": f"diffusiond {__version__} on {platform.node()}",
    }
    path = unique_path(failed, f"{stem}.error.yaml")
    text = yaml.safe_dump(report, sort_keys=False, allow_unicode=True, width=100)
    atomic_write(path, text.encode())
    return path
