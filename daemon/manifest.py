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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from diffusiond import __version__
from diffusiond.daemon.claim import Claim
from diffusiond.pipeline.backend import Generated
from diffusiond.pipeline.errors import DiffusiondError
from diffusiond.pipeline.hashing import file_sha256
from diffusiond.pipeline.job import Job
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
    """Every field of the job after defaults, as run (the seed filled in)."""
    task: str
    seeds: list[int]
    """One per image, in output order."""
    scheduler: str
    """The scheduler (sampler) class that ran."""
    claimed_at: str
    input_image: dict[str, str] | None
    """`file` (inbox-relative) and `sha256` of the input image, for img2img and upscale."""
    model: dict[str, Any] | None
    """name, path, hash, family, pipeline of the model (None for a model-free upscale)."""
    prediction: str | None
    device: str
    dtype: str
    memory: str | None
    batch_size: int
    """Images made in the same pipeline call as this job's."""
    timings: dict[str, float]
    """load_s, generate_s, stamp_s."""
    finished_at: str
    host: str
    claim_id: str
    """The claim the job ran in (its outbox reservation and work folder)."""
    attempt: int
    """Which run of the claim made it: 1, or more after stops and crashes."""
    instance: str
    """The daemon instance that made it."""
    outputs: list[OutputRecord]
    """Each image: file (in the outbox), sha256 of its bytes, seed, width, height, watermark."""

    def to_json(self) -> bytes:
        # A source name that is not UTF-8 (lone surrogates) is written as the JSON escape `\udcxx`.
        return json.dumps(dataclasses.asdict(self), indent=1, ensure_ascii=False).encode(errors="backslashreplace")


def build_manifest(job: Job, claim: Claim, generated: Generated, stamped: StampedJob) -> Manifest:
    record = job_record(job)
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
        seeds=list(generated.seeds),
        scheduler=generated.scheduler,
        claimed_at=time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(claim.claimed_at)),
        input_image={"file": job.image.name, "sha256": job.image.sha256} if job.image else None,
        model=generated.model.record() if generated.model else None,
        prediction=generated.prediction,
        device=generated.device,
        dtype=generated.dtype,
        memory=generated.memory,
        batch_size=generated.batch_size,
        timings={
            "load_s": round(generated.load_s, 4),
            "generate_s": round(generated.generate_s, 4),
            "stamp_s": round(stamped.stamp_s, 4),
        },
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        host=platform.node(),
        claim_id=claim.claim_id,
        attempt=claim.attempt,
        instance=claim.instance,
        outputs=stamped.outputs,
    )


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
