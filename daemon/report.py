"""The error report beside a failed input: what happened, to which job and field, and how to fix it."""

from __future__ import annotations

import platform
import time
from typing import Any

import yaml

from diffusiond import __version__
from diffusiond.pipeline.errors import DiffusiondError


def report_text(error: DiffusiondError, **extra: Any) -> str:
    """`<name>.error.yaml`'s text: the error's fields, then `extra` (inputs, finished jobs, ...)."""
    report = (
        error.report()
        | extra
        | {
            "failed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "daemon": f"diffusiond {__version__} on {platform.node()}",
        }
    )
    return yaml.safe_dump(report, sort_keys=False, allow_unicode=True, width=100)
