"""Claiming: rename the files of an intent out of the inbox, then turn them into jobs.

The rename of the first file (the job file, or the bare image) is the claim: it
succeeds for exactly one daemon, whichever shares the folder. A claim folder
`work/<instance>/<claim_id>/` holds `claim.json`, the claimed files under
`inbox/` (same relative paths as in the inbox) and, once validated, `jobs.json`
with the seeds fixed, so a job re-run after a crash makes the same images.

`jobs.json` is written atomically but not fsynced (two fewer disk flushes per
job): a killed daemon finds it whole; only a power cut can leave it missing or
torn, and then the claimed job file is validated again, which only re-draws the
random seeds of images not made yet.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from diffusiond.daemon.config import Config
from diffusiond.daemon.fsutil import atomic_write
from diffusiond.daemon.pairing import Intent, Parsed, file_stamp, job_file_reader, profile_of, resolve_image
from diffusiond.pipeline.errors import Code, DiffusiondError, JobRejected, job_context
from diffusiond.pipeline.inputs import probe_image
from diffusiond.pipeline.job import InputImage, Job, Spec, fill_seed, spec_from_dict, validate_job

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claim:
    """Files one daemon took out of the inbox together, and where they are now (`claim.json`, minus `jobs`).

    A claim is a job file with its images, or a bare image; its jobs run in `work/<instance>/<claim_id>/`
    and it ends with every input in archive/, failed/ or back in the inbox (daemon/lifecycle.py).
    """

    claim_id: str
    folder: Path
    source: str
    files: tuple[str, ...]
    bare_image: bool = False
    problem: dict[str, Any] | None = None
    claimed_at: float = 0.0
    resumed: bool = False
    """Found in work/ at start: its jobs may have left partial outputs to clean first."""
    jobs: tuple[Job, ...] | None = field(default=None, compare=False, repr=False)
    """What `load_jobs` returned when the service validated the claim, so the worker does not read
    `jobs.json` back; None for a claim found in work/ (the worker loads it)."""

    @property
    def inputs(self) -> Path:
        return self.folder / "inbox"

    def present(self) -> list[str]:
        """The claimed files that are really in the claim folder (a race may have lost some).

        Whatever they are: a pipe named `job.yaml` goes to failed/ like any other input.
        """
        return [f for f in self.files if os.path.lexists(self.inputs / f)]

    def save(self) -> None:
        record = asdict(self) | {"folder": None, "resumed": False}
        del record["jobs"]
        atomic_write(self.folder / "claim.json", json.dumps(record, indent=1).encode())

    @classmethod
    def load(cls, folder: Path) -> Claim:
        record = json.loads((folder / "claim.json").read_text(encoding="utf-8"))
        record["folder"] = folder
        record["files"] = tuple(record["files"])
        return cls(**record)


def new_claim_id(source: str) -> str:
    """`<stem>-<YYYYmmdd-HHMMSS>-<4 hex>`: readable, sortable, and unique across daemons."""
    stem = Path(source).stem
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def claim(intent: Intent, *, inbox: Path, work: Path) -> Claim | None:
    """Move the intent's files into a new claim folder; None if another daemon was first."""
    folder = work / new_claim_id(intent.source)
    folder.mkdir(parents=True)
    (folder / "inbox").mkdir()
    found = Claim(
        folder.name,
        folder,
        intent.source,
        intent.files,
        bare_image=intent.bare_image,
        problem=intent.problem,
        claimed_at=time.time(),
    )
    found.save()  # the intent first: a crash right after the rename still finds the record
    for index, relative in enumerate(intent.files):
        dest = found.inputs / relative
        if "/" in relative:  # a hot folder's file
            dest.parent.mkdir(exist_ok=True)
        try:
            if (inbox / relative).is_symlink():
                raise FileNotFoundError(relative)  # never follow a link out of the inbox
            os.rename(inbox / relative, dest)
        except FileNotFoundError:
            if index == 0:
                shutil.rmtree(folder)
                return None
    return found


