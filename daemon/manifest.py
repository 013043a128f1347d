"""What the outbox's records hold (R3): `outbox/<job_id>.json`, the record that a job is done, and
(with `outbox_failures: true`) `outbox/<job_id>.failed.json`, the record that it failed.

The manifest is the commit record of a job: once `outbox/<job_id>.json` exists the job
is never run again, and it is never overwritten (daemon/outbox.py publishes it with a
link, which cannot replace). Tools downstream wait for it; every field is documented
here, in the order it is written.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from diffusiond import __version__
from diffusiond.daemon.claim import Claim
from diffusiond.pipeline.backend import EarlierStage, Generated
from diffusiond.pipeline.errors import DiffusiondError
from diffusiond.pipeline.hashing import file_sha256
from diffusiond.pipeline.job import InputImage, Job, RedrawJob, Spec, stage_record, stage_specs
from diffusiond.pipeline.provenance import OutputRecord, StampedJob, job_record

SCHEMA = 1
"""The records' format: a reader checks it; a change that breaks readers increments it."""


@dataclass(frozen=True)
class Manifest:
    """One job's results and how they were made."""

    schema: int
    """`SCHEMA`."""
    status: Literal["done"]
    """Always "done": a failure is a `FailureRecord` (`status: failed`), so a reader tells them apart by it."""
    diffusiond: str
    """The version that made them."""
    job_id: str
    """`<claim_id>` for a file with one job, `<claim_id>-<index>` otherwise; every output name starts with it."""
    source: str
    """The job file (or bare image) as it was named in the inbox, relative to it."""
    source_sha256: str | None
    """sha256 of the job file as claimed (None for a bare image: `input_image` has its hash)."""
    index: int
    """Which job of the file (1-based)."""
    job: dict[str, Any]
    """Every field of the job after defaults, as run (the seed filled in; each stage of `then:` resolved)."""
    task: str
    """The job's own task (a multi-stage job's first stage); `stages` has each stage's."""
    seeds: list[int]
    """One per image, in output order (a multi-stage job's: its first stage's, the images' original seeds)."""
    scheduler: str
    """The scheduler (sampler) class that ran (the first stage's)."""
    claimed_at: str
    input_image: dict[str, Any] | None
    """`file` (inbox-relative), `sha256`, `width` and `height` (upright) of the input image, and for a
    redraw `run_size`, what it was made for the pipeline (`job.resize` says how)."""
    model: dict[str, Any] | None
    """name, path, hash, family, pipeline of the model (None for a model-free upscale)."""
    prediction: str | None
    loras: list[dict[str, Any]]
    """The LoRAs the first stage ran with: `name`, `weight`, `file`, `sha256`, A1111's short `hash`."""
    embeddings: list[dict[str, Any]]
    """The textual-inversion embeddings its prompts named: `name`, `file`, `sha256`, short `hash`."""
    mask: dict[str, Any] | None
    """An inpainting job's mask: `file` (inbox-relative), `sha256`, `width`, `height` (the job's
    `mask_blur`, `invert_mask` and `inpaint_full_res` say how it was used); None without one."""
    controls: list[dict[str, Any]]
    """Each ControlNet, in the job's order: the `control:` entry's fields as run, the `image` it read
    (`file`, `sha256`) and its model (`name`, `file`, `sha256`, A1111's short `hash`)."""
    prompt_encoding: dict[str, Any] | None
    """How the prompts reached the text encoder (the first stage's): `method` (`text`, or `compel` for
    A1111 weights, BREAK or a prompt over 75 tokens), `tokens`, `windows` (77-token windows encoded),
    `weighted`, `truncated` (false: nothing is cut); None where no text encoder ran (Lanczos)."""
    device: str
    dtype: str
    memory: str | None
    batch_size: int
    """Images made in the same pipeline call as this job's."""
    timings: dict[str, float]
    """load_s, generate_s (every stage's together), stamp_s."""
    finished_at: str
    host: str
    claim_id: str
    """The claim the job ran in (its outbox reservation and work folder)."""
    attempt: int
    """Which run of the claim made it: 1, or more after stops and crashes."""
    instance: str
    """The daemon instance that made it."""
    stages: list[dict[str, Any]]
    """Each stage that ran, in order (one for a job without `then:`): `stage`, `task`, `job` (its
    fields as run), `seeds`, `scheduler`, `model`, `timings`, `attempt` and `finished_at` (a stage made
    before a crash keeps the run that made it), and `outputs` (`file`: None unless published, `sha256`,
    `seed`, `width`, `height`, and for a published one its `watermark`, as a final output's)."""
    outputs: list[OutputRecord]
    """Each final image: file (in the outbox), sha256 of its bytes, seed, width, height, watermark, and
    `chain`, the earlier stages' images it was made from (empty for a job without `then:`).

    `watermark` is `{visible, invisible}`: the label drawn (or None), and the invisible mark's
    `method`, `payload`, `embedded`, `verified` (in the file as written), `reason` (why not),
    `mark_id` (the tiled mark's id of this image, 8 hex digits: what `inspect` looks up for a
    stripped copy, and what the C2PA soft binding holds) and `fallback` (why dwtDctSvd marks it
    when tiled was asked for)."""

    def to_json(self) -> bytes:
        # A source name that is not UTF-8 (lone surrogates) is written as the JSON escape `\udcxx`.
        return json.dumps(dataclasses.asdict(self), indent=1, ensure_ascii=False).encode(errors="backslashreplace")


