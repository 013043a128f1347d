"""Reproduce: the job that made an image, from what the image carries (for the config's `reproduce:` folder).

An image diffusiond made carries its record (the job as run, and the image's seed): that job runs
again with that seed, one image. Another tool's image (or ours without the record) carries
AUTOMATIC1111's `parameters` infotext: its prompt, negative prompt, steps, sampler, CFG scale,
seed and size become a txt2img job. The model is the configured one of the same name, else the
one whose short hash (what `Model hash:` holds) matches; a clear error when none does.

A1111's infotext is parsed here, by hand: its format is a prompt, an optional `Negative prompt:`
line, then `Key: value` pairs where a value holding `,` or `:` is JSON-quoted (A1111's
modules/infotext_utils.py); no maintained library writes jobs from it (sd-parsers reads more
tools' formats but returns its own model, and is only a test dependency here).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from diffusiond.pipeline.errors import Code, JobRejected
from diffusiond.pipeline.job import A1111_SAMPLERS as _A1111_SAMPLERS
from diffusiond.pipeline.metadata import read_parameters, read_record

_PAIR = re.compile(r'\s*([\w \-/+()]+?):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_SAMPLERS = {(sampler, schedule): ours for ours, (sampler, schedule) in _A1111_SAMPLERS.items()}
_SAMPLER_NAMES = {sampler: ours for (sampler, _schedule), ours in reversed(list(_SAMPLERS.items()))}


def job_from_image(
    path: Path, *, label: str, models: Mapping[str, Any], model_hashes: Callable[[], Mapping[str, str]]
) -> dict[str, Any]:
    """The job (fields as in a job file) that makes `path`'s image again; JobRejected when it cannot.

    `models` are the configured model names; `model_hashes()` their short hashes, asked only when
    the image names a model the config does not have (hashing a model the first time takes a while).
    """
    try:
        with Image.open(path) as image:
            record = read_record(image)
            parameters = read_parameters(image)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise _rejected(label, f"cannot read its parameters: {exc}", Code.BAD_IMAGE) from exc
    if isinstance(record, dict) and isinstance(record.get("job"), dict):
        job = {k: v for k, v in record["job"].items() if v is not None}
        if job.get("task", "txt2img") != "txt2img":
            raise _rejected(label, f"it was made by {job['task']}, whose input image it does not carry", Code.NOT_A_JOB)
        if job.get("control"):
            raise _rejected(label, "it was guided by a ControlNet, whose image it does not carry", Code.NOT_A_JOB)
        job |= {"seed": record.get("seed", job.get("seed")), "count": 1}
        if job.get("then"):
            job["then"] = _stages_that_made(job["then"], record.get("stages"))
        job.pop("watermark", None)  # this daemon's own marks apply
        model_hash = _infotext(parameters).get("Model hash") if parameters else None
    elif parameters:
        fields = _infotext(parameters)
        if any(key.startswith("ControlNet") for key in fields):
            raise _rejected(label, "it was guided by a ControlNet, whose image it does not carry", Code.NOT_A_JOB)
        job = _a1111_job(fields)
        model_hash = fields.get("Model hash")
    else:
        raise _rejected(label, "it carries no diffusiond record and no AUTOMATIC1111 parameters", Code.NOT_A_JOB)
    job["model"] = _model(job.get("model"), model_hash, models, model_hashes, label)
    return job


def _stages_that_made(stages: Any, made: Any) -> Any:
    """A multi-stage job's stages up to the one that made this image (one kept with `keep: all` is
    made by fewer), each with the seed it had for this very image (image i ran at stage seed + i)."""
    if not isinstance(stages, list) or not isinstance(made, list) or len(made) > len(stages) + 1:
        return stages  # not a record diffusiond wrote: validation says what is wrong with it
    out = []
    for stage, record in zip(stages, made[1:], strict=False):
        if not isinstance(stage, dict) or not isinstance(record, dict):
            return stages
        out.append({k: v for k, v in stage.items() if v is not None} | {"seed": record.get("seed")})
    return out


def _infotext(text: str) -> dict[str, str]:
    """A1111's infotext: `prompt`, `negative_prompt`, and each `Key: value` of its last line."""
    lines = text.strip().split("\n")
    settings = lines.pop() if lines and _PAIR.match(lines[-1]) and "Steps:" in lines[-1] else ""
    prompt: list[str] = []
    negative: list[str] = []
    into_negative = False
    for line in lines:
        if line.startswith("Negative prompt:"):
            into_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative if into_negative else prompt).append(line)
    fields = {"prompt": "\n".join(prompt).strip(), "negative_prompt": "\n".join(negative).strip()}
    for key, value in _PAIR.findall(settings):
        value = value.strip()
        if value.startswith('"') and value.endswith('"') and len(value) > 1:
            with contextlib.suppress(ValueError):
                value = json.loads(value)
        fields[key.strip()] = value
    return fields


def _a1111_job(fields: Mapping[str, str]) -> dict[str, Any]:
    job: dict[str, Any] = {"task": "txt2img", "prompt": fields["prompt"], "count": 1}
    if fields.get("negative_prompt"):
        job["negative_prompt"] = fields["negative_prompt"]
    for key, name, kind in (("Steps", "steps", int), ("CFG scale", "guidance", float), ("Seed", "seed", int)):
        if key in fields:
            with contextlib.suppress(ValueError):
                job[name] = kind(fields[key])
    if "Size" in fields:
        job["size"] = fields["Size"]
    for key, name, kind in (("Clip skip", "clip_skip", int), ("Eta DDIM", "eta", float)):
        if key in fields:
            with contextlib.suppress(ValueError):
                job[name] = kind(fields[key])
    sampler = fields.get("Sampler")
    if sampler:
        schedule = fields.get("Schedule type", "Karras" if sampler.endswith(" Karras") else "")
        base = sampler.removesuffix(" Karras")
        ours = _SAMPLERS.get((base, schedule)) or _SAMPLER_NAMES.get(base)
        if ours:
            job["scheduler"] = ours
    if fields.get("Model"):
        job["model"] = fields["Model"]
    return job


def _model(
    name: Any, model_hash: str | None, models: Mapping[str, Any], hashes: Callable[[], Mapping[str, str]], label: str
) -> str:
    if isinstance(name, str) and name in models:
        return name
    if model_hash:
        for configured, digest in hashes().items():
            if digest and digest.lower().startswith(model_hash.lower()[:10]):
                return configured
    parts = (f"name {name!r}" if name else "", f"hash {model_hash}" if model_hash else "")
    wanted = " or ".join(part for part in parts if part)
    raise JobRejected(
        f"no configured model matches the image's model ({wanted or 'none recorded'}); configured: "
        f"{', '.join(sorted(models)) or '(none)'}",
        path=label,
        field="model",
        value=name,
        fix="add that model to the config's `models:` under the same name, or drop a job file that names a model",
    )


def _rejected(label: str, why: str, code: Code) -> JobRejected:
    return JobRejected(
        f"cannot reproduce this image: {why}",
        code=code,
        path=label,
        fix="drop an image made by diffusiond or AUTOMATIC1111 (its parameters embedded), or a job file",
    )
