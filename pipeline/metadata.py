"""How an image says how it was made: AUTOMATIC1111 infotext, the full job as JSON, XMP and EXIF.

What each format carries; each part can be turned off with `MetadataOptions`:

- `parameters`, the AUTOMATIC1111 infotext: PNG tEXt `parameters` (iTXt when not
  Latin-1); JPEG and WebP EXIF UserComment, UNICODE (UTF-16, the file's byte order).
- `record`, the job and its manifest entry as JSON: PNG iTXt `diffusiond`; JPEG and
  WebP XMP property `diffusiond:record` (JPEG: only when its 64 KB segment has room).
- `xmp`: IPTC `Iptc4xmpExt:DigitalSourceType`, the prompt as `dc:description`,
  `xmp:CreatorTool`. PNG iTXt `XML:com.adobe.xmp`; JPEG APP1
  `http://ns.adobe.com/xap/1.0/`; WebP `XMP ` chunk.
- `exif`: JPEG and WebP EXIF Software, ImageDescription (the prompt),
  Orientation 1 (the pixels are stored upright) and the other tags Exif 2.32
  requires of a JPEG; PNG tEXt `Software`.

The infotext is the text AUTOMATIC1111's webui writes and every prompt reader
parses (image viewers, model sites, sd-parsers): the prompt, `Negative prompt: ...`
when there is one, then one line of `Key: value` pairs. A sidecar `.txt`
(infotext) or `.json` (infotext and record) can be written beside the image as
well or instead (`sidecar_files`).

The record is not kept in EXIF: the one EXIF tag for a writer's private data,
MakerNote, makes exiftool warn "Unrecognized MakerNotes" on every file.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import struct
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Literal
from xml.sax.saxutils import escape

import piexif
import piexif.helper
from PIL import Image, PngImagePlugin
from pydantic import BaseModel, ConfigDict

from diffusiond import __version__
from diffusiond.pipeline.job import A1111_SAMPLERS, Depth2ImgJob, Img2ImgJob, OutputSpec, Spec, Txt2ImgJob, UpscaleJob

__all__ = [
    "COMPOSITE",
    "ENHANCED",
    "SUFFIXES",
    "TRAINED",
    "LaterStage",
    "MetadataOptions",
    "a1111_sampler",
    "digital_source_type",
    "encode",
    "infotext",
    "parse_infotext",
    "read_parameters",
    "read_record",
    "read_xmp",
    "sidecar_files",
    "xmp_packet",
]

log = logging.getLogger(__name__)

SUFFIXES = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
CREATOR_TOOL = f"diffusiond {__version__}"
RECORD_KEY = "diffusiond"
"""PNG iTXt keyword of the JSON record."""

# IPTC NewsCodes, Digital Source Type (http://cv.iptc.org/newscodes/digitalsourcetype/).
_IPTC_CODES = "http://cv.iptc.org/newscodes/digitalsourcetype/"
TRAINED = _IPTC_CODES + "trainedAlgorithmicMedia"
"""Made by a trained model from a prompt alone (txt2img)."""
COMPOSITE = _IPTC_CODES + "compositeWithTrainedAlgorithmicMedia"
"""A model redrew or extended an input image (img2img, depth2img, the x4 upscaler)."""
ENHANCED = _IPTC_CODES + "algorithmicallyEnhanced"
"""An input image changed by a plain algorithm, no model (Lanczos upscaling)."""

# JPEG APP1 holds at most 65,535 bytes: 2 for the length, the rest for `Exif\0\0` + TIFF data.
_JPEG_SEGMENT_BYTES = 65_533
_XMP_HEADER_BYTES = len(b"http://ns.adobe.com/xap/1.0/\x00")


class MetadataOptions(BaseModel):
    """Which parts an image carries: the config's `metadata:` section is this plus `c2pa` (daemon/config.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    parameters: bool = True
    """AUTOMATIC1111 infotext (PNG `parameters`, EXIF UserComment)."""
    record: bool = True
    """The job and manifest entry as JSON (PNG iTXt `diffusiond`, XMP `diffusiond:record`)."""
    xmp: bool = True
    """XMP: IPTC DigitalSourceType, the prompt as dc:description, xmp:CreatorTool."""
    exif: bool = True
    """EXIF Software, ImageDescription, Orientation 1 and the tags Exif requires (JPEG, WebP); PNG `Software`."""
    sidecar: Literal["none", "txt", "json"] = "none"
    """Also write `<image stem>.txt` (the infotext) or `<image stem>.json` beside the image."""


