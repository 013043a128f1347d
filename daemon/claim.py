"""Claiming: rename the files of an intent out of the inbox, then turn them into jobs.

The rename of the first file (the job file, or the bare image) is the claim: it
succeeds for exactly one daemon, whichever shares the folder. The rename cannot
replace anything: its destination is in a claim folder this call has just made
with `mkdir` (which fails when the name exists) under a claim id reserved in the
outbox with `O_EXCL`. A claim folder `work/<instance>/<claim_id>/` (renamed to
`<claim_id>~N` each time it is resumed: see daemon/lifecycle.py) holds
`claim.json`, the claimed files under `inbox/` (same relative paths as in the
inbox), once validated `jobs.json` with the seeds fixed, so a job re-run after a
crash makes the same images, `stage/` for outputs not yet published, and
`trail.log`, the claim's own log lines (a crashed claim's report quotes its tail).

`jobs.json` is written atomically but not fsynced (two fewer disk flushes per
job): a killed daemon finds it whole; only a power cut can leave it missing or
torn, and then the claimed job file is validated again, which only re-draws the
random seeds of images not made yet.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import posixpath
import re
import secrets
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from diffusiond.daemon.config import Config
from diffusiond.daemon.faults import fault_point
from diffusiond.daemon.fsutil import NO_LINKS, atomic_write, fsync_dir, rename_checked
from diffusiond.daemon.pairing import Intent, Parsed, file_stamp, job_file_reader, profile_of, resolve_inputs
from diffusiond.pipeline.errors import Code, DiffusiondError, JobRejected, job_context
from diffusiond.pipeline.hashing import model_hash
from diffusiond.pipeline.inputs import probe_image
from diffusiond.pipeline.job import (
    Img2ImgJob,
    InputImage,
    Job,
    RedrawJob,
    Spec,
    check_stage_sizes,
    fill_seed,
    fit_pixels,
    spec_from_dict,
    validate_job,
)
from diffusiond.pipeline.reproduce import job_from_image

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
    instance: str = ""
    """The daemon instance whose work folder holds it."""
    attempt: int = 0
    """How many times a run of it has started (each manifest records its attempt)."""
    running: bool = False
    """A run started and has not stopped in order: found so at start, the last run crashed."""
    crashes: int = 0
    """Runs that ended in a crash; at `limits.max_crashes` the claim fails with code `crashed`."""
    takeovers: int = 0
    """Times another daemon took it over from a daemon whose lease ran out (daemon/lease.py); at
    `limits.max_takeovers` it fails with code `node_lost`."""
    resumed: bool = False
    """Found in work/ at start: some of its jobs may be published or staged already."""
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

    def save(self, *, durable: bool = True) -> None:
        """Write claim.json. In a fenced folder: FileNotFoundError.

        Durable when it records what the claim holds (at the claim); `durable=False` for the run
        counters (`running`, `attempt`), which a power cut may lose at no cost but a crash not counted.
        """
        record = asdict(self) | {"folder": None, "resumed": False}
        del record["jobs"]
        path = self.folder / "claim.json"
        with contextlib.suppress(OSError, ValueError):  # an ending recorded on disk stays (lifecycle.end_claim)
            if ending := json.loads(path.read_text(encoding="utf-8")).get("ending"):
                record["ending"] = ending
        atomic_write(path, json.dumps(record, indent=1).encode(), durable=durable)

    @classmethod
    def load(cls, folder: Path) -> Claim:
        record = json.loads((folder / "claim.json").read_text(encoding="utf-8"))
        known = {f.name for f in fields(cls)}
        record = {k: v for k, v in record.items() if k in known} | {"folder": folder}
        record["files"] = tuple(record["files"])
        return cls(**record)

    def trail(self, text: str) -> None:
        """Append a line to the claim's own log; never fails the job (and never recreates a fenced folder)."""
        line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} [{self.instance or '-'} pid {os.getpid()}] {text}\n"
        with (
            contextlib.suppress(OSError),
            open(self.folder / TRAIL, "a", encoding="utf-8", errors="backslashreplace") as handle,
        ):
            handle.write(line)

    def trail_tail(self, lines: int = 20) -> list[str]:
        try:
            return (self.folder / TRAIL).read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
        except OSError:
            return []