def load_jobs(claim: Claim, config: Config, parsed: Parsed | None = None) -> list[Job]:
    """The claim's jobs, validated, with seeds fixed and each input image probed.

    Validates from the claimed copy (the one that will run), or takes `parsed` (the
    pairing's validation of the job file) when the claimed copy has its stamp; checks
    every input image decodes and fits the limits, and saves `jobs.json`; a claim
    re-run after a crash reads that file back instead.
    """
    saved = claim.folder / "jobs.json"
    if saved.exists():
        try:
            return [_job_from_record(claim, config, record) for record in json.loads(saved.read_text("utf-8"))]
        except (ValueError, KeyError, TypeError, ValidationError) as exc:  # torn by a power cut
            log.warning("%s of %s is unreadable (%s); validating the claimed file again", saved, claim.source, exc)
    if claim.problem is not None:
        raise DiffusiondError.from_report(claim.problem)
    specs = _validate(claim, config, parsed)

    def exists(relative: str) -> bool:
        return os.path.lexists(claim.inputs / relative)

    jobs: list[Job] = []
    for index, spec in enumerate(specs, start=1):
        image = None
        if spec.task.takes_image:
            image = _precheck_image(claim, config, spec, index, resolve_image(spec, claim.source, exists))
        job_id = claim.claim_id if len(specs) == 1 else f"{claim.claim_id}-{index}"
        jobs.append(Job(job_id, claim.source, index, fill_seed(spec), image))
    # `image` stays the inbox-relative name, as before the probe was kept: a daemon of the previous
    # version that resumes this claim reads the record as it always did.
    records = [
        {
            "job_id": job.job_id,
            "index": job.index,
            "image": job.image.name if job.image else None,
            "probe": job.image.probe_record() if job.image else None,
            "spec": job.spec.model_dump(mode="json"),
        }
        for job in jobs
    ]
    atomic_write(saved, json.dumps(records, indent=1).encode(), durable=False)
    return jobs


def _job_from_record(claim: Claim, config: Config, record: dict[str, Any]) -> Job:
    spec = spec_from_dict(record["spec"])
    image, probe = record["image"], record.get("probe")
    found: InputImage | None = None
    if image is not None and probe is not None:
        found = InputImage.from_record(str(image), probe, folder=claim.inputs)
    elif image is not None:  # written before jobs.json kept the probe: probe the file now
        found = _precheck_image(claim, config, spec, record["index"], image)
    return Job(record["job_id"], claim.source, record["index"], spec, found)


def _validate(claim: Claim, config: Config, parsed: Parsed | None) -> list[Spec]:
    """Parse the job file (or build the bare image's profile job) against the config."""
    if parsed is not None and not claim.bare_image and parsed.stamp == file_stamp(claim.inputs / claim.source):
        return parsed.result()  # the same file, renamed: same size, time and inode
    rules = config.rules()
    profile_name = profile_of(claim.source)
    if claim.bare_image:
        template = config.profiles.get(profile_name) if profile_name else config.sketch_job
        name = Path(claim.source).name
        return [validate_job(dict(template or {}) | {"image": name}, path=claim.source, index=1, rules=rules)]
    return job_file_reader(claim.inputs, rules=rules, profiles=config.profiles)(claim.source)


def _precheck_image(claim: Claim, config: Config, spec: Spec, index: int, image: str | None) -> InputImage:
    """The input exists, is a real image, and the result stays within the pixel limit."""
    with job_context(path=claim.source, job_index=index):
        if image is None or not os.path.lexists(claim.inputs / image):
            raise JobRejected(
                f"the input image {spec.input_image or image or '(same-stem image)'!r} is not in the inbox",
                code=Code.MISSING_INPUT,
                field="image",
                value=spec.input_image,
                fix="drop the image into the inbox with its job file (same folder, same name as in `image:`)",
            )
        probe = probe_image(claim.inputs / image, label=image, max_file_bytes=config.limits.max_file_bytes)
        width, height = spec.output_size(probe.size_px)
        if width * height > config.limits.max_pixels:
            raise JobRejected(
                f"the result would be {width}x{height} ({width * height} pixels), over the limit of "
                f"{config.limits.max_pixels}",
                code=Code.OVER_LIMIT,
                field="image",
                value=image,
                fix="use a smaller input image or scale, or raise limits.max_pixels in the config",
            )
    return probe