# --- AUTOMATIC1111 infotext -------------------------------------------------------------

# Our scheduler names (pipeline/job.py SCHEDULER_NAMES) → A1111's (Sampler, Schedule type).
# A1111 ≥ 1.9 splits "DPM++ 2M Karras" into Sampler "DPM++ 2M" + Schedule type "Karras", and its
# "Automatic" schedule means Karras for DPM++ 2M and DPM++ SDE; so the schedule is written out:
# "Uniform" (the model's own sigmas, what diffusers does without use_karras_sigmas) for the
# k-diffusion samplers, "Automatic" for the timestep samplers (DDIM, PLMS, UniPC), which ignore it.
_A1111_SAMPLERS = A1111_SAMPLERS
# A model's own scheduler arrives as its diffusers class name (Generated.scheduler).
_A1111_CLASSES: dict[str, tuple[str, str]] = {
    "DDIMScheduler": _A1111_SAMPLERS["ddim"],
    "PNDMScheduler": _A1111_SAMPLERS["pndm"],
    "LMSDiscreteScheduler": _A1111_SAMPLERS["lms"],
    "EulerDiscreteScheduler": _A1111_SAMPLERS["euler"],
    "EulerAncestralDiscreteScheduler": _A1111_SAMPLERS["euler_a"],
    "HeunDiscreteScheduler": _A1111_SAMPLERS["heun"],
    "DPMSolverMultistepScheduler": _A1111_SAMPLERS["dpmpp_2m"],
    "DPMSolverSDEScheduler": _A1111_SAMPLERS["dpmpp_sde"],
    "UniPCMultistepScheduler": _A1111_SAMPLERS["unipc"],
    "KDPM2DiscreteScheduler": ("DPM2", "Uniform"),
    "KDPM2AncestralDiscreteScheduler": ("DPM2 a", "Uniform"),
    "DDPMScheduler": ("DDPM", "Automatic"),  # the x4 upscaler's own
    "LCMScheduler": ("LCM", "Automatic"),
}


def a1111_sampler(name: str) -> tuple[str, str | None]:
    """A1111's (Sampler, Schedule type) for one of our scheduler names or a diffusers class name.

    An unknown name is passed through as the sampler, with no schedule type.
    """
    return _A1111_SAMPLERS.get(name) or _A1111_CLASSES.get(name) or (name, None)


def _quote(value: object) -> str:
    """A value as A1111's `quote()` (modules/infotext_utils.py) writes it.

    A1111 JSON-quotes a value holding `,` `:` or a newline, so its parser does not
    split there. We also quote a value holding `"`: unquoted, one that starts and
    ends with `"` would lose them to A1111's `unquote()`; quoted, it reads back as written.
    """
    text = str(value)
    if not any(c in text for c in ',:"\n'):
        return text
    return json.dumps(text, ensure_ascii=False)


def _number(value: float) -> str:
    return f"{value:g}"


