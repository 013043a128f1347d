"""Inpainting (img2img with a mask), as numbered steps: only the mask's white part is redrawn.

An inpainting model (9-channel UNet) sees the mask and the masked image at every step; a normal
model runs as masked img2img (diffusers blends its latents with the input's outside the mask at
every step). Either way the result is laid over the input through the blurred mask at the end, as
A1111 does, so the pixels outside the mask are the input's own, not the VAE's copy of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from PIL import Image, ImageFilter, ImageOps

from diffusiond.pipeline.batch import Batch
from diffusiond.pipeline.errors import JobRejected
from diffusiond.pipeline.inputs import redraw_input
from diffusiond.pipeline.job import Img2ImgJob
from diffusiond.pipeline.models import Loaded
from diffusiond.pipeline.schedulers import make_scheduler


def prepare_mask(mask: Image.Image | None, size: tuple[int, int], spec: Img2ImgJob) -> Image.Image:
    """The mask at `size` by the job's resize mode (as its input), inverted if asked, its edge blurred.
    No mask (an inpainting model's job without one) is a mask of the whole image."""
    if mask is None:
        return Image.new("L", size, 255)
    # The mask has its input's size (checked at the claim): made the job's size the same way.
    gray = redraw_input(mask.convert("RGB"), spec).convert("L")
    if spec.invert_mask:
        gray = ImageOps.invert(gray)
    if spec.mask_blur:
        # A1111 blurs with OpenCV's GaussianBlur at sigma = mask_blur; Pillow's radius is that sigma.
        gray = gray.filter(ImageFilter.GaussianBlur(spec.mask_blur))
    return gray


def inpaint(
    loaded: Loaded, batch: Batch, callback: Callable[..., dict[str, Any]], extra: Mapping[str, Any]
) -> list[Image.Image]:
    """Every image of the batch in one call: one masked job (a mask is the job's own, so it runs alone),
    or an inpainting model's jobs without masks (whole-image masks), which may share a call."""
    spec = batch.first_as(Img2ImgJob)
    # 1. Each input at the size the job runs at, and its mask made the same way. One job gives the
    #    pipeline its one input and mask (it repeats them for each image, and crops by that mask).
    images = [redraw_input(source, spec) for source in batch.images()]
    masks = [
        prepare_mask(mask, image.size, spec) for mask, image in zip(batch.per_image(batch.masks), images, strict=True)
    ]
    if masks[0].getbbox() is None:
        raise JobRejected(
            f"the mask is all black{' after invert_mask' if spec.invert_mask else ''}: there is nothing to redraw",
            field="mask",
            value=spec.mask,
            fix="paint the part to redraw white in the mask (black is kept), or remove `invert_mask`",
        )
    single = len(batch.specs) == 1
    cropped = spec.inpaint_full_res and single  # whole-image masks (several jobs) have nothing to crop to
    # 2. A fresh scheduler for this call.
    # Copied from diffusiond.pipeline.txt2img.txt2img, step 1
    pipe = loaded.pipe
    pipe.scheduler = make_scheduler(spec.scheduler, loaded.scheduler_config)
    # 3. Noise the masked part to `strength` with each image's seed, denoise and decode. With
    #    `inpaint_full_res` only the mask's box (and its padding) is redrawn, at the job's size.
    width, height = images[0].size
    result = pipe(
        **extra,  # the texts or their embeddings (pipeline/prompts.py), and any ControlNets' arguments
        image=images[0] if single else images,
        mask_image=masks[0] if single else masks,
        width=width,
        height=height,
        strength=spec.strength,
        padding_mask_crop=spec.inpaint_full_res_padding if cropped else None,
        num_inference_steps=spec.steps,
        guidance_scale=spec.guidance,
        eta=spec.eta,
        generator=batch.generators(),
        callback_on_step_end=callback,
        output_type="pil",
    )
    # 4. The input laid back over the result outside the mask (with `padding_mask_crop` diffusers has
    #    already pasted the redrawn box into the input the same way).
    if cropped:
        return list(result.images)
    return [Image.composite(made, image, mask) for made, image, mask in zip(result.images, images, masks, strict=True)]
