"""Text to image, as numbered steps."""

from __future__ import annotations

import torch
from PIL import Image

from diffusiond.pipeline.job import Txt2ImgJob, seeds_for
from diffusiond.pipeline.models import Loaded
from diffusiond.pipeline.schedulers import make_scheduler


def txt2img(loaded: Loaded, spec: Txt2ImgJob) -> list[Image.Image]:
    """All `count` images of the job in one pipeline call, each with its own seed."""
    # 1. A fresh scheduler for this job (the model's own, or the one the job names).
    pipe = loaded.pipe
    pipe.scheduler = make_scheduler(spec.scheduler, loaded.scheduler_config)
    # 2. One CPU generator per image: the same seed gives the same image on any device.
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds_for(spec)]
    # 3. Denoise and decode.
    width, height = spec.size
    result = pipe(
        prompt=[spec.prompt] * spec.count,
        negative_prompt=[spec.negative_prompt] * spec.count,
        width=width,
        height=height,
        num_inference_steps=spec.steps,
        guidance_scale=spec.guidance,
        generator=generators,
        output_type="pil",
    )
    return list(result.images)