def infotext(
    spec: Spec,
    *,
    seed: int,
    size: tuple[int, int],
    model_name: str | None,
    sampler: str,
    model_hash: str | None = None,
    later: Sequence[LaterStage] = (),
    vae: tuple[str, str | None] | None = None,
    lora_hashes: Sequence[tuple[str, str]] = (),
    ti_hashes: Sequence[tuple[str, str]] = (),
    controlnets: Sequence[str | None] = (),
) -> str:
    """The AUTOMATIC1111 `parameters` text: prompt, negative prompt, then `Key: value` pairs.

    `sampler` is one of our scheduler names, a diffusers scheduler class name (the
    model's own), or `lanczos` for a plain upscale, which has no sampling settings.
    The keys follow A1111's `create_infotext` order. For a multi-stage job the text is the
    first stage's (its prompt, seed and size, as A1111 writes a hires-fixed image) with
    `later`'s keys added (`_later_pairs`). `vae` is (name, short hash) of a VAE that replaced the model's.
    `controlnets` names each of the job's controls' models as A1111 does (`name [hash]`).
    """
    plain_upscale = isinstance(spec, UpscaleJob) and spec.method == "lanczos"
    pairs: list[tuple[str, object]] = []
    if not plain_upscale:
        sampler_name, schedule_type = a1111_sampler(sampler)
        pairs += [("Steps", spec.steps), ("Sampler", sampler_name)]
        if schedule_type:
            pairs.append(("Schedule type", schedule_type))
        pairs += [("CFG scale", _number(spec.guidance)), ("Seed", seed)]
    pairs.append(("Size", f"{size[0]}x{size[1]}"))
    # A1111 writes the ControlNet units later, among the extra parameters; here they come before the
    # model's keys, which every A1111 parser reads the same, so that sd-parsers (which splits at every
    # comma and colon, quotes or not) still takes the checkpoint's `Model:`, not the last unit's.
    pairs += _controlnet_pairs(spec, size, controlnets)
    if model_hash and not plain_upscale:
        pairs.append(("Model hash", model_hash))
    if model_name and not plain_upscale:
        pairs.append(("Model", model_name))
    if vae is not None and not plain_upscale:  # a VAE the config put in place of the model's own
        pairs += [*([("VAE hash", vae[1])] if vae[1] else []), ("VAE", vae[0])]
    if isinstance(spec, Img2ImgJob | Depth2ImgJob):
        pairs.append(("Denoising strength", _number(spec.strength)))
    if isinstance(spec, Img2ImgJob) and spec.mask is not None:  # A1111's img2img inpaint keys, as it writes them
        if spec.invert_mask:
            pairs.append(("Mask mode", "Inpaint not masked"))
        if spec.mask_blur:
            pairs.append(("Mask blur", spec.mask_blur))
        if spec.inpaint_full_res:
            pairs += [("Inpaint area", "Only masked"), ("Masked area padding", spec.inpaint_full_res_padding)]
    if spec.clip_skip != 1 and not plain_upscale:
        pairs.append(("Clip skip", spec.clip_skip))
    if spec.eta and not plain_upscale:
        pairs.append(("Eta DDIM", _number(spec.eta)))
    if isinstance(spec, UpscaleJob):
        if plain_upscale:  # A1111's extras tab writes these two
            pairs += [("Postprocess upscale by", _number(spec.scale)), ("Postprocess upscaler", "Lanczos")]
        else:
            pairs += [("Upscaler", spec.method), ("Noise level", spec.noise_level)]
    for key, value in _later_pairs(spec, size, sampler, later):  # a key is written once: the first stage's
        if all(key != written for written, _ in pairs):
            pairs.append((key, value))
    if lora_hashes and not plain_upscale:  # A1111: Lora hashes: "name: 0123456789ab, other: ..."
        pairs.append(("Lora hashes", ", ".join(f"{name}: {short}" for name, short in lora_hashes)))
    if ti_hashes and not plain_upscale:  # A1111: TI hashes: "name: 0123456789ab"
        pairs.append(("TI hashes", ", ".join(f"{name}: {short}" for name, short in ti_hashes)))
    pairs.append(("Version", CREATOR_TOOL))
    settings = ", ".join(f"{key}: {_quote(value)}" for key, value in pairs)
    negative = f"\nNegative prompt: {spec.negative_prompt}" if spec.negative_prompt else ""
    return f"{spec.prompt}{negative}\n{settings}".strip()


_CONTROL_MODULES = {
    "none": "none",
    "invert": "invert (from white bg & black line)",
    "canny": "canny",
    "scribble": "scribble_threshold",  # diffusiond's own: A1111 has no threshold-and-invert module
}
_RESIZE_MODES = {
    "crop": "Crop and Resize",
    "fill": "Resize and Fill",
    "fit": "Resize and Fill",
    "stretch": "Just Resize",
}


def _controlnet_pairs(spec: Spec, size: tuple[int, int], models: Sequence[str | None]) -> list[tuple[str, str]]:
    """`ControlNet 0: "Module: canny, Model: name [hash], Weight: 1.0, ..."`: sd-webui-controlnet's keys
    and order (internal_controlnet/args.py, `infotext_fields`). The control image is preprocessed at the
    size the job runs at: A1111's Pixel Perfect, at that size's short side."""
    pairs = []
    for number, use in enumerate(spec.control):
        model = models[number] if number < len(models) and models[number] else use.model
        thresholds = {"scribble": (use.threshold, -1), "canny": (use.low_threshold, use.high_threshold)}
        low, high = thresholds.get(use.preprocess, (-1, -1))
        unit = {
            "Module": _CONTROL_MODULES[use.preprocess],
            "Model": model,
            "Weight": float(use.weight),
            "Resize Mode": _RESIZE_MODES[use.resize],
            "Processor Res": min(size),
            "Threshold A": float(low),
            "Threshold B": float(high),
            "Guidance Start": float(use.start),
            "Guidance End": float(use.end),
            "Pixel Perfect": True,
            "Control Mode": "Balanced",
        }
        pairs.append((f"ControlNet {number}", ", ".join(f"{key}: {value}" for key, value in unit.items())))
    return pairs


