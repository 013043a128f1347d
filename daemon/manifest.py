"""What a manifest holds (R3): `outbox/<job_id>.json`, the record that a job is done.

The manifest is the commit record of a job: once `outbox/<job_id>.json` exists the job
is never run again, and it is never overwritten (daemon/outbox.py publishes it with a
link, which cannot replace). Tools downstream wait for it; every field is documented
here, in the order it is written.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from dataclasses import dataclass
from typing import Any

from diffusiond import __version__
from diffusiond.daemon.claim import Claim
from diffusiond.pipeline.backend import Generated
from diffusiond.pipeline.job import Job
from diffusiond.pipeline.provenance import OutputRecord, StampedJob, job_record


@dataclass(frozen=True)
class Manifest:
    """One job's results and how they were made."""

    diffusiond: str
    """The version that made them."""
    job_id: str
    """`<claim_id>` for a file with one job, `<claim_id>-<index>` otherwise; every output name starts with it."""
    source: str
    """The job file (or bare image) as it was named in the inbox, relative to it."""
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
        diffusiond=__version__,
        job_id=record["job_id"],
        source=record["source"],
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
