"""One job in, images out: picks the task's pipeline and translates its failures."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from diffusiond.pipeline.errors import Code, DiffusiondError, JobFailed
from diffusiond.pipeline.img2img import img2img
from diffusiond.pipeline.inputs import open_image
from diffusiond.pipeline.job import Img2ImgJob, Job, Txt2ImgJob, UpscaleJob, seeds_for
from diffusiond.pipeline.models import ModelCache
from diffusiond.pipeline.txt2img import txt2img
from diffusiond.pipeline.upscale import upscale_lanczos, upscale_x4


@dataclass(frozen=True)
class Generated:
    """The images of one job, in seed order, and where the time went."""

    images: list[Image.Image]
    seeds: list[int]
    scheduler: str
    """The scheduler name the job asked for, or the model's own scheduler class."""
    load_s: float
    generate_s: float


def generate(cache: ModelCache, job: Job, image_path: Path | None) -> Generated:
    """Run one validated job; `image_path` is its claimed input image, if the task has one."""
    spec = job.spec
    where = {"path": job.source, "job_index": job.index}
    image = open_image(image_path, label=str(getattr(spec, "image", image_path))) if image_path else None
    started = time.perf_counter()
    try:
        loaded = None
        if spec.model is not None and not (isinstance(spec, UpscaleJob) and spec.method == "lanczos"):
            loaded = cache.pipeline(spec.model, spec.task)
        loaded_at = time.perf_counter()
        if isinstance(spec, Txt2ImgJob):
            images = txt2img(loaded, spec)
        elif isinstance(spec, Img2ImgJob):
            images = img2img(loaded, spec, _need(image))
        elif spec.method == "lanczos":
            images = upscale_lanczos(spec, _need(image))
        else:
            images = upscale_x4(loaded, spec, _need(image))
    except DiffusiondError as exc:
        exc.path, exc.job_index = exc.path or job.source, exc.job_index or job.index
        raise
    except ImportError as exc:  # e.g. a scheduler's optional package (scipy, torchsde) is missing
        raise JobFailed(
            f"{spec.task} needs a package that is not installed: {exc}",
            code=Code.GENERATION_FAILED,
            fix="install the missing package into the daemon's environment, or pick another scheduler",
            **where,
        ) from exc
    except (RuntimeError, ValueError, TypeError, OSError) as exc:
        raise JobFailed(
            f"{spec.task} failed in the pipeline: {type(exc).__name__}: {exc}",
            code=Code.GENERATION_FAILED,
            fix="check the daemon's log; if the job asks for a large size or count, lower it",
            **where,
        ) from exc
    done = time.perf_counter()
    seeds = seeds_for(spec) if not (isinstance(spec, UpscaleJob) and spec.method == "lanczos") else [spec.seed or 0]
    scheduler = spec.scheduler or (loaded.scheduler_config["_class_name"] if loaded else "none")
    return Generated(images, seeds, scheduler, load_s=loaded_at - started, generate_s=done - loaded_at)


def _need(image: Image.Image | None) -> Image.Image:
    if image is None:
        raise ValueError("this task needs an input image, and none was claimed with the job")
    return image
