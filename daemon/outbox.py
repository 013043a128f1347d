"""Committing a job's results: every image atomically, then the manifest last.

A tool downstream that waits for `<job_id>.json` never sees half a job; images
are written under hidden temp names and renamed into place one by one.
"""

from __future__ import annotations

import glob
import hashlib
import json
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffusiond import __version__
from diffusiond.daemon.fsutil import atomic_write
from diffusiond.pipeline.backend import Generated
from diffusiond.pipeline.errors import Code, JobFailed, job_context
from diffusiond.pipeline.job import Job
from diffusiond.pipeline.metadata import SUFFIXES, MetadataOptions, infotext, sidecar_files
from diffusiond.pipeline.provenance import Marks, stamp

if TYPE_CHECKING:
    from diffusiond.pipeline.c2pa_sign import C2paConfig


def output_name(job: Job, number: int) -> str:
    return f"{job.job_id}-{number}{SUFFIXES[job.spec.output.format]}"


def manifest_path(outbox: Path, job: Job) -> Path:
    return outbox / f"{job.job_id}.json"


def discard_partial(outbox: Path, job: Job) -> None:
    """Remove what an interrupted run of this job left, so a re-run starts clean."""
    images = [output_name(job, n) for n in range(1, job.spec.count + 1)]
    sidecars = [f"{Path(name).stem}{suffix}" for name in images for suffix in (".txt", ".json")]
    names = [f"{job.job_id}.json", *images, *sidecars]
    for name in names[1:]:
        (outbox / name).unlink(missing_ok=True)
    for name in names:  # atomic_write's temp files: `.<name>.<pid>.tmp`
        for leftover in outbox.glob(f".{glob.escape(name)}.*.tmp"):
            leftover.unlink(missing_ok=True)


def commit(
    outbox: Path,
    job: Job,
    generated: Generated,
    *,
    context: dict[str, Any],
    marks: Marks,
    options: MetadataOptions,
    c2pa: C2paConfig | None = None,
) -> dict[str, Any]:
    """Stamp and write the images (and sidecars), then the manifest; returns the manifest.

    `context` holds what the daemon knows and the pipeline does not: input image
    and its hash, model path, device, claim time.
    """
    started = time.perf_counter()
    spec = job.spec
    record = {"job_id": job.job_id, "source": job.source, "index": job.index, "job": spec.model_dump(mode="json")}
    # 1. Stamp every image in memory first: a failure here leaves nothing in the outbox.
    files: list[tuple[str, bytes]] = []
    outputs = []
    with job_context(path=job.source, job_index=job.index):
        for number, (image, seed) in enumerate(zip(generated.images, generated.seeds, strict=True), start=1):
            parameters = infotext(
                spec,
                seed=seed,
                size=image.size,
                model_name=spec.model,
                sampler=generated.scheduler,
                model_hash=generated.model.hash if generated.model else None,
            )
            image_record = record | {"seed": seed}
            stamped = stamp(
                image,
                spec.output,
                marks,
                parameters=parameters,
                record=image_record,
                spec=spec,
                options=options,
                c2pa=c2pa,
            )
            name = output_name(job, number)
            files.append((name, stamped.data))
            files += sidecar_files(name, parameters=parameters, record=image_record, options=options)
            outputs.append(
                {
                    "file": name,
                    "sha256": hashlib.sha256(stamped.data).hexdigest(),
                    "seed": seed,
                    "width": image.width,
                    "height": image.height,
                    "watermark": stamped.watermark,
                }
            )
    manifest = {
        "diffusiond": __version__,
        **record,
        "task": spec.task,
        "seeds": generated.seeds,
        "scheduler": generated.scheduler,
        **context,
        "timings": {
            "load_s": round(generated.load_s, 4),
            "generate_s": round(generated.generate_s, 4),
            "stamp_s": round(time.perf_counter() - started, 4),
        },
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "outputs": outputs,
    }
    # 2. Write each file atomically, then the manifest last.
    try:
        outbox.mkdir(parents=True, exist_ok=True)
        for name, data in files:
            atomic_write(outbox / name, data)
        atomic_write(manifest_path(outbox, job), json.dumps(manifest, indent=1, ensure_ascii=False).encode())
    except OSError as exc:
        discard_partial(outbox, job)
        raise JobFailed(
            f"cannot write the results to {outbox}: {exc}",
            code=Code.OUTPUT_FAILED,
            path=job.source,
            job_index=job.index,
            fix="free disk space or fix the outbox's permissions; the job runs again when dropped again",
        ) from exc
    return manifest