TRAIL = "trail.log"
ID_RANDOM_BYTES = 6
"""48 random bits per claim id; with the stem and the second also in it, a collision needs two
same-stem files claimed in one second: p ~ n^2 / 2^49 for n of them (n = 1,000 in one second
anywhere on a shared outbox: 1.8e-9), and the `O_EXCL` reservation turns even that into a retry."""
_UNSAFE = re.compile(r"[^\w.+=@-]+")


def new_claim_id(source: str) -> str:
    """`<stem>-<YYYYmmdd-HHMMSS>-<12 hex>`: readable, sortable, unique across daemons and hosts.

    The stem keeps letters, digits and `._-+=@` (others become `_`, at most 64 characters):
    output names stay printable and within NAME_MAX whatever the job file was called.
    """
    stem = _UNSAFE.sub("_", Path(source).stem)[:64].strip(".") or "job"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(ID_RANDOM_BYTES)}"


def reservation(outbox: Path, claim_id: str) -> Path:
    """The hidden file in the outbox that reserves a claim id (the prefix of all its output names)."""
    return outbox / f".{claim_id}.reserved"


RESERVING = ".reserving-"
"""The prefix of a reservation being written in `work/<instance>/` before it is linked into the outbox."""


def reserve_id(outbox: Path, claim_id: str, instance: str, work: Path) -> bool:
    """Take `claim_id` for the whole outbox (for every daemon and host); False if taken.

    The reservation appears whole, already naming its instance: it is written in this daemon's own
    work folder and linked into the outbox (`link` fails with EEXIST when the id is taken, on NFS
    too), so a kill at any point leaves either no reservation or one that says whose it is, and at
    most a temporary file in `work/<instance>/` that the next start removes. Where the outbox has no
    links or is on another filesystem, an `O_EXCL` create and a write do the same in two steps.
    """
    temp = work / f"{RESERVING}{claim_id}"
    temp.write_text(f"{instance}\n", encoding="utf-8")
    try:
        fault_point("before_reserve_link")
        os.link(temp, reservation(outbox, claim_id))
        fault_point("after_reserve_link")
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno != errno.EXDEV and exc.errno not in NO_LINKS:
            raise
    finally:
        temp.unlink(missing_ok=True)
    try:
        fd = os.open(reservation(outbox, claim_id), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        with open(fd, "w", encoding="utf-8") as handle:
            handle.write(f"{instance}\n")
    except BaseException:  # a full disk: no reservation, and nothing left behind
        reservation(outbox, claim_id).unlink(missing_ok=True)
        raise
    return True


def claim(intent: Intent, config: Config) -> Claim | None:
    """Move the intent's files into a new claim folder; None if another daemon was first.

    OSError (a full disk, permissions) leaves the files in the inbox and nothing in work/.
    """
    inbox, work, outbox, instance = config.inbox, config.work_dir, config.outbox, config.instance
    for _ in range(16):
        claim_id = new_claim_id(intent.source)
        if not reserve_id(outbox, claim_id, instance, work):
            continue
        try:
            (work / claim_id).mkdir()
        except FileExistsError:
            continue
        except BaseException:
            reservation(outbox, claim_id).unlink(missing_ok=True)
            raise
        break
    else:
        raise FileExistsError(f"no free claim id for {intent.source} after 16 tries")
    found = Claim(
        claim_id,
        work / claim_id,
        intent.source,
        intent.files,
        bare_image=intent.bare_image,
        problem=intent.problem,
        claimed_at=time.time(),
        instance=instance,
    )
    try:
        found.inputs.mkdir()
        found.save()  # the intent first: a crash right after the rename still finds the record
    except BaseException:
        abandon(found, outbox)
        raise
    for index, relative in enumerate(intent.files):
        source, dest = inbox / relative, found.inputs / relative
        try:
            if "/" in relative:  # a hot folder's file
                dest.parent.mkdir(exist_ok=True)
            if source.is_symlink():
                raise FileNotFoundError(relative)  # never follow a link out of the inbox
            rename_checked(source, dest)
        except OSError:
            if index == 0:  # nothing claimed: the files stay where they are, for this or another daemon
                abandon(found, outbox)
                if not os.path.lexists(source) or source.is_symlink():
                    return None
                raise
            # An image another daemon took (or one that cannot move): the job's validation names it.
    for folder in {(found.inputs / r).parent for r in intent.files} | {(inbox / r).parent for r in intent.files}:
        fsync_dir(folder)
    found.trail(f"claimed {intent.source} ({len(intent.files)} file(s))")
    fault_point("after_claim")
    return found


def abandon(found: Claim, outbox: Path) -> None:
    """Undo a claim that claimed nothing: remove only what `claim` made (rmdir: never a claimed file)."""
    with contextlib.suppress(OSError):
        (found.folder / "claim.json").unlink()
    for relative in found.files:
        parent = (found.inputs / relative).parent
        while parent != found.folder.parent:
            with contextlib.suppress(OSError):
                parent.rmdir()
            parent = parent.parent
    reservation(outbox, found.claim_id).unlink(missing_ok=True)


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
        needs = resolve_inputs(spec, claim.source, exists)
        image = mask = None
        if spec.needs_image:
            spec, image = _precheck_image(claim, config, spec, index, needs["image"])
        mask_name = needs.get("mask")
        if isinstance(spec, Img2ImgJob) and mask_name is not None:
            spec, mask = _precheck_mask(claim, config, spec, index, mask_name, image)
        controls: list[InputImage] = []
        for number, use in enumerate(spec.control):
            field_name = f"control.{number}.image"
            if use.image is not None:
                controls.append(_precheck_input(claim, config, index, field_name, needs[field_name], written=use.image))
            elif image is not None:  # `needs_image` holds: the control reads the job's input
                controls.append(image)
        job_id = claim.claim_id if len(specs) == 1 else f"{claim.claim_id}-{index}"
        jobs.append(Job(job_id, claim.source, index, fill_seed(spec), image, mask, tuple(controls)))
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
        | ({"mask": job.mask.name, "mask_probe": job.mask.probe_record()} if job.mask else {})
        | ({"controls": [[c.name, c.probe_record()] for c in job.controls]} if job.controls else {})
        for job in jobs
    ]
    atomic_write(saved, json.dumps(records, indent=1).encode(), durable=False)
    fault_point("after_validate")
    return jobs