@dataclass(frozen=True)
class LaterStage:
    """A stage after the first of a multi-stage job, as the infotext records it."""

    spec: Spec
    size: tuple[int, int]
    """(width, height) of the images it made."""
    sampler: str
    family: str | None = None
    """The model family that ran it (`sdxl_refiner`: A1111's Refiner keys, not its hires fix)."""


def _later_pairs(
    first: Spec, first_size: tuple[int, int], first_sampler: str, later: Sequence[LaterStage]
) -> list[tuple[str, object]]:
    """A1111's keys for what ran after the first pass, where A1111 has them.

    A redraw right after txt2img is A1111's hires fix (`Denoising strength`, `Hires upscale` or
    `Hires resize`, `Hires steps`, `Hires upscaler`, and the hires prompt, sampler and CFG where
    they differ); an upscale is its extras tab's `Postprocess upscale by` / `Postprocess upscaler`.
    An img2img stage on the SDXL refiner is A1111's `Refiner` / `Refiner switch at` (1 - strength).
    A1111 has no key for any other stage: those are in the JSON record only. `infotext` writes a key once.
    """
    pairs: list[tuple[str, object]] = []
    for position, stage in enumerate(later):
        spec = stage.spec
        if stage.family == "sdxl_refiner" and isinstance(spec, Img2ImgJob):
            # A1111 hands the latents over at `switch at`; a stage redraws the image from 1 - strength.
            pairs += [("Refiner", spec.model), ("Refiner switch at", _number(round(1 - spec.strength, 4)))]
        elif position == 0 and isinstance(first, Txt2ImgJob) and isinstance(spec, Img2ImgJob):
            (w0, h0), (w, h) = first_size, stage.size
            pairs.append(("Denoising strength", _number(spec.strength)))
            same_shape = w * h0 == h * w0
            pairs.append(("Hires upscale", _number(round(w / w0, 4))) if same_shape else ("Hires resize", f"{w}x{h}"))
            pairs += [("Hires steps", spec.steps), ("Hires upscaler", "Lanczos")]
            if spec.prompt != first.prompt:
                pairs.append(("Hires prompt", spec.prompt))
            if spec.negative_prompt != first.negative_prompt:
                pairs.append(("Hires negative prompt", spec.negative_prompt))
            if stage.sampler != first_sampler:
                name, schedule = a1111_sampler(stage.sampler)
                pairs += [("Hires sampler", name), *([("Hires schedule type", schedule)] if schedule else [])]
            if spec.guidance != first.guidance:
                pairs.append(("Hires CFG Scale", _number(spec.guidance)))
        elif isinstance(spec, UpscaleJob):
            upscaler = "Lanczos" if spec.method == "lanczos" else f"SD x4 ({spec.model})"
            pairs += [("Postprocess upscale by", _number(spec.scale)), ("Postprocess upscaler", upscaler)]
    return pairs


# `Key: value` pairs as A1111's parser (infotext_utils.re_param) reads them: a value is
# either a JSON string in double quotes or everything up to the next comma.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict[str, Any]:
    """Split an infotext the way A1111 does: {"prompt", "negative_prompt", "settings": {key: value}}.

    The last line holds the settings when it has at least three `Key: value` pairs;
    every line before it is prompt, up to a line starting `Negative prompt:`.
    Quoted values are unquoted; all values stay strings.
    """
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if not negative and line.startswith("Negative prompt:"):
            negative.append(line.removeprefix("Negative prompt:").strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    settings: dict[str, str] = {}
    for key, value in _PARAM.findall(last):
        if len(value) >= 2 and value[0] == value[-1] == '"':
            with contextlib.suppress(ValueError):  # A1111 keeps such a value as written
                value = json.loads(value)
        settings[key] = value
    return {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative), "settings": settings}


