"""Stamping one image with how it was made: visible mark, invisible mark, metadata, checked in the file.

The order matters: the visible label is drawn first so the invisible mark is
embedded over it and both hold; metadata goes in last, when the pixels are final;
then the written bytes are decoded again, because a lossy format (JPEG, WebP) can
lose a mark that held in memory.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from diffusiond.pipeline.backend import Generated
from diffusiond.pipeline.errors import Code, JobFailed, job_context
from diffusiond.pipeline.job import InvisibleWatermark, Job, OutputSpec, Spec, VisibleWatermark, WatermarkSpec
from diffusiond.pipeline.metadata import SUFFIXES, MetadataOptions, digital_source_type, encode, infotext, sidecar_files
from diffusiond.pipeline.watermark import InvisibleMark, VisibleMark, apply_visible, embed_invisible, verify_invisible

if TYPE_CHECKING:
    from diffusiond.pipeline.c2pa_sign import C2paConfig


@dataclass(frozen=True)
class Marks:
    """The marks one job's images get, after the job's `watermark:` is laid over the config's."""

    visible: VisibleMark | None
    invisible: InvisibleMark | None
    required: bool = False


def marks_for(
    job: WatermarkSpec,
    *,
    invisible: InvisibleWatermark | None,
    visible: VisibleWatermark | None,
    logo: Path | None = None,
    required: bool = False,
) -> Marks:
    """The config's marks, with the job's own where it gives them (`false` turns one off)."""
    chosen_invisible = invisible if job.invisible is None else (job.invisible or None)
    chosen_visible = visible if job.visible is None else (job.visible or None)
    if job.visible is None and visible is None and logo is not None:
        chosen_visible = VisibleWatermark()  # a configured logo with default placement
    invisible_mark = None
    if chosen_invisible is not None:
        method = chosen_invisible.method or (invisible.method if invisible else None) or "dwtDctSvd"
        invisible_mark = InvisibleMark(payload=chosen_invisible.text, method=method)
    visible_mark = None
    if chosen_visible is not None:
        use_logo = logo is not None and job.visible is None
        visible_mark = VisibleMark(
            text=None if use_logo else chosen_visible.text,
            logo=logo if use_logo else None,
            position=chosen_visible.position,
            size=chosen_visible.size,
            margin=chosen_visible.margin,
            opacity=chosen_visible.opacity,
        )
    return Marks(visible_mark, invisible_mark, required)


@dataclass(frozen=True)
class Stamped:
    data: bytes
    """The image file's bytes."""
    watermark: dict[str, Any]
    """For the manifest: the visible mark drawn, and the invisible mark's method, payload and check."""


def stamp(
    image: Image.Image,
    output: OutputSpec,
    marks: Marks,
    *,
    parameters: str,
    record: Mapping[str, Any],
    spec: Spec,
    options: MetadataOptions,
    c2pa: C2paConfig | None = None,
) -> Stamped:
    """One image's file bytes with its marks and metadata, and what the manifest says of its marks.

    Pure and in memory: nothing is written, so a failure leaves nothing behind. Raises JobFailed
    when the config requires an invisible mark that this image does not carry, or signing fails.
    """
    # 1. The visible mark, so the invisible one is embedded over it.
    visible = None
    if marks.visible is not None:
        image = apply_visible(image, marks.visible)
        label = {"text": marks.visible.text} if marks.visible.text else {"logo": str(marks.visible.logo)}
        visible = label | {"position": marks.visible.position, "opacity": marks.visible.opacity}
    # 2. The invisible mark, decoded again at once.
    invisible = None
    if marks.invisible is not None:
        image, result = embed_invisible(image, marks.invisible)
        invisible = result.to_dict()
    # 3. Metadata, into the final pixels.
    watermark = {"visible": visible, "invisible": invisible}
    data = encode(
        image, output, parameters=parameters, record=dict(record) | {"watermark": watermark}, spec=spec, options=options
    )
    # 4. The mark checked in the file as written: JPEG and WebP are lossy (PNG keeps the pixels step 2 checked).
    if marks.invisible is not None and invisible is not None and invisible["embedded"] and output.format != "png":
        with Image.open(io.BytesIO(data)) as written:
            invisible["verified"] = verify_invisible(written, marks.invisible)
        if not invisible["verified"]:
            invisible["reason"] = invisible["reason"] or f"the mark did not survive encoding as {output.format}"
    # 5. Content credentials last: the signature covers the pixels and every metadata chunk above.
    if c2pa is not None:
        from diffusiond.pipeline.c2pa_sign import sign

        try:
            data = sign(
                data,
                output.format,
                config=c2pa,
                title=str(record.get("job_id", "diffusiond image")),
                source_type=digital_source_type(spec.task, getattr(spec, "method", None)),
                composite=spec.task != "txt2img",
            )
        except ValueError as exc:
            raise JobFailed(
                f"C2PA signing failed: {exc}",
                code=Code.OUTPUT_FAILED,
                fix="check metadata.c2pa's certificate chain and key (see README, Provenance)",
            ) from exc
    if marks.required and not (invisible and invisible["verified"]):
        why = invisible["reason"] if invisible else "no invisible mark was chosen"
        raise JobFailed(
            f"the config requires an invisible watermark and this image does not carry one: {why}",
            code=Code.WATERMARK_FAILED,
            fix="make images of at least 256 px on each side, use png or a higher quality, "
            "or set watermark.required: false in the config",
        )
    return Stamped(data, watermark)


