"""Text to image, as numbered steps."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from PIL import Image

from diffusiond.pipeline.batch import Batch
from diffusiond.pipeline.job import Txt2ImgJob
from diffusiond.pipeline.models import Loaded
from diffusiond.pipeline.schedulers import make_scheduler


def txt2img(
    loaded: Loaded, batch: Batch, callback: Callable[..., dict[str, Any]], prompts: Mapping[str, Any]
) -> list[Image.Image]:
    """Every image of the batch in one pipeline call, each with its own prompt and seed."""
    spec = batch.first_as(Txt2ImgJob)
    # 1. A fresh scheduler for this call (the model's own, or the one the jobs name).
    pipe = loaded.pipe
    pipe.scheduler = make_scheduler(spec.scheduler, loaded.scheduler_config)
    # 2. Denoise from one seeded noise per image, then decode.
    width, height = spec.size
    result = pipe(
        **prompts,  # the texts, or their embeddings (pipeline/prompts.py)
        width=width,
        height=height,
        num_inference_steps=spec.steps,
        guidance_scale=spec.guidance,
        eta=spec.eta,  # DDIM's; the other schedulers take none
        generator=batch.generators(),
        callback_on_step_end=callback,
        output_type="pil",
    )
    return list(result.images)