# --- XMP --------------------------------------------------------------------------------

_NS = {
    "x": "adobe:ns:meta/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "dc": "http://purl.org/dc/elements/1.1/",
    "xmp": "http://ns.adobe.com/xap/1.0/",
    "Iptc4xmpExt": "http://iptc.org/std/Iptc4xmpExt/2008-02-29/",
    # Our own namespace for the record. A URN: the project owns no domain to put a schema under.
    "diffusiond": "urn:diffusiond:xmp:1.0/",
}
# XML 1.0 allows tab, newline, carriage return and everything from U+0020 except surrogates
# and U+FFFE/U+FFFF; a prompt with other control characters would make the packet invalid.
_NOT_XML = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_text(text: str) -> str:
    return escape(_NOT_XML.sub("", text), {'"': "&quot;"})


def digital_source_type(task: str, method: str | None = None, *, guided: bool = False) -> str:
    """The IPTC digital source type of a task's output: machine-made, or a machine-changed input
    (`guided`: txt2img that a ControlNet steered by the user's picture)."""
    if task == "txt2img" and not guided:
        return TRAINED
    if task == "upscale" and method == "lanczos":
        return ENHANCED
    return COMPOSITE


def xmp_packet(
    *,
    source_type: str | None,
    description: str | None,
    record_json: str | None = None,
    creator_tool: str = CREATOR_TOOL,
) -> bytes:
    """An XMP packet (x:xmpmeta / rdf:RDF): IPTC source type, dc:description, xmp:CreatorTool.

    `record_json` goes in as `diffusiond:record` (JPEG and WebP carry the record here;
    PNG has its own iTXt). A packet with no source type has no creator tool either:
    it only carries the record.
    """
    lines = []
    if source_type is not None:
        lines.append(f"   <xmp:CreatorTool>{_xml_text(creator_tool)}</xmp:CreatorTool>")
        lines.append(f"   <Iptc4xmpExt:DigitalSourceType>{_xml_text(source_type)}</Iptc4xmpExt:DigitalSourceType>")
    if description:
        lines += [
            "   <dc:description>",
            "    <rdf:Alt>",
            f'     <rdf:li xml:lang="x-default">{_xml_text(description)}</rdf:li>',
            "    </rdf:Alt>",
            "   </dc:description>",
        ]
    if record_json is not None:
        lines.append(f"   <diffusiond:record>{_xml_text(record_json)}</diffusiond:record>")
    namespaces = "".join(f'\n    xmlns:{prefix}="{uri}"' for prefix, uri in _NS.items() if prefix not in ("x", "rdf"))
    body = "\n".join(lines)
    packet = (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        f'<x:xmpmeta xmlns:x="{_NS["x"]}" x:xmptk="{_xml_text(creator_tool)}">\n'
        f' <rdf:RDF xmlns:rdf="{_NS["rdf"]}">\n'
        f'  <rdf:Description rdf:about=""{namespaces}>\n'
        f"{body}\n"
        "  </rdf:Description>\n"
        " </rdf:RDF>\n"
        "</x:xmpmeta>\n"
        '<?xpacket end="w"?>'
    )
    return packet.encode("utf-8")


def read_xmp(data: bytes | str) -> dict[str, str | None]:
    """Source type, creator tool, description and diffusiond record (JSON text) from any tool's XMP.

    Properties may be written as elements or as attributes of rdf:Description; a
    URI value may be text or `rdf:resource`. Raises ValueError if it is not XML.
    """
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    # The packet wrapper is processing instructions; a NUL or padding after it is common.
    text = text.strip("\x00 \t\r\n\ufeff")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise ValueError(f"XMP is not well-formed XML: {exc}") from exc
    wanted = {
        f"{{{_NS['Iptc4xmpExt']}}}DigitalSourceType": "digital_source_type",
        f"{{{_NS['xmp']}}}CreatorTool": "creator_tool",
        f"{{{_NS['dc']}}}description": "description",
        f"{{{_NS['diffusiond']}}}record": "record",
    }
    found: dict[str, str | None] = dict.fromkeys(wanted.values())
    for description in root.iter(f"{{{_NS['rdf']}}}Description"):
        for attribute, value in description.attrib.items():
            if attribute in wanted:
                found[wanted[attribute]] = found[wanted[attribute]] or value
        for element in description:
            if element.tag in wanted:
                found[wanted[element.tag]] = found[wanted[element.tag]] or _xmp_value(element)
    return found