def _job_from_record(claim: Claim, config: Config, record: dict[str, Any]) -> Job:
    spec = spec_from_dict(record["spec"])
    image, probe = record["image"], record.get("probe")
    found: InputImage | None = None
    if image is not None and probe is not None:
        found = InputImage.from_record(str(image), probe, folder=claim.inputs)
    elif image is not None:  # written before jobs.json kept the probe: probe the file now
        spec, found = _precheck_image(claim, config, spec, record["index"], image)
    mask = None
    if record.get("mask") is not None:
        mask = InputImage.from_record(str(record["mask"]), record["mask_probe"], folder=claim.inputs)
    controls = tuple(InputImage.from_record(str(n), p, folder=claim.inputs) for n, p in record.get("controls", []))
    return Job(record["job_id"], claim.source, record["index"], spec, found, mask, controls)


def _validate(claim: Claim, config: Config, parsed: Parsed | None) -> list[Spec]:
    """Parse the job file (or build the bare image's profile job) against the config."""
    if parsed is not None and not claim.bare_image and parsed.stamp == file_stamp(claim.inputs / claim.source):
        return parsed.result()  # the same file, renamed: same size, time and inode
    rules = config.rules()
    profile_name = profile_of(claim.source)
    if claim.bare_image and profile_name is not None and profile_name == config.reproduce:
        job = job_from_image(
            claim.inputs / claim.source,
            label=claim.source,
            models=config.models,
            model_hashes=lambda: {n: model_hash(e, config.state) for n, e in config.model_entries().items()},
        )
        return [validate_job(job, path=claim.source, index=1, rules=rules)]
    if claim.bare_image:
        template = config.profiles.get(profile_name) if profile_name else config.sketch_job
        name = Path(claim.source).name
        return [validate_job(dict(template or {}) | {"image": name}, path=claim.source, index=1, rules=rules)]
    return job_file_reader(claim.inputs, rules=rules, profiles=config.profiles)(claim.source)


