"""Several jobs in one pipeline call, and the per-step hook that reports progress and cancels.

A batch holds jobs with equal `batch_key` (same model, task, size, steps, ...):
prompts, seeds and input images are flattened in job order, one entry per image,
and the pipeline's images are split back per job afterwards.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from PIL import Image

from diffusiond.pipeline.backend import Cancelled, StepHook
from diffusiond.pipeline.job import Spec, seeds_for

SpecT = TypeVar("SpecT")


@dataclass(frozen=True)
class Batch:
    """The jobs of one pipeline call, flattened one entry per image in job order (as the pipeline takes
    them), and split back per job afterwards. Every job has the same `batch_key`, so the call-wide
    values (size, steps, guidance, strength, ...) are the first job's."""

    specs: list[Spec]
    inputs: list[Image.Image | None]
    """Each job's input image (None for txt2img)."""
    masks: list[Image.Image | None] = field(default_factory=list)
    """Each job's mask (None: none); a masked job runs alone (`batch_key`)."""

    @property
    def first(self) -> Spec:
        """The job whose batch-wide values (size, steps, guidance, ...) the call uses: all are equal."""
        return self.specs[0]

    def first_as(self, kind: type[SpecT]) -> SpecT:
        """`first`, checked to be of the task a runner is for (a wrong runner is a bug, not a user error)."""
        spec = self.specs[0]
        if not isinstance(spec, kind):
            raise TypeError(f"a {spec.task} job reached the runner for {kind}")
        return spec

    def per_image(self, values: list[Any]) -> list[Any]:
        """One value per job, repeated for each of its images."""
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
        """The pipeline's images back per job, in job order."""
        out: list[list[Image.Image]] = []
        start = 0
        for spec in self.specs:
            out.append(images[start : start + spec.count])
            start += spec.count
        return out


def step_callback(
    cancel: threading.Event | None, on_step: StepHook | None, total: int
) -> Callable[..., dict[str, Any]]:
    """diffusers' `callback_on_step_end`: report the step, and stop between steps when asked."""

    def callback(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        steps = steps_run(pipe, total)
        if on_step is not None:
            on_step(min(step + 1, steps), steps)
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"cancelled after step {step + 1} of {steps}")
        return kwargs

    return callback


def steps_run(pipe: Any, asked: int) -> int:
    """How many times this call's loop runs the UNet: the n of "step k of n".

    Not always the steps asked for: PNDM adds one (its first PLMS step takes two), Heun and
    DPM++ SDE take about two per step, and img2img runs `steps * strength`. diffusers' pipelines
    record the loop's length as `num_timesteps` before the loop. The x4 upscaler does not; its
    legacy callback counts a step per `scheduler.order` calls over the whole of `scheduler.timesteps`.
    """
    recorded = getattr(pipe, "num_timesteps", None)
    if isinstance(recorded, int) and recorded > 0:
        return recorded
    scheduler = getattr(pipe, "scheduler", None)
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None or not len(timesteps):
        return asked
    return -(-len(timesteps) // int(getattr(scheduler, "order", 1) or 1))
