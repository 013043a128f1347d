"""Upscaling: the prompt-guided x4 model, or plain Lanczos with no model."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from PIL import Image

from diffusiond.pipeline.batch import Batch
from diffusiond.pipeline.job import UpscaleJob
from diffusiond.pipeline.models import Loaded
from diffusiond.pipeline.schedulers import make_scheduler


def upscale_lanczos(spec: UpscaleJob, image: Image.Image) -> list[Image.Image]:
    """Resample by `scale`; no model, no seed dependence."""
    size = (round(image.width * spec.scale), round(image.height * spec.scale))
    return [image.resize(size, Image.Resampling.LANCZOS)]


def upscale_x4(
    loaded: Loaded, batch: Batch, callback: Callable[..., dict[str, Any]], prompts: Mapping[str, Any]
) -> list[Image.Image]:
    """Four times each input's width and height, guided by the prompt, in one call."""
    spec = batch.first_as(UpscaleJob)
    # 1. A fresh scheduler for this call.
    # Copied from diffusiond.pipeline.txt2img.txt2img, step 1
    pipe = loaded.pipe
    pipe.scheduler = make_scheduler(spec.scheduler, loaded.scheduler_config)
    # 2. Noise each low-res input to `noise_level`, denoise at 4x and decode.
    result = pipe(
        **prompts,  # the texts, or their embeddings (pipeline/prompts.py)
        image=batch.images(),
        num_inference_steps=spec.steps,
        guidance_scale=spec.guidance,
        eta=spec.eta,  # DDIM's; the other schedulers take none
        noise_level=spec.noise_level,
        generator=batch.generators(),
        # This pipeline still has the older per-step hook: (step, timestep, latents).
        callback=lambda step, timestep, latents: callback(pipe, step, timestep, {}),
        callback_steps=1,
        output_type="pil",
    )
    return list(result.images)