def _xmp_value(element: ET.Element) -> str | None:
    resource = element.get(f"{{{_NS['rdf']}}}resource")
    if resource:
        return resource
    items = list(element.iter(f"{{{_NS['rdf']}}}li"))
    if items:  # a language alternative: x-default first
        lang = "{http://www.w3.org/XML/1998/namespace}lang"
        items.sort(key=lambda li: li.get(lang) != "x-default")
        return items[0].text or ""
    return (element.text or "").strip() or None


# --- Writing ----------------------------------------------------------------------------


def _job_facts(spec: Spec | None, record: Mapping[str, Any]) -> tuple[str, str | None, str, bool]:
    """Task, upscale method, prompt and whether a control steered it, from the spec or else the record's `job`."""
    if spec is not None:
        method = spec.method if isinstance(spec, UpscaleJob) else None
        return spec.task, method, spec.prompt, bool(spec.control)
    job = record.get("job")
    job = job if isinstance(job, Mapping) else {}
    task = str(job.get("task", record.get("task", "txt2img")))
    return task, job.get("method"), str(job.get("prompt", "")), bool(job.get("control"))


def encode(
    image: Image.Image,
    output: OutputSpec,
    *,
    parameters: str,
    record: Mapping[str, Any],
    spec: Spec | None = None,
    options: MetadataOptions | None = None,
) -> bytes:
    """The image file's bytes with the metadata `options` ask for embedded.

    `record` is a JSON-serialisable mapping (the job and its manifest entry).
    `spec` gives the XMP its source type and description; without it they come
    from `record["job"]`.

    JPEG keeps EXIF and XMP in APP1 segments of at most 64 KB each. When the
    record does not fit in the XMP segment it is left out of the JPEG (with a log
    warning; the manifest beside the image always has it), then the prompt in
    dc:description; when a prompt of tens of thousands of characters does not fit
    in EXIF, ImageDescription goes, then UserComment. WebP and PNG have no such limit.
    """
    options = options or MetadataOptions()
    task, method, prompt, guided = _job_facts(spec, record)
    record_json = json.dumps(record, ensure_ascii=False, sort_keys=True) if options.record else None
    buffer = io.BytesIO()
    if output.format == "png":
        info = PngImagePlugin.PngInfo()
        if options.parameters:
            info.add_text("parameters", parameters)  # tEXt; Pillow writes iTXt when not Latin-1
        if record_json is not None:
            info.add_itxt(RECORD_KEY, record_json)
        if options.xmp:
            packet = xmp_packet(source_type=digital_source_type(task, method, guided=guided), description=prompt)
            info.add_itxt("XML:com.adobe.xmp", packet.decode("utf-8"), lang="", tkey="")
        if options.exif:
            info.add_text("Software", CREATOR_TOOL)
        image.save(buffer, format="PNG", pnginfo=info)
        return buffer.getvalue()

    limit = _JPEG_SEGMENT_BYTES if output.format == "jpeg" else None
    extra: dict[str, Any] = {}
    exif = _fit(
        lambda parts: _dump_exif(parts, basics=options.exif, size=image.size),
        {
            "ImageDescription": prompt if options.exif else None,
            "UserComment": parameters if options.parameters else None,
        },
        limit=limit,
        what="EXIF",
    )
    if exif:
        # JPEG's APP1 starts `Exif\0\0`; WebP's EXIF chunk is the bare TIFF data (WebP container spec).
        extra["exif"] = exif if output.format == "jpeg" else exif.removeprefix(b"Exif\x00\x00")
    source_type = digital_source_type(task, method, guided=guided) if options.xmp else None
    xmp = _fit(
        lambda parts: _xmp_or_none(source_type, **parts),
        {"record_json": record_json, "description": prompt if options.xmp else None},
        limit=None if limit is None else limit - _XMP_HEADER_BYTES,
        what="XMP",
    )
    if xmp:
        extra["xmp"] = xmp
    if output.format == "jpeg":
        if image.mode not in ("RGB", "L", "CMYK"):
            image = image.convert("RGB")
        image.save(buffer, format="JPEG", quality=output.quality, dpi=(72, 72), **extra)  # JFIF agrees with EXIF
    else:
        image.save(buffer, format="WEBP", quality=output.quality, **extra)
    return buffer.getvalue()


