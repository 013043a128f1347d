"""The real generator: jobs in, images out, on warm diffusers pipelines.

`DiffusersGenerator.generate` takes one batch: a single job, or several jobs with equal
`batch_key` that share one pipeline call. Each job gets back its own images and seeds,
exactly as if it had run alone with the same seeds. It picks the task's runner, steps
down one memory level on out-of-memory and tries again, and translates what the pipeline
raises into `JobFailed`.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from PIL import Image

from diffusiond.pipeline.backend import Cancelled, ExtraNetworks, Generated, ModelInfo, StepHook
from diffusiond.pipeline.batch import Batch, step_callback
from diffusiond.pipeline.controls import call_arguments
from diffusiond.pipeline.embeddings import named
from diffusiond.pipeline.errors import Code, DiffusiondError, JobFailed, job_context
from diffusiond.pipeline.families import ModelEntry
from diffusiond.pipeline.img2img import img2img
from diffusiond.pipeline.inpaint import inpaint
from diffusiond.pipeline.inputs import open_image
from diffusiond.pipeline.job import Job, Task, UpscaleJob, seeds_for
from diffusiond.pipeline.models import Loaded, ModelCache, is_out_of_memory
from diffusiond.pipeline.prompts import encode
from diffusiond.pipeline.txt2img import txt2img
from diffusiond.pipeline.upscale import upscale_lanczos, upscale_x4

__all__ = ["Cancelled", "DiffusersGenerator", "Generated"]

Runner = Callable[[Loaded, Batch, Callable[..., dict[str, Any]], Mapping[str, Any]], list[Image.Image]]
TASK_RUNNERS: dict[Task, Runner] = {
    Task.TXT2IMG: txt2img,
    Task.IMG2IMG: img2img,
    Task.DEPTH2IMG: img2img,
    Task.UPSCALE: upscale_x4,
}
"""How each task's batch is run on its pipeline (which pipeline: `models.PIPELINES`), given the call's
prompt arguments (`prompts.encode`: the texts, or compel's embeddings of A1111 syntax)."""


class DiffusersGenerator:
    """The `Generator` the daemon runs by default: a `ModelCache` and the task runners."""

    def __init__(self, cache: ModelCache) -> None:
        self.cache = cache

    @property
    def device(self) -> str:
        return self.cache.device

    def preload(self, name: str) -> None:
        self.cache.preload([name])

    def reconfigure(
        self,
        entries: Mapping[str, ModelEntry],
        *,
        memory: str,
        max_loaded: int,
        networks: ExtraNetworks | None = None,
    ) -> None:
        self.cache.update(entries, memory=memory, max_loaded=max_loaded, networks=networks)

    def loaded(self) -> list[str]:
        return self.cache.loaded()

    def generate(
        self,
        jobs: Sequence[Job],
        *,
        cancel: threading.Event | None = None,
        on_step: StepHook | None = None,
    ) -> list[Generated]:
        first = jobs[0]
        with job_context(path=first.source, job_index=first.index):  # e.g. the model failed: say which job needed it
            return self._generate(jobs, cancel, on_step)

    def _generate(
        self, jobs: Sequence[Job], cancel: threading.Event | None, on_step: StepHook | None
    ) -> list[Generated]:
        spec = jobs[0].spec
        cache = self.cache
        dtype = str(cache.dtype).removeprefix("torch.")
        inputs = [_input(job) for job in jobs]
        started = time.perf_counter()
        if isinstance(spec, UpscaleJob) and not spec.uses_model:
            images = upscale_lanczos(spec, _need(inputs[0]))
            took = time.perf_counter() - started
            return [
                Generated(images, [spec.seed or 0], "lanczos", 0.0, took, cache.device, dtype, _unused(cache, spec))
            ]
        name = _need_model(spec.model)
        batch = Batch([job.spec for job in jobs], inputs, [_input(job, "mask") for job in jobs])
        controls = [use.model for use in spec.control]
        while True:
            try:
                masked = batch.masks[0] is not None
                loaded = cache.variant(name, spec.task, masked=masked, controls=controls)
                loaded_at = time.perf_counter()
                callback = step_callback(cancel, on_step, spec.denoise_steps())
                loras = cache.use_loras(name, loaded.pipe, spec.loras)  # before encoding: they change the text encoder
                embeddings = cache.use_embeddings(name, loaded.pipe, [*batch.prompts(), *batch.negative_prompts()])
                encoded = encode(loaded.pipe, batch.prompts(), batch.negative_prompts(), clip_skip=spec.clip_skip)
                extra = dict(encoded.kwargs) | _control_arguments(jobs[0])  # a controlled job runs alone
                runner = inpaint if loaded.masked else TASK_RUNNERS[spec.task]
                images = runner(loaded, batch, callback, extra)
                break
            except (Cancelled, DiffusiondError):  # a model that did not load says so itself
                raise
            except Exception as exc:
                if is_out_of_memory(exc) and cache.lower_memory(name):
                    continue  # same job, one memory level lower; the level is remembered for the model
                raise _translate(exc, spec.task) from exc
        done = time.perf_counter()
        model = ModelInfo(
            name, loaded.path, loaded.hash, str(loaded.kind), type(loaded.pipe).__name__, loaded.vae, loaded.vae_hash
        )
        first_images = itertools.accumulate((s.count for s in batch.specs[:-1]), initial=0)
        return [
            Generated(
                part,
                seeds_for(job_spec),
                spec.scheduler or loaded.scheduler_config["_class_name"],
                load_s=loaded_at - started,
                generate_s=done - loaded_at,
                device=cache.device,
                dtype=dtype,
                model=model,
                memory=cache.level(name).name.lower(),
                batch_size=len(jobs),
                prediction=loaded.scheduler_config.get("prediction_type"),
                prompt_encoding=encoded.encodings[first].record(),
                loras=loras,
                embeddings=_named(job_spec, embeddings),
                controls=list(loaded.controls) or None,
            )
            for job_spec, part, first in zip(batch.specs, batch.split(images), first_images, strict=True)
        ]


def _named(spec: Any, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The call's embeddings that this job's own prompts name (a batch shares one call)."""
    names = named([spec.prompt, spec.negative_prompt], [r["name"] for r in records])
    return [r for r in records if r["name"] in names]


def _unused(cache: ModelCache, spec: UpscaleJob) -> ModelInfo | None:
    """A Lanczos upscale uses no model; the manifest still names the job's `model:` if the config has it."""
    entry = cache.entries.get(spec.model) if spec.model else None
    return ModelInfo(entry.name, str(entry.path)) if entry is not None else None


def _input(job: Job, which: str = "image") -> Image.Image | None:
    """The job's input pixels (or its mask's); an error names this job, not the batch's first."""
    image = job.image if which == "image" else job.mask
    if image is None:
        return None
    with job_context(path=job.source, job_index=job.index):
        return open_image(image, field=which)


def _control_arguments(job: Job) -> dict[str, Any]:
    """The ControlNet pipeline's arguments for the job's controls (none: none)."""
    if not job.spec.control:
        return {}
    with job_context(path=job.source, job_index=job.index):
        images = [open_image(image, field=f"control.{number}.image") for number, image in enumerate(job.controls)]
    return call_arguments(job.spec.task, job.spec.control, images, job.spec.run_size(job.input_size))


def _translate(exc: Exception, task: Task) -> JobFailed:
    if is_out_of_memory(exc):
        return JobFailed(
            f"{task} ran out of device memory at the lowest memory level: {exc}",
            code=Code.GENERATION_FAILED,
            fix="lower size or count, or set `memory: auto` (or low/minimal) in the config",
        )
    if isinstance(exc, ImportError):  # e.g. a scheduler's optional package (scipy, torchsde) is missing
        return JobFailed(
            f"{task} needs a package that is not installed: {exc}",
            code=Code.GENERATION_FAILED,
            fix="install the missing package into the daemon's environment, or pick another scheduler",
        )
    return JobFailed(
        f"{task} failed in the pipeline: {type(exc).__name__}: {exc}",
        code=Code.GENERATION_FAILED,
        fix="check the daemon's log; if the job asks for a large size or count, lower it",
    )


def _need(image: Image.Image | None) -> Image.Image:
    if image is None:
        raise ValueError("this task needs an input image, and none was claimed with the job")
    return image


def _need_model(name: str | None) -> str:
    if name is None:  # validation refuses a model task without a model; a job built by hand may not be
        raise JobFailed("no model given", code=Code.MODEL_FAILED, field="model", fix="add `model:` to the job")
    return name