def build_manifest(
    job: Job, claim: Claim, generated: Generated, stamped: StampedJob, earlier: Sequence[EarlierStage] = ()
) -> Manifest:
    """`generated` is the job's last stage, `earlier` the stages before it (a job with `then:`)."""
    record = job_record(job)
    first = earlier[0].generated if earlier else generated
    made = [*(e.generated for e in earlier), generated]
    finished_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    stages = [_stage(e.number, e.spec, e.generated, e.attempt, e.finished_at, _kept(e, stamped)) for e in earlier]
    last = stage_specs(job.spec)[len(earlier)]
    finals = [
        _image(o.file, o.sha256, s, (o.width, o.height)) for o, s in zip(stamped.outputs, generated.seeds, strict=True)
    ]
    stages.append(_stage(len(earlier) + 1, last, generated, claim.attempt, finished_at, finals))
    return Manifest(
        schema=SCHEMA,
        status="done",
        diffusiond=__version__,
        job_id=record["job_id"],
        source=record["source"],
        source_sha256=source_sha256(claim),
        index=record["index"],
        job=record["job"],
        task=str(job.spec.task),
        seeds=list(first.seeds),
        scheduler=first.scheduler,
        claimed_at=time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(claim.claimed_at)),
        input_image=_input_image(job),
        model=first.model.record() if first.model else None,
        prediction=first.prediction,
        loras=list(first.loras or []),
        embeddings=list(first.embeddings or []),
        mask=_file_record(job.mask),
        controls=_controls(job, first),
        prompt_encoding=first.prompt_encoding,
        device=generated.device,
        dtype=generated.dtype,
        memory=first.memory,
        batch_size=first.batch_size,
        timings={
            "load_s": round(sum(g.load_s for g in made), 4),
            "generate_s": round(sum(g.generate_s for g in made), 4),
            "stamp_s": round(stamped.stamp_s, 4),
        },
        finished_at=finished_at,
        host=platform.node(),
        claim_id=claim.claim_id,
        attempt=claim.attempt,
        instance=claim.instance,
        stages=stages,
        outputs=stamped.outputs,
    )


def _input_image(job: Job) -> dict[str, Any] | None:
    if job.image is None:
        return None
    record: dict[str, Any] = {"file": job.image.name, "sha256": job.image.sha256}
    record |= {"width": job.image.size_px[0], "height": job.image.size_px[1]}
    if isinstance(job.spec, RedrawJob):
        record["run_size"] = list(job.spec.run_size(job.image.size_px))
    return record


def _file_record(image: InputImage | None) -> dict[str, Any] | None:
    if image is None:
        return None
    return {"file": image.name, "sha256": image.sha256, "width": image.size_px[0], "height": image.size_px[1]}


def _controls(job: Job, generated: Generated) -> list[dict[str, Any]]:
    models: list[dict[str, Any] | None] = [*(generated.controls or [])]
    models += [None] * (len(job.spec.control) - len(models))  # the stand-in loads no ControlNet
    return [
        use.model_dump(mode="json") | {"image": _file_record(image), "controlnet": model}
        for use, image, model in zip(job.spec.control, job.controls, models, strict=True)
    ]


