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
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, NamedTuple

from PIL import Image

from diffusiond.pipeline.backend import EarlierStage, Generated
from diffusiond.pipeline.errors import Code, JobFailed, job_context
from diffusiond.pipeline.job import (
    InvisibleWatermark,
    Job,
    OutputSpec,
    Spec,
    VisibleWatermark,
    WatermarkSpec,
    spec_record,
    stage_specs,
)
from diffusiond.pipeline.metadata import (
    SUFFIXES,
    LaterStage,
    MetadataOptions,
    digital_source_type,
    encode,
    infotext,
    sidecar_files,
)
from diffusiond.pipeline.watermark import InvisibleMark, VisibleMark, apply_visible, embed_invisible, verify_invisible
from diffusiond.pipeline.watermark_tiled import mark_id_for

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
        method = chosen_invisible.method or (invisible.method if invisible else None) or "tiled"
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
    """For the manifest: the visible mark drawn, and the invisible mark (`MarkResult.to_dict()`)."""


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
    mark_id: int | None = None,
) -> Stamped:
    """One image's file bytes with its marks and metadata, and what the manifest says of its marks.

    `mark_id` is the `tiled` mark's id of this image (`mark_id_for(job_id, file name)`). Pure and in
    memory: nothing is written, so a failure leaves nothing behind. Raises JobFailed when the config
    requires an invisible mark that this image does not carry, or signing fails.
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
        image, result = embed_invisible(image, marks.invisible, mark_id)
        invisible = result.to_dict()
    # 3. Metadata, into the final pixels.
    watermark = {"visible": visible, "invisible": invisible}

    def encoded() -> bytes:
        return encode(
            image,
            output,
            parameters=parameters,
            record=dict(record) | {"watermark": watermark},
            spec=spec,
            options=options,
        )

    data = encoded()
    # 4. The mark checked in the file as written: JPEG and WebP are lossy (PNG keeps the pixels step 2
    # checked). The record inside says `verified: true` until now; when the file lost the mark it is
    # written again saying so (the compressed pixels do not depend on the metadata beside them).
    if marks.invisible is not None and invisible is not None and invisible["embedded"] and output.format != "png":
        used = InvisibleMark(payload=invisible["payload"], method=invisible["method"])  # a fallback's own
        with Image.open(io.BytesIO(data)) as written:
            survived = verify_invisible(written, used, mark_id)
        if not survived:
            invisible["verified"] = False
            invisible["reason"] = invisible["reason"] or f"the mark did not survive encoding as {output.format}"
            data = encoded()
    # 5. Content credentials last: the signature covers the pixels and every metadata chunk above.
    if c2pa is not None:
        from diffusiond.pipeline.c2pa_sign import sign

        try:
            data = sign(
                data,
                output.format,
                config=c2pa,
                title=str(record.get("job_id", "diffusiond image")),
                source_type=digital_source_type(spec.task, getattr(spec, "method", None), guided=bool(spec.control)),
                composite=spec.task != "txt2img" or bool(spec.control),
                mark=invisible if invisible and invisible["verified"] else None,
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
    workers: int = 1
    """Images stamped at once (threads: `stamp_threads:`); the files come out in the same order regardless."""


@dataclass(frozen=True)
class OutputRecord:
    """One image as the manifest lists it."""

    file: str
    sha256: str
    seed: int
    width: int
    height: int
    watermark: dict[str, Any]
    chain: list[dict[str, Any]] = field(default_factory=list)
    """A multi-stage job's final image: the images it was made from, stage by stage (`stage`, `task`,
    `seed`, `width`, `height`, `sha256` of the lossless intermediate, `file` when published)."""


@dataclass(frozen=True)
class StampedJob:
    """A job's files (images and sidecars, in writing order) and what the manifest says of each image."""

    files: list[tuple[str, bytes]]
    outputs: list[OutputRecord]
    """The final images (the last stage's)."""
    stamp_s: float
    kept: dict[int, list[OutputRecord]] = field(default_factory=dict)
    """With `keep: all`: the earlier stages' published images, by stage number."""


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
    return {"job_id": job.job_id, "source": job.source, "index": job.index, "job": spec_record(job.spec)}


class _Made(NamedTuple):
    """One stage's image of one output: what its infotext and record say of that stage."""

    number: int
    spec: Spec
    size: tuple[int, int]
    generated: Generated
    seed: int


def _parameters(made: Sequence[_Made]) -> str:
    """The infotext of an image made by `made`: the first stage's, with the later stages' keys."""
    first, *later = made
    return infotext(
        first.spec,
        seed=first.seed,
        size=first.size,
        model_name=first.spec.model,
        sampler=first.generated.scheduler,
        model_hash=model.hash if (model := first.generated.model) else None,
        later=[
            LaterStage(m.spec, m.size, m.generated.scheduler, m.generated.model.family if m.generated.model else None)
            for m in later
        ],
        vae=(model.vae, model.vae_hash) if model and model.vae else None,
        lora_hashes=[(lora["name"], lora["hash"]) for lora in first.generated.loras or []],
        ti_hashes=[(e["name"], e["hash"]) for e in first.generated.embeddings or []],
        controlnets=[
            f"{c['name']} [{c['hash']}]" if c.get("hash") else c["name"] for c in first.generated.controls or []
        ],
    )