def _fit(
    build: Callable[[dict[str, Any]], bytes | None], parts: dict[str, Any], *, limit: int | None, what: str
) -> bytes | None:
    """`build(parts)`, leaving parts out in their order until the bytes fit in `limit`."""
    while True:
        data = build(parts)
        if data is None or limit is None or len(data) <= limit:
            return data
        dropped = next((name for name, value in parts.items() if value is not None), None)
        if dropped is None:
            return data
        log.warning("%s over %d bytes for a JPEG segment: %s is left out of the image", what, limit, dropped)
        parts = parts | {dropped: None}


def _xmp_or_none(source_type: str | None, *, record_json: str | None, description: str | None) -> bytes | None:
    if source_type is None and record_json is None:
        return None
    return xmp_packet(source_type=source_type, description=description, record_json=record_json)


# TIFF field types (TIFF 6.0, section 2).
_ASCII, _SHORT, _LONG, _RATIONAL, _UNDEFINED = 2, 3, 4, 5, 7
_Entry = tuple[int, int, bytes]
"""(field type, count, value bytes), big-endian."""


def _ascii(text: str) -> _Entry:
    data = text.encode("utf-8") + b"\x00"  # UTF-8, as exiftool writes and reads EXIF strings
    return (_ASCII, len(data), data)


def _short(value: int) -> _Entry:
    return (_SHORT, 1, struct.pack(">H", value))


def _long(value: int) -> _Entry:
    return (_LONG, 1, struct.pack(">I", value))


def _undefined(data: bytes) -> _Entry:
    return (_UNDEFINED, len(data), data)


def _dump_exif(parts: Mapping[str, Any], *, basics: bool, size: tuple[int, int]) -> bytes | None:
    """EXIF (`Exif\\0\\0` + TIFF) with IFD0 and the Exif IFD.

    Serialised here rather than with `piexif.dump`, which leaves out the Exif IFD's
    next-IFD offset, so the first value overlaps the IFD (`exiftool -validate`:
    "Value for ExifIFD tag 0x9286 UserComment overlaps IFD"; hMatoba/Piexif#116).
    With `basics`, the tags Exif 2.32 requires of a JPEG come along, so that
    `exiftool -validate` finds nothing to report.
    """
    ifd0: dict[int, _Entry] = {}
    exif_ifd: dict[int, _Entry] = {}
    if basics:
        if parts["ImageDescription"]:
            ifd0[piexif.ImageIFD.ImageDescription] = _ascii(parts["ImageDescription"])
        ifd0[piexif.ImageIFD.Orientation] = _short(1)  # the pixels are stored upright: nothing to rotate
        ifd0[piexif.ImageIFD.XResolution] = (_RATIONAL, 1, struct.pack(">II", 72, 1))
        ifd0[piexif.ImageIFD.YResolution] = (_RATIONAL, 1, struct.pack(">II", 72, 1))
        ifd0[piexif.ImageIFD.ResolutionUnit] = _short(2)  # inches
        ifd0[piexif.ImageIFD.Software] = _ascii(CREATOR_TOOL)
        ifd0[piexif.ImageIFD.YCbCrPositioning] = _short(1)  # centered
        exif_ifd[piexif.ExifIFD.ComponentsConfiguration] = _undefined(b"\x01\x02\x03\x00")  # Y Cb Cr
        exif_ifd[piexif.ExifIFD.FlashpixVersion] = _undefined(b"0100")
        exif_ifd[piexif.ExifIFD.ColorSpace] = _short(1)  # sRGB
        exif_ifd[piexif.ExifIFD.PixelXDimension] = _long(size[0])
        exif_ifd[piexif.ExifIFD.PixelYDimension] = _long(size[1])
    if parts["UserComment"] is not None:
        comment = piexif.helper.UserComment.dump(parts["UserComment"], encoding="unicode")  # UTF-16 big-endian
        exif_ifd[piexif.ExifIFD.UserComment] = _undefined(comment)
    if not ifd0 and not exif_ifd:
        return None
    if exif_ifd:
        exif_ifd[piexif.ExifIFD.ExifVersion] = _undefined(b"0232")
        ifd0[piexif.ImageIFD.ExifTag] = _long(0)  # a placeholder of the right size, set below
        exif_offset = 8 + len(_ifd(ifd0, start=8))
        ifd0[piexif.ImageIFD.ExifTag] = _long(exif_offset)
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8) + _ifd(ifd0, start=8)
    if exif_ifd:
        tiff += _ifd(exif_ifd, start=len(tiff))
    return b"Exif\x00\x00" + tiff


