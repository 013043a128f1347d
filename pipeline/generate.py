"""Jobs in, images out: picks the task's pipeline, steps down on out-of-memory, translates failures.

`generate` takes one batch: a single job, or several jobs with equal
`batch_key` that share one pipeline call. Each job gets back its own images
and seeds, exactly as if it had run alone with the same seeds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from diffusiond.pipeline.batch import Batch, Cancelled, StepHook, step_callback
from diffusiond.pipeline.errors import Code, DiffusiondError, JobFailed
from diffusiond.pipeline.img2img import img2img
from diffusiond.pipeline.inputs import open_image
from diffusiond.pipeline.job import Job, UpscaleJob, seeds_for
from diffusiond.pipeline.models import Loaded, ModelCache, is_out_of_memory
from diffusiond.pipeline.txt2img import txt2img
from diffusiond.pipeline.upscale import upscale_lanczos, upscale_x4

__all__ = ["Cancelled", "Generated", "generate"]

TASK_RUNNERS: dict[str, Callable[[Loaded, Batch, Callable[..., dict]], list[Image.Image]]] = {
    "txt2img": txt2img,
    "img2img": img2img,
    "depth2img": img2img,
    "upscale": upscale_x4,
}


@dataclass(frozen=True)
class Generated:
    """The images of one job, in seed order, and how they were made."""

    images: list[Image.Image]
    seeds: list[int]
    scheduler: str
    """The scheduler name the job asked for, or the model's own scheduler class."""
    load_s: float
    generate_s: float
    model_hash: str | None = None
    memory: str | None = None
    """The memory level the images were made at (lower after an out-of-memory retry)."""
    batch_size: int = 1
    """How many jobs shared the pipeline call."""
    family: str | None = None
    pipeline: str | None = None
    """The diffusers pipeline class that made the images."""
    prediction: str | None = None
    """The scheduler's prediction type (`epsilon`, `v_prediction`)."""


def generate(
    cache: ModelCache,
    jobs: list[tuple[Job, Path | None]],
    *,
    cancel: threading.Event | None = None,
    on_step: StepHook | None = None,
) -> list[Generated]:
    """Run one batch; `jobs` pairs each job with its claimed input image, if its task has one."""
    first_job = jobs[0][0]
    spec = first_job.spec
    where = {"path": first_job.source, "job_index": first_job.index}
    inputs = [open_image(path, label=str(getattr(job.spec, "image", path))) if path else None for job, path in jobs]
    started = time.perf_counter()
    if isinstance(spec, UpscaleJob) and spec.method == "lanczos":
        images = upscale_lanczos(spec, _need(inputs[0]))
        return [Generated(images, [spec.seed or 0], "lanczos", 0.0, time.perf_counter() - started)]
    batch = Batch([job.spec for job, _ in jobs], inputs)
    total = int(spec.steps * spec.strength) if hasattr(spec, "strength") else spec.steps
    while True:
        try:
            loaded = cache.pipeline(spec.model, spec.task)
            loaded_at = time.perf_counter()
            images = TASK_RUNNERS[spec.task](loaded, batch, step_callback(cancel, on_step, total))
            break
        except Cancelled:
            raise
        except DiffusiondError as exc:  # e.g. the model failed to load: say which job needed it
            exc.path, exc.job_index = exc.path or first_job.source, exc.job_index or first_job.index
            raise
        except Exception as exc:
            if is_out_of_memory(exc) and cache.lower_memory(spec.model):
                continue  # same job, one memory level lower; the level is remembered for the model
            raise _translate(exc, spec.task, where) from exc
    done = time.perf_counter()
    scheduler = spec.scheduler or loaded.scheduler_config["_class_name"]
    level = cache.level(spec.model).name.lower()
    return [
        Generated(
            part,
            seeds_for(job_spec),
            scheduler,
            load_s=loaded_at - started,
            generate_s=done - loaded_at,
            model_hash=loaded.hash,
            memory=level,
            batch_size=len(jobs),
            family=str(loaded.kind),
            pipeline=type(loaded.pipe).__name__,
            prediction=loaded.scheduler_config.get("prediction_type"),
        )
        for job_spec, part in zip(batch.specs, batch.split(images), strict=True)
    ]


def _translate(exc: Exception, task: str, where: dict) -> JobFailed:
    if is_out_of_memory(exc):
        return JobFailed(
            f"{task} ran out of device memory at the lowest memory level: {exc}",
            code=Code.GENERATION_FAILED,
            fix="lower size or count, or set `memory: auto` (or low/minimal) in the config",
            **where,
        )
    if isinstance(exc, ImportError):  # e.g. a scheduler's optional package (scipy, torchsde) is missing
        return JobFailed(
            f"{task} needs a package that is not installed: {exc}",
            code=Code.GENERATION_FAILED,
            fix="install the missing package into the daemon's environment, or pick another scheduler",
            **where,
        )
    return JobFailed(
        f"{task} failed in the pipeline: {type(exc).__name__}: {exc}",
        code=Code.GENERATION_FAILED,
        fix="check the daemon's log; if the job asks for a large size or count, lower it",
        **where,
    )


def _need(image: Image.Image | None) -> Image.Image:
    if image is None:
        raise ValueError("this task needs an input image, and none was claimed with the job")
    return image