def _stages_record(made: Sequence[_Made]) -> list[dict[str, Any]]:
    """What the embedded record says of each stage that made an image (the job's fields are in `job`)."""
    return [
        {
            "stage": m.number,
            "task": str(m.spec.task),
            "seed": m.seed,
            "width": m.size[0],
            "height": m.size[1],
            "model": m.generated.model.name if m.generated.model else None,
            "scheduler": m.generated.scheduler,
        }
        for m in made
    ]


def kept_name(name: str, stage: int) -> str:
    """The name of an earlier stage's image published beside the final `name` (`keep: all`)."""
    path = PurePath(name)
    return f"{path.stem}-stage{stage}{path.suffix}"


def stamp_job(
    job: Job,
    generated: Generated,
    policy: StampPolicy,
    taken: Callable[[str], bool] = lambda _name: False,
    earlier: Sequence[EarlierStage] = (),
) -> StampedJob:
    """Stamp every image of `job` in memory (infotext, marks, metadata, sidecars): a failure writes nothing.

    `generated` is the job's last stage; `earlier` its stages before (a multi-stage job), whose images
    are stamped too with `keep: all`. Every image carries the original (first stage's) prompt and seed.
    `taken` (a name in use in the outbox) is asked only for a job with `output.name`.

    Names are chosen first, in order; then the images are stamped `policy.workers` at a time (each
    stamp is pure); then the files are listed in the order one worker would have made them, so the
    bytes and their order do not depend on the pool.
    """
    started = time.perf_counter()
    chosen: set[str] = set()
    spec, record = job.spec, job_record(job)
    last = stage_specs(spec)[len(earlier)]
    keep = spec.keep == "all" and bool(earlier)

    def free(name: str) -> bool:
        names = [name, *(kept_name(name, stage.number) for stage in earlier if keep)]
        return not any(n in chosen or taken(n) for n in names)

    # 1. Plan: each image to stamp (the final ones and, with `keep: all`, the earlier stages'), in file order.
    plan: list[tuple[Image.Image | Path, Sequence[_Made], str]] = []
    finals: list[tuple[int, str, list[dict[str, Any]]]] = []  # (plan index, name, chain)
    kept_plan: dict[int, list[tuple[int, str, int]]] = {stage.number: [] for stage in earlier if keep}
    for i, (image, seed) in enumerate(zip(generated.images, generated.seeds, strict=True)):
        made = [
            *(_Made(e.number, e.spec, e.sizes[i], e.generated, e.generated.seeds[i]) for e in earlier),
            _Made(len(earlier) + 1, last, image.size, generated, seed),
        ]
        name = chosen_name(job, i + 1, made[0].seed, lambda n: not free(n))
        chosen.add(name)
        finals.append((len(plan), name, []))
        plan.append((image, made, name))
        for stage in earlier:
            published = None
            if keep:
                published = kept_name(name, stage.number)
                chosen.add(published)
                kept_plan[stage.number].append((len(plan), published, stage.generated.seeds[i]))
                plan.append((stage.files[i], made[: stage.number], published))
            width, height = stage.sizes[i]
            finals[-1][2].append(
                {
                    "stage": stage.number,
                    "task": str(stage.spec.task),
                    "seed": stage.generated.seeds[i],
                    "width": width,
                    "height": height,
                    "sha256": stage.sha256[i],
                    "file": published,
                }
            )

    # 2. Stamp, `policy.workers` at a time.
    def stamp_one(item: tuple[Image.Image | Path, Sequence[_Made], str]) -> tuple[Stamped, list[tuple[str, bytes]]]:
        source, made, name = item
        if isinstance(source, Path):
            with Image.open(source) as opened:
                pixels = opened.convert("RGB")
        else:
            pixels = source
        parameters = _parameters(made)
        image_record = record | {"seed": made[0].seed} | ({"stages": _stages_record(made)} if earlier else {})
        with job_context(path=job.source, job_index=job.index):
            stamped = stamp(
                pixels,
                spec.output,
                policy.marks,
                parameters=parameters,
                record=image_record,
                spec=spec,
                options=policy.options,
                c2pa=policy.c2pa,
                mark_id=mark_id_for(job.job_id, name),
            )
        sidecars = sidecar_files(name, parameters=parameters, record=image_record, options=policy.options)
        return stamped, [(name, stamped.data), *sidecars]

    if policy.workers > 1 and len(plan) > 1:
        results = list(_pool(policy.workers).map(stamp_one, plan))
    else:
        results = [stamp_one(item) for item in plan]

    # 3. The files in plan order, and what the manifest says of each image.
    files = [file for _stamped, item_files in results for file in item_files]
    outputs = []
    for (index, name, chain), image in zip(finals, generated.images, strict=True):
        stamped = results[index][0]
        digest = hashlib.sha256(stamped.data).hexdigest()
        seed = plan[index][1][0].seed
        outputs.append(OutputRecord(name, digest, seed, image.width, image.height, stamped.watermark, chain))
    kept: dict[int, list[OutputRecord]] = {}
    for number, entries in kept_plan.items():
        kept[number] = []
        for index, published, seed_k in entries:
            stamped = results[index][0]
            with Image.open(io.BytesIO(stamped.data)) as written:
                width, height = written.size
            digest = hashlib.sha256(stamped.data).hexdigest()
            kept[number].append(OutputRecord(published, digest, seed_k, width, height, stamped.watermark))
    return StampedJob(files, outputs, time.perf_counter() - started, kept)


@cache
def _pool(workers: int) -> ThreadPoolExecutor:
    """One stamping pool per size for the process's life (a config reload may choose another size)."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stamp")
