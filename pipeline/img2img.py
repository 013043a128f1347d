"""Image to image (a sketch redrawn by the prompt), and depth to image, as numbered steps."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from PIL import Image

from diffusiond.pipeline.batch import Batch
from diffusiond.pipeline.inputs import redraw_input
from diffusiond.pipeline.job import RedrawJob
from diffusiond.pipeline.models import Loaded
from diffusiond.pipeline.schedulers import make_scheduler


def img2img(
    loaded: Loaded, batch: Batch, callback: Callable[..., dict[str, Any]], prompts: Mapping[str, Any]
) -> list[Image.Image]:
    """Every redraw of the batch in one call. The depth model takes the same call (it estimates depth itself)."""
    spec = batch.first_as(RedrawJob)
    # 1. Each input at the size the job runs at: its `size` by its `resize` mode, or the input's own
    #    size cropped to multiples of 8.
    images = [redraw_input(image, spec) for image in batch.images()]
    # 2. A fresh scheduler for this call.
    # Copied from diffusiond.pipeline.txt2img.txt2img, step 1
    pipe = loaded.pipe
    pipe.scheduler = make_scheduler(spec.scheduler, loaded.scheduler_config)
    # 3. Noise each input to `strength` with its own seed, denoise and decode.
    result = pipe(
        **prompts,  # the texts, or their embeddings (pipeline/prompts.py)
        image=images,
        strength=spec.strength,
        num_inference_steps=spec.steps,
        guidance_scale=spec.guidance,
        eta=spec.eta,  # DDIM's; the other schedulers take none
        generator=batch.generators(),
        callback_on_step_end=callback,
        output_type="pil",
    )
    return list(result.images)
