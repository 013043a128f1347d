"""Which jobs run together: batches of compatible jobs, in arrival order. No torch here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from diffusiond.daemon.claim import Claim
from diffusiond.pipeline.job import Job, batch_key


@dataclass(frozen=True)
class Pending:
    """One job waiting to run, with the claim it belongs to and its input image."""

    claim: Claim
    job: Job
    image: Path | None


@dataclass
class Planned:
    key: Any
    items: list[Pending] = field(default_factory=list)

    @property
    def images(self) -> int:
        return sum(p.job.spec.count for p in self.items)


def plan_batches(pending: Sequence[Pending], batch_size: int) -> list[list[Pending]]:
    """Group jobs with equal `batch_key` into calls of at most `batch_size` images.

    Order is kept within a key and batches start in the order of their first job, so
    a stream of different jobs runs first come, first served. A job whose `count`
    alone exceeds `batch_size` still runs, alone.
    """
    batches: list[Planned] = []
    open_by_key: dict[Any, Planned] = {}
    for item in pending:
        key = batch_key(item.job.spec, _input_size(item.image))
        current = open_by_key.get(key) if key is not None else None
        if current is None or current.images + item.job.spec.count > batch_size:
            current = Planned(key)
            batches.append(current)
            if key is not None:
                open_by_key[key] = current
        current.items.append(item)
    return [b.items for b in batches]


def _input_size(path: Path | None) -> tuple[int, int] | None:
    """The size img2img will use: the image's own, cropped to multiples of 8 (reads the header only)."""
    if path is None:
        return None
    with Image.open(path) as image:
        width, height = image.size
        if image.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientation that turns the image by 90°
            width, height = height, width
    return (width - width % 8, height - height % 8)
