"""Image to image (a sketch redrawn by the prompt), as numbered steps."""

from __future__ import annotations

import torch
from PIL import Image

from diffusiond.pipeline.inputs import fit_to_multiple_of_8
from diffusiond.pipeline.job import Img2ImgJob, seeds_for
from diffusiond.pipeline.models import Loaded
from diffusiond.pipeline.schedulers import make_scheduler


def img2img(loaded: Loaded, spec: Img2ImgJob, image: Image.Image) -> list[Image.Image]:
    """All `count` redraws of `image` in one pipeline call, each with its own seed."""
    # 1. The input at the job's size, or its own size cropped to multiples of 8.
    init_image = fit_to_multiple_of_8(image, spec.size)
    # 2. A fresh scheduler for this job.
    pipe = loaded.pipe
    pipe.scheduler = make_scheduler(spec.scheduler, loaded.scheduler_config)
    # 3. One CPU generator per image.
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds_for(spec)]
    # 4. Noise the input to `strength`, denoise and decode.
    result = pipe(
        prompt=[spec.prompt] * spec.count,
        negative_prompt=[spec.negative_prompt] * spec.count,
        image=[init_image] * spec.count,
        strength=spec.strength,
        num_inference_steps=spec.steps,
        guidance_scale=spec.guidance,
        generator=generators,
        output_type="pil",
    )
    return list(result.images)