@dataclass(frozen=True)
class StampPolicy:
    """What every image of a job gets: its marks, the metadata options, the signer (built from the config)."""

    marks: Marks
    options: MetadataOptions
    c2pa: C2paConfig | None = None


@dataclass(frozen=True)
class OutputRecord:
    """One image as the manifest lists it."""

    file: str
    sha256: str
    seed: int
    width: int
    height: int
    watermark: dict[str, Any]


@dataclass(frozen=True)
class StampedJob:
    """A job's files (images and sidecars, in writing order) and what the manifest says of each image."""

    files: list[tuple[str, bytes]]
    outputs: list[OutputRecord]
    stamp_s: float


def output_name(job: Job, number: int) -> str:
    """The default name of image `number`: `<job_id>-<n>.<ext>` (what the previous versions wrote)."""
    return f"{job.job_id}-{number}{SUFFIXES[job.spec.output.format]}"


def chosen_name(job: Job, number: int, seed: int, taken: Callable[[str], bool]) -> str:
    """Image `number`'s name from the job's `output.name` (or the default), the first not `taken`.

    `taken` says whether a name is in use (in the outbox, or by an earlier image of this job):
    a second run of `{stem}-{seed}-{n}` gets `-2`, `-3`, ... before the extension.
    """
    suffix = SUFFIXES[job.spec.output.format]
    template = job.spec.output.name
    if template is None:
        return output_name(job, number)
    values = {
        "stem": Path(job.source).stem,
        "job_id": job.job_id,
        "seed": seed,
        "n": number,
        "model": job.spec.model or "none",
        "date": time.strftime("%Y%m%d"),
        "task": str(job.spec.task),
    }
    base = template.format_map(values).replace("/", "_").replace("\\", "_").lstrip(".") or job.job_id
    name = f"{base}{suffix}"
    extra = 2
    while taken(name):
        name = f"{base}-{extra}{suffix}"
        extra += 1
    return name


def job_record(job: Job) -> dict[str, Any]:
    """What every image's embedded record and the manifest start with."""
    return {"job_id": job.job_id, "source": job.source, "index": job.index, "job": job.spec.model_dump(mode="json")}


def stamp_job(
    job: Job, generated: Generated, policy: StampPolicy, taken: Callable[[str], bool] = lambda _name: False
) -> StampedJob:
    """Stamp every image of `job` in memory (infotext, marks, metadata, sidecars): a failure writes nothing.

    `taken` (a name in use in the outbox) is asked only for a job with `output.name`.
    """
    started = time.perf_counter()
    chosen: set[str] = set()
    spec, record = job.spec, job_record(job)
    files: list[tuple[str, bytes]] = []
    outputs: list[OutputRecord] = []
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
                policy.marks,
                parameters=parameters,
                record=image_record,
                spec=spec,
                options=policy.options,
                c2pa=policy.c2pa,
            )
            name = chosen_name(job, number, seed, lambda n: n in chosen or taken(n))
            chosen.add(name)
            files.append((name, stamped.data))
            files += sidecar_files(name, parameters=parameters, record=image_record, options=policy.options)
            digest = hashlib.sha256(stamped.data).hexdigest()
            outputs.append(OutputRecord(name, digest, seed, image.width, image.height, stamped.watermark))
    return StampedJob(files, outputs, time.perf_counter() - started)