def _stage(
    number: int, spec: Spec, generated: Generated, attempt: int, finished_at: str, images: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "stage": number,
        "task": str(spec.task),
        "job": stage_record(spec),
        "seeds": list(generated.seeds),
        "scheduler": generated.scheduler,
        "model": generated.model.record() if generated.model else None,
        "loras": list(generated.loras or []),
        "embeddings": list(generated.embeddings or []),
        "prompt_encoding": generated.prompt_encoding,
        "memory": generated.memory,
        "batch_size": generated.batch_size,
        "timings": {"load_s": round(generated.load_s, 4), "generate_s": round(generated.generate_s, 4)},
        "attempt": attempt,
        "finished_at": finished_at,
        "outputs": images,
    }


def _image(file: str | None, sha256: str, seed: int, size: tuple[int, int]) -> dict[str, Any]:
    return {"file": file, "sha256": sha256, "seed": seed, "width": size[0], "height": size[1]}


def _kept(stage: EarlierStage, stamped: StampedJob) -> list[dict[str, Any]]:
    """An earlier stage's images: the published file where `keep: all` published it, else none."""
    kept = stamped.kept.get(stage.number)
    if not kept:
        return [_image(None, stage.sha256[i], seed, stage.sizes[i]) for i, seed in enumerate(stage.generated.seeds)]
    # A published earlier image carries its own marks (its own tiled mark id): recorded as an output's are.
    return [
        _image(kept[i].file, kept[i].sha256, seed, stage.sizes[i]) | {"watermark": kept[i].watermark}
        for i, seed in enumerate(stage.generated.seeds)
    ]


@dataclass(frozen=True)
class FailureRecord:
    """`outbox/<job_id>.failed.json` (opt-in, `outbox_failures: true`): a job that failed, or a file rejected.

    Written last, after the inputs and the report are in failed/: a tool that watches the outbox for
    `<job_id>.json` or `<job_id>.failed.json` learns the end of every job there. A file rejected before
    it had jobs is recorded under its claim id (which is its single job's id).
    """

    schema: int
    status: Literal["failed"]
    diffusiond: str
    job_id: str
    source: str
    source_sha256: str | None
    index: int | None
    """Which job of the file failed (None: the file as a whole was rejected)."""
    stage: int | None
    """Which stage of a multi-stage job failed (None for a job without `then:`, or the file as a whole)."""
    code: str
    """As in the report: `invalid_job`, `model_failed`, `crashed`, ... (pipeline/errors.py, `Code`)."""
    error: str
    field: str | None
    value: Any
    fix: str
    inputs: list[str]
    """Where the inputs are now, relative to the spool (`failed/<name>`)."""
    report: str
    """The report, relative to the spool (`failed/<name>.error.yaml`)."""
    finished_jobs: list[str]
    """Jobs of the same file that were done before it failed (their manifests are in the outbox)."""
    failed_at: str
    host: str
    claim_id: str
    attempt: int
    instance: str

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), indent=1, ensure_ascii=False).encode(errors="backslashreplace")


def build_failure(
    claim: Claim,
    job_id: str,
    error: DiffusiondError,
    *,
    inputs: list[str],
    report: str,
    done: tuple[str, ...],
    sha256: str | None,
) -> FailureRecord:
    return FailureRecord(
        schema=SCHEMA,
        status="failed",
        diffusiond=__version__,
        job_id=job_id,
        source=claim.source,
        source_sha256=sha256,
        index=error.job_index,
        stage=error.stage,
        code=str(error.code),
        error=error.message,
        field=error.field,
        value=error.value if _is_json(error.value) else repr(error.value),
        fix=error.fix,
        inputs=inputs,
        report=report,
        finished_jobs=list(done),
        failed_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        host=platform.node(),
        claim_id=claim.claim_id,
        attempt=claim.attempt,
        instance=claim.instance,
    )


def source_sha256(claim: Claim, path: Path | None = None) -> str | None:
    """The claimed job file's sha256 (read from the claim folder, or `path`); None for a bare image or a file gone."""
    if claim.bare_image:
        return None
    path = path or claim.inputs / claim.source
    try:
        found = os.stat(path)
    except OSError:
        return None
    return _hashed(path, (found.st_ino, found.st_size, found.st_mtime_ns))


@functools.lru_cache(maxsize=16)
def _hashed(path: Path, stamp: tuple[int, int, int]) -> str | None:
    """Once per file version: every job of a file of many jobs asks for the same hash."""
    try:
        return file_sha256(path)
    except OSError:
        return None


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