def _precheck_input(
    claim: Claim, config: Config, index: int, field_name: str, name: str | None, *, written: str | None = None
) -> InputImage:
    """An input (the job's image, a mask, a control's image): there, a real image, within the file size
    limit. `written` is its name as the job wrote it (None for a same-stem file)."""
    what = "input image" if field_name == "image" else field_name
    with job_context(path=claim.source, job_index=index):
        if name is None or not os.path.lexists(claim.inputs / name):
            raise JobRejected(
                f"the {what} {written or name or '(same-stem image)'!r} is not in the inbox",
                code=Code.MISSING_INPUT,
                field=field_name,
                value=written,
                fix=f"drop the image into the inbox with its job file (same folder, same name as in `{field_name}:`)",
            )
        return probe_image(
            claim.inputs / name, label=name, max_file_bytes=config.limits.max_file_bytes, field=field_name
        )


def _precheck_mask(
    claim: Claim, config: Config, spec: Img2ImgJob, index: int, name: str, image: InputImage | None
) -> tuple[Img2ImgJob, InputImage]:
    """The mask is an image of its input's size; the spec names it (relative to the job file), so the job
    as recorded says which mask it ran with, whether the user wrote `mask:` or dropped `<stem>.mask.png`."""
    mask = _precheck_input(claim, config, index, "mask", name, written=spec.mask or name)
    if image is not None and mask.size_px != image.size_px:
        with job_context(path=claim.source, job_index=index):
            raise JobRejected(
                f"the mask {name!r} is {mask.size_px[0]}x{mask.size_px[1]} but its image {image.name!r} is "
                f"{image.size_px[0]}x{image.size_px[1]}",
                code=Code.BAD_IMAGE,
                field="mask",
                value=name,
                fix="draw the mask at the image's size (white where it is redrawn, black where it is kept)",
            )
    written = posixpath.relpath(name, posixpath.dirname(claim.source) or ".")
    return spec.model_copy(update={"mask": written}), mask


def _precheck_image(claim: Claim, config: Config, spec: Spec, index: int, image: str | None) -> tuple[Spec, InputImage]:
    """The input exists, is a real image, and the result stays within the pixel limit.

    A redraw with no `size:` of an input over `limits.max_pixels` (a phone photo) is given the size
    that fits, keeping the aspect ratio, instead of being refused: the spec returned says so.
    """
    probe = _precheck_input(claim, config, index, "image", image, written=spec.input_image)
    with job_context(path=claim.source, job_index=index):
        limit = config.limits.max_pixels
        (w, h) = probe.size_px
        if isinstance(spec, RedrawJob) and spec.size is None and w * h > limit:
            fitted = fit_pixels(probe.size_px, limit)
            spec = spec.model_copy(update={"size": fitted})
            claim.trail(
                f"job {index}: input {image} is {w}x{h}; it runs at {fitted[0]}x{fitted[1]} (limits.max_pixels)"
            )
        check_stage_sizes(spec, probe.size_px, limit, image=image)
    return spec, probe
