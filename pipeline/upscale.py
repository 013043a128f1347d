"""Upscaling: the prompt-guided x4 model, or plain Lanczos with no model."""

from __future__ import annotations

import torch
from PIL import Image

from diffusiond.pipeline.job import UpscaleJob, seeds_for
from diffusiond.pipeline.models import Loaded
from diffusiond.pipeline.schedulers import make_scheduler


def upscale_lanczos(spec: UpscaleJob, image: Image.Image) -> list[Image.Image]:
    """Resample by `scale`; no model, no seed dependence."""
    size = (round(image.width * spec.scale), round(image.height * spec.scale))
    return [image.resize(size, Image.Resampling.LANCZOS)]


def upscale_x4(loaded: Loaded, spec: UpscaleJob, image: Image.Image) -> list[Image.Image]:
    """Four times the input's width and height, guided by the prompt."""
    # 1. A fresh scheduler for this job.
    pipe = loaded.pipe
    pipe.scheduler = make_scheduler(spec.scheduler, loaded.scheduler_config)
    # 2. One CPU generator per image.
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds_for(spec)]
    # 3. Noise the low-res input to `noise_level`, denoise at 4x and decode.
    result = pipe(
        prompt=[spec.prompt] * spec.count,
        negative_prompt=[spec.negative_prompt] * spec.count,
        image=[image] * spec.count,
        num_inference_steps=spec.steps,
        guidance_scale=spec.guidance,
        noise_level=spec.noise_level,
        generator=generators,
        output_type="pil",
    )
    return list(result.images)
