"""Several jobs in one pipeline call, and the per-step hook that reports progress and cancels.

A batch holds jobs with equal `batch_key` (same model, task, size, steps, ...):
prompts, seeds and input images are flattened in job order, one entry per image,
and the pipeline's images are split back per job afterwards.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from diffusiond.pipeline.job import Spec, seeds_for

StepHook = Callable[[int, int], None]
"""Called with (steps done, steps in all) after every denoising step."""


class Cancelled(Exception):
    """The job was asked to stop at a step boundary; nothing was written."""


@dataclass(frozen=True)
class Batch:
    specs: list[Spec]
    inputs: list[Image.Image | None]
    """Each job's input image (None for txt2img)."""

    @property
    def first(self) -> Spec:
        """The job whose batch-wide values (size, steps, guidance, ...) the call uses: all are equal."""
        return self.specs[0]

    def per_image(self, values: list[Any]) -> list[Any]:
        return [value for spec, value in zip(self.specs, values, strict=True) for _ in range(spec.count)]

    def prompts(self) -> list[str]:
        return self.per_image([s.prompt for s in self.specs])

    def negative_prompts(self) -> list[str]:
        return self.per_image([s.negative_prompt for s in self.specs])

    def images(self) -> list[Image.Image]:
        return self.per_image(self.inputs)

    def generators(self) -> list[torch.Generator]:
        """One CPU generator per image: a seed gives the same image on any device and in any batch."""
        return [torch.Generator("cpu").manual_seed(seed) for spec in self.specs for seed in seeds_for(spec)]

    def split(self, images: list[Image.Image]) -> list[list[Image.Image]]:
        out, start = [], 0
        for spec in self.specs:
            out.append(images[start : start + spec.count])
            start += spec.count
        return out


def step_callback(cancel: threading.Event | None, on_step: StepHook | None, total: int) -> Callable[..., dict]:
    """diffusers' `callback_on_step_end`: report the step, and stop between steps when asked."""

    def callback(pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        if on_step is not None:
            on_step(step + 1, total)
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"cancelled after step {step + 1} of {total}")
        return kwargs

    return callback