def _ifd(entries: Mapping[int, _Entry], *, start: int) -> bytes:
    """One IFD at offset `start`: count, 12-byte entries by tag, next-IFD offset 0, then the long values."""
    values_at = start + 2 + 12 * len(entries) + 4
    table = struct.pack(">H", len(entries))
    values = b""
    for tag in sorted(entries):
        kind, count, data = entries[tag]
        if len(data) <= 4:
            field = data.ljust(4, b"\x00")
        else:
            field = struct.pack(">I", values_at + len(values))
            values += data + b"\x00" * (len(data) % 2)  # values start on a word boundary
        table += struct.pack(">HHI", tag, kind, count) + field
    return table + b"\x00\x00\x00\x00" + values


def sidecar_files(
    image_name: str,
    *,
    parameters: str,
    record: Mapping[str, Any],
    options: MetadataOptions,
) -> list[tuple[str, bytes]]:
    """The sidecar files `options.sidecar` asks for, as (file name, bytes), for the caller to write.

    `txt`: `<image stem>.txt` holding the infotext, as A1111 writes it beside an image.
    `json`: `<image stem>.json` holding {"parameters": infotext, "record": record}.
    """
    stem = PurePath(image_name).stem
    if options.sidecar == "txt":
        return [(f"{stem}.txt", parameters.encode("utf-8"))]
    if options.sidecar == "json":
        data = {"diffusiond": __version__, "parameters": parameters, "record": dict(record)}
        return [(f"{stem}.json", json.dumps(data, indent=1, ensure_ascii=False).encode("utf-8"))]
    return []


# --- Reading ----------------------------------------------------------------------------


def _user_comment(value: bytes, tiff: bytes) -> str | None:
    """Decode an EXIF UserComment: an 8-byte charset prefix, then the text."""
    prefix, body = value[:8], value[8:]
    if prefix == b"UNICODE\x00":
        if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
            return body.decode("utf-16")
        # No BOM: the file's byte order (piexif and A1111 write big-endian).
        return body.decode("utf-16-le" if tiff[:2] == b"II" else "utf-16-be", "replace")
    if prefix in (b"ASCII\x00\x00\x00", b"\x00" * 8):
        return body.decode("utf-8", "replace").rstrip("\x00") or None
    return value.decode("utf-8", "replace").rstrip("\x00") or None


def _raw_exif(image: Image.Image) -> bytes | None:
    exif = image.info.get("exif")
    return exif.removeprefix(b"Exif\x00\x00") if isinstance(exif, bytes) and exif else None


def read_parameters(path: str | PurePath | Image.Image) -> str | None:
    """The infotext of an image (a path or an open image): PNG text or EXIF UserComment; None if none."""
    if isinstance(path, Image.Image):
        return _read_parameters(path)
    with Image.open(path) as image:
        return _read_parameters(image)


def _read_parameters(image: Image.Image) -> str | None:
    if "parameters" in image.info:
        return str(image.info["parameters"])
    tiff = _raw_exif(image)
    if not tiff:
        return None
    comment = image.getexif().get_ifd(0x8769).get(piexif.ExifIFD.UserComment)
    if not isinstance(comment, bytes) or not comment:
        return None
    return _user_comment(comment, tiff)


def read_record(image: Image.Image) -> dict[str, Any] | None:
    """The JSON record diffusiond embedded (PNG iTXt `diffusiond`, else XMP `diffusiond:record`).

    None if there is none; ValueError when one is there but is not a JSON object.
    """
    text = image.info.get(RECORD_KEY)
    xmp = image.info.get("xmp") or ""
    xmp_text = xmp.decode("utf-8", "replace") if isinstance(xmp, bytes) else str(xmp)
    if text is None and _NS["diffusiond"] in xmp_text:  # another tool's XMP, even a broken one, is not ours
        text = read_xmp(xmp_text)["record"]
    if text is None:
        return None
    record = json.loads(str(text))
    if not isinstance(record, dict):
        raise ValueError(f"the diffusiond record is JSON but not an object: {type(record).__name__}")
    return record
