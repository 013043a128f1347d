"""The job file: its schema and its validation, complete before any model is touched.

A job file is YAML with one job per document (`---` between them). Each document
is merged over the config's defaults (`all`, then its task, then the hot folder's
profile) and validated into a frozen pydantic model, one class per `Task`. Every
error names the file, the job's position, the field, the bad value and what is
allowed. `read_job_file` is the only reader of job files. No torch here.

A spec answers the questions the daemon asks of a job (its input image, the size
it runs at, its denoising steps, which jobs may share its pipeline call), so a new
task is a new class here, not a hunt through the daemon.
"""

from __future__ import annotations

import difflib
import errno
import itertools
import math
import os
import posixpath
import re
import reprlib
import secrets
import stat
import typing
import unicodedata
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from diffusiond.pipeline.errors import Code, JobRejected, job_context
from diffusiond.pipeline.families import ModelKind

# Kept in step with pipeline/schedulers.py (that module imports diffusers; this one must not).
SCHEDULER_NAMES = (
    "ddim",
    "pndm",
    "plms",
    "lms",
    "euler",
    "euler_a",
    "heun",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "dpmpp_sde",
    "unipc",
)
A1111_SAMPLERS: dict[str, tuple[str, str]] = {
    "ddim": ("DDIM", "Automatic"),
    "pndm": ("PLMS", "Automatic"),
    "plms": ("PLMS", "Automatic"),
    "lms": ("LMS", "Uniform"),
    "euler": ("Euler", "Uniform"),
    "euler_a": ("Euler a", "Uniform"),
    "heun": ("Heun", "Uniform"),
    "dpmpp_2m": ("DPM++ 2M", "Uniform"),
    "dpmpp_2m_karras": ("DPM++ 2M", "Karras"),
    "dpmpp_sde": ("DPM++ SDE", "Uniform"),
    "unipc": ("UniPC", "Automatic"),
}
"""Our scheduler names as A1111 writes them: (Sampler, Schedule type)."""
A1111_SCHEDULER_NAMES: dict[str, str] = {
    **{sampler.lower(): ours for ours, (sampler, _schedule) in reversed(A1111_SAMPLERS.items())},
    **{f"{s} {t}".lower(): ours for ours, (s, t) in A1111_SAMPLERS.items() if t not in ("Automatic", "Uniform")},
}
"""A1111's sampler names (`Euler a`, `DPM++ 2M`, and `DPM++ 2M Karras` as A1111 1.x wrote it), any case,
accepted as `scheduler:` and stored as ours."""
A1111_FIELDS = {
    "cfg_scale": "guidance",
    "cfg": "guidance",
    "sampler": "scheduler",
    "sampler_name": "scheduler",
    "sampler_index": "scheduler",
    "denoising_strength": "strength",
    "n_iter": "count",
    "batch_size": "count",
    "width": "size",
    "height": "size",
    "negative": "negative_prompt",
    "init_images": "image",
    "sd_model_checkpoint": "model",
}
"""Fields A1111 (its API and its infotext) spells otherwise: an unknown field of these names gets a
"did you mean" to ours (one spelling per field keeps job files readable and the schema strict)."""
_PROMPT_EDITING = re.compile(r"(?<!\\)\[[^\[\]]*[:|][^\[\]]*(?<!\\)\]")
"""`[from:to:when]`, `[a|b]`: A1111's prompt editing and alternation (an escaped `\\[` is text)."""
JOB_SUFFIXES = (".yaml", ".yml")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class Task(StrEnum):
    """What a job makes; the `task:` field of a job file."""

    TXT2IMG = "txt2img"
    """An image from the prompt alone."""
    IMG2IMG = "img2img"
    """The input image redrawn by the prompt (a sketch made into a picture)."""
    UPSCALE = "upscale"
    """The input image made larger: the prompt-guided x4 model, or plain Lanczos."""
    DEPTH2IMG = "depth2img"
    """The input redrawn keeping its depth (the SD 2 depth model): the shapes stay, the look changes."""

    @property
    def takes_image(self) -> bool:
        """Whether the task runs on an input image (its `image:`, or the job file's same-stem sketch)."""
        return self is not Task.TXT2IMG


TASKS = tuple(str(task) for task in Task)

TASKS_BY_KIND: dict[ModelKind, tuple[Task, ...]] = {
    ModelKind.SD1: (Task.TXT2IMG, Task.IMG2IMG),
    ModelKind.SD2: (Task.TXT2IMG, Task.IMG2IMG),
    ModelKind.SDXL: (Task.TXT2IMG, Task.IMG2IMG),
    ModelKind.SDXL_REFINER: (Task.IMG2IMG,),
    ModelKind.SD1_INPAINT: (Task.IMG2IMG,),  # with a mask; none is a mask of the whole image
    ModelKind.SD2_INPAINT: (Task.IMG2IMG,),
    ModelKind.SDXL_INPAINT: (Task.IMG2IMG,),
    ModelKind.UPSCALER_X4: (Task.UPSCALE,),
    ModelKind.DEPTH2IMG: (Task.DEPTH2IMG,),
    ModelKind.UNKNOWN: (),
}
"""The tasks a model of each family can run (its pipelines: `models.PIPELINES`)."""
SEED_MAX = 2**32 - 1
FIX_FIELD = "correct the field in the job file and drop the file into the inbox again"

SAFE_LOADER: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""`yaml.safe_load`'s loader, in C where PyYAML was built with libyaml (8x faster on a job file)."""


def _parse_size(value: Any) -> Any:
    """Accept `512x512`, `512` or `[512, 768]` (width first) as (width, height)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, str):
        parts = value.lower().replace(" ", "").split("x")
        if len(parts) == 1 and parts[0].isdigit():
            return (int(parts[0]), int(parts[0]))
        if len(parts) == 2 and all(p.isdigit() for p in parts):
            return (int(parts[0]), int(parts[1]))
        raise ValueError("size must look like 512x768 (width x height)")
    if isinstance(value, list | tuple) and len(value) == 2:
        return tuple(value)
    raise ValueError("size must look like 512x768 (width x height), 512, or [512, 768]")


def _check_size(value: tuple[int, int]) -> tuple[int, int]:
    width, height = value
    if width < 8 or height < 8 or width % 8 or height % 8:
        raise ValueError(f"width and height must be multiples of 8 and at least 8, got {width}x{height}")
    return value


SizeText = Annotated[str, Field(pattern=r"^\s*[0-9]+\s*([xX]\s*[0-9]+\s*)?$")]
Size = Annotated[tuple[int, int], BeforeValidator(_parse_size, json_schema_input_type=SizeText | int | tuple[int, int])]
"""`512x768` (width x height), `512`, or `[512, 768]`: all three in the schema editors get."""


OUTPUT_NAME_FIELDS = ("stem", "job_id", "seed", "n", "model", "date", "task")
"""What `output.name` may name in braces: the job file's stem, the job id, the image's seed and
number (1-based), the model's config name, the date (YYYYMMDD) and the task."""


class OutputSpec(BaseModel):
    """How the images are encoded and named."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)
    format: Literal["png", "jpeg", "webp"] = "png"
    quality: int = Field(95, ge=1, le=100)
    name: str | None = Field(None, max_length=120)
    """A name for each image, without extension, e.g. `{stem}-{seed}-{n}`; fields: stem, job_id, seed,
    n, model, date, task. Default `{job_id}-{n}`. A name taken in the outbox gets `-2`, `-3`, ...: never replaced."""

    @field_validator("name")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is None:
            return None
        sample = dict.fromkeys(OUTPUT_NAME_FIELDS, "x")
        try:
            formatted = value.format_map(sample)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"{exc!s} is not a field of output.name; fields: {{{'}, {'.join(OUTPUT_NAME_FIELDS)}}}"
            ) from None
        if not formatted.strip() or formatted.startswith(".") or any(c in formatted for c in "/\\\0"):
            raise ValueError("output.name must make a plain file name: not empty, no / or \\, not starting with .")
        return value


# The marks' limits are owned here, not by pipeline/watermark.py (which imports them): validation
# needs them, and must not import the watermark module's numpy, SciPy, drawing and OpenCV.
WatermarkMethod = Literal["tiled", "dwtDct", "dwtDctSvd", "rivaGan"]
WatermarkPosition = Literal["top-left", "top-right", "bottom-left", "bottom-right", "center"]
WATERMARK_METHODS: tuple[WatermarkMethod, ...] = typing.get_args(WatermarkMethod)
WATERMARK_POSITIONS: tuple[WatermarkPosition, ...] = typing.get_args(WatermarkPosition)
WATERMARK_PAYLOAD_MAX_BYTES = 10
"""The invisible mark's payload: 10 bytes of UTF-8 text (its 96-bit frame adds a 16-bit check)."""
WATERMARK_MIN_SIDE_PX = 256
"""The tiled mark's frame (256 px on the shorter side); the DWT marks need 256 x 256 too."""


class LoraUse(BaseModel):
    """One LoRA of a job: a name from the config's `loras:`, at a weight (A1111's `<lora:name:weight>`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)
    name: str = Field(min_length=1)
    weight: float = Field(1.0, ge=-5, le=5)


LORA_TAG = re.compile(r"<lora:([^:<>]+)(?::([^:<>]*))?>")
"""A1111's `<lora:name>` / `<lora:name:weight>` in a prompt: the LoRA is used, the tag is not text."""
LORA_TASKS = ("txt2img", "img2img")
"""The tasks whose models take LoRAs (SD 1.x, 2.x and SDXL): a tag in another task's prompt is dropped."""


ResizeMode = Literal["crop", "fill", "stretch", "fit"]
RESIZE_MODES: tuple[ResizeMode, ...] = typing.get_args(ResizeMode)
PREPROCESSORS = ("none", "invert", "scribble", "canny")
"""What a control does to its image first (pipeline/controls.py): nothing; invert it (dark lines on
white, as a sketch is drawn, become the white-on-black lines ControlNets were trained on); threshold
and invert it into a scribble; or find its edges with OpenCV's Canny. None needs downloaded weights."""
MAX_CONTROLS = 4
"""ControlNets per job: each is a second network run at every step."""


class ControlUse(BaseModel):
    """One ControlNet of a job: a model from the config's `controlnets:` guided by an image
    (A1111's ControlNet unit)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)
    model: str = Field(min_length=1)
    """A name from the config's `controlnets:` (the file or folder name without extension)."""
    image: str | None = None
    """Relative to the job file, inside the inbox; None: the job's input (its `image:` or same-stem sketch)."""
    weight: float = Field(1.0, ge=0, le=2)
    """How strongly the control steers (A1111's Weight; diffusers' controlnet_conditioning_scale)."""
    preprocess: Literal["none", "invert", "scribble", "canny"] = "none"
    start: float = Field(0.0, ge=0, le=1)
    """The fraction of the steps at which the control starts steering (A1111's Guidance Start)."""
    end: float = Field(1.0, ge=0, le=1)
    """The fraction of the steps at which it stops (Guidance End)."""
    resize: ResizeMode = "crop"
    """How the control image is made the size the job runs at (A1111's Resize Mode; `fit` as `fill`)."""
    threshold: int = Field(128, ge=0, le=255)
    """`scribble`: pixels darker than this are lines."""
    low_threshold: int = Field(100, ge=0, le=255)
    """`canny`: OpenCV's first hysteresis threshold."""
    high_threshold: int = Field(200, ge=0, le=255)
    """`canny`: OpenCV's second hysteresis threshold."""

    @model_validator(mode="after")
    def _ordered(self) -> ControlUse:
        if self.start >= self.end:
            raise ValueError(f"start ({self.start:g}) must be before end ({self.end:g})")
        if self.preprocess == "canny" and self.low_threshold > self.high_threshold:
            raise ValueError(
                f"low_threshold ({self.low_threshold}) must not be above high_threshold ({self.high_threshold})"
            )
        return self


def _control_list(value: Any) -> Any:
    """`control:` may be one control (a mapping) or a list of them."""
    return [value] if isinstance(value, dict) else value


Controls = Annotated[tuple[ControlUse, ...], BeforeValidator(_control_list)]
CONTROL_TASKS = ("txt2img", "img2img")
"""The tasks a ControlNet steers (SD 1.x, 2.x and SDXL models)."""


class InvisibleWatermark(BaseModel):
    """A payload hidden in the pixels (pipeline/watermark.py); `method` None = the config's."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)
    text: str = Field("diffusiond", min_length=1)
    method: WatermarkMethod | None = None

    @field_validator("text")
    @classmethod
    def _fits(cls, value: str) -> str:
        size = len(value.encode("utf-8"))
        if size > WATERMARK_PAYLOAD_MAX_BYTES or not value.isprintable():
            raise ValueError(
                f"the invisible watermark carries at most {WATERMARK_PAYLOAD_MAX_BYTES} bytes of printable text "
                f"(UTF-8); this is {size} bytes"
            )
        return value


class VisibleWatermark(BaseModel):
    """A text label drawn on the image (a logo can only come from the config)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)
    text: str = Field("AI generated", min_length=1)
    position: WatermarkPosition = "bottom-right"
    size: float = Field(0.05, gt=0, le=0.5)
    """Text height as a fraction of the image's shorter side."""
    margin: float = Field(0.02, ge=0, le=0.25)
    opacity: float = Field(0.6, ge=0, le=1)


class WatermarkSpec(BaseModel):
    """`false` turns a mark off for this job; omitted = the config's choice."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)
    invisible: InvisibleWatermark | Literal[False] | None = None
    visible: VisibleWatermark | Literal[False] | None = None


class _JobFields(BaseModel):
    """Fields every task shares, and the questions asked of any job (each task answers for itself)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)
    model: str | None = None
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = Field(30, ge=1)
    guidance: float = Field(7.5, ge=0, le=50)
    scheduler: str | None = None
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    count: int = Field(1, ge=1)
    loras: tuple[LoraUse, ...] = ()
    """LoRAs from the config's `loras:`, e.g. `[{name: film-grain, weight: 0.7}]`; A1111's
    `<lora:name:0.7>` in the prompt adds to them (txt2img and img2img)."""
    clip_skip: Literal[1, 2] = 1
    """A1111's Clip skip: 1 conditions on the text encoder's last layer, 2 on the one before (what
    many SD 1.x anime models were trained with). Not for SDXL, which already takes the one before."""
    eta: float = Field(0.0, ge=0, le=1)
    """DDIM's eta: the noise added at each step (0 is deterministic DDIM); the ddim scheduler only."""
    control: Controls = ()
    """ControlNets that steer txt2img or img2img, e.g. `{model: scribble, preprocess: scribble}` (one
    mapping or a list, at most 4); each reads its `image:`, else the job's input image."""
    output: OutputSpec = OutputSpec()
    watermark: WatermarkSpec = WatermarkSpec()
    then: tuple[StageSpec, ...] = ()
    """Stages run in turn on every image this job makes (img2img, upscale, depth2img), e.g. a hires fix
    then an upscale; each inherits prompt, negative_prompt and seed unless it sets its own. Stage 1 is
    the job's own task, stage 2 the first of these."""
    keep: Literal["final", "all"] = "final"
    """With `then:`: `final` publishes only the last stage's images, `all` every stage's."""
    priority: int = Field(0, ge=-1000, le=1000)
    """Claim order: of the files ready to claim, a higher priority goes first, then the older file
    (a file's priority is its jobs' highest). A profile or the config's defaults may set it."""
    sweep: dict[str, list[Any]] = Field(default_factory=dict)
    """Fields to vary, each with its values: the job runs once per combination (the product), e.g.
    `{seed: [1, 2, 3], guidance: [5, 7.5]}` is 6 jobs; each job's record has its own values here."""

    @field_validator("sweep")
    @classmethod
    def _one_combination(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        """A job file's sweep is expanded before validation; one that reaches a job unexpanded came
        from a profile or the config's defaults, which do not sweep."""
        if any(len(values) != 1 for values in value.values()):
            raise ValueError(
                "a sweep is expanded only from a job file; a profile or the config's defaults cannot sweep"
            )
        return value

    task: Task
    """Each task's class narrows it to its own member: the tag of the union."""

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _no_prompt_editing(cls, value: str) -> str:
        """A1111's prompt editing and alternation change the prompt during sampling: not supported, and
        refused rather than read as weights (`[a:b:0.5]` would be `a:b:0.5` at 1/1.1)."""
        if found := _PROMPT_EDITING.search(value):
            raise ValueError(
                f"A1111's prompt editing / alternation {found.group(0)!r} is not supported; write the prompt "
                "without it, or use a stage with its own prompt (then:), or escape the brackets as \\[ \\]"
            )
        return value

    @field_validator("scheduler", mode="before")
    @classmethod
    def _a1111_sampler(cls, value: Any) -> Any:
        """`DPM++ 2M Karras`, `Euler a`, ...: A1111's name for one of ours, taken as ours."""
        if isinstance(value, str) and value not in SCHEDULER_NAMES:
            return A1111_SCHEDULER_NAMES.get(" ".join(value.split()).lower(), value)
        return value

    @property
    def input_image(self) -> str | None:
        """The `image:` the job names (relative to its job file); None for txt2img, or for its same-stem sketch."""
        return None

    @property
    def needs_image(self) -> bool:
        """Whether the job runs on an input image: its task's, or the one a control reads by default."""
        return self.task.takes_image or any(use.image is None for use in self.control)

    def named_inputs(self) -> dict[str, str]:
        """Every file the job names, by the field that names it (`image`, `mask`, `control.0.image`)."""
        named = {"image": self.input_image} | {f"control.{i}.image": use.image for i, use in enumerate(self.control)}
        return {field: name for field, name in named.items() if name is not None}

    @property
    def uses_model(self) -> bool:
        """False for work done without a model (a Lanczos upscale): nothing to load, nothing to batch."""
        return True

    def denoise_steps(self) -> int:
        """The denoising steps the pipeline really runs: what progress counts to."""
        return self.steps

    def run_size(self, input_size: tuple[int, int] | None) -> tuple[int, int]:
        """(width, height) the pipeline works at, given the input image's upright size (None for txt2img)."""
        raise NotImplementedError

    def output_size(self, input_size: tuple[int, int] | None) -> tuple[int, int]:
        """(width, height) of each image the job makes: what the pixel limit is checked against."""
        return self.run_size(input_size)

    def batch_key(self, input_size: tuple[int, int] | None) -> tuple[Any, ...] | None:
        """Jobs with equal keys can share one pipeline call; None means the job runs alone.

        Everything the pipeline takes as one value for the whole call is in the key;
        prompts, negative prompts, seeds and input images are per image.
        """
        if not self.uses_model or self.control or getattr(self, "mask", None):
            return None  # its own call: the control and mask images are the job's (pipeline/controls.py)
        return (
            self.task,
            self.model,
            self.run_size(input_size),
            self.steps,
            self.guidance,
            self.scheduler,
            self.clip_skip,
            self.eta,
            self.loras,
            *self._call_values(),
        )

    def _call_values(self) -> tuple[Any, ...]:
        """The task's own values that one pipeline call takes for every image."""
        return ()


class Txt2ImgJob(_JobFields):
    """Text to image."""

    task: Literal[Task.TXT2IMG] = Task.TXT2IMG
    size: Size = (512, 512)
    image: str | None = None
    """With `control:` only: the picture its controls read (relative to the job file; None: the
    job file's same-stem sketch). txt2img itself starts from noise."""

    @property
    def input_image(self) -> str | None:
        return self.image

    def run_size(self, input_size: tuple[int, int] | None) -> tuple[int, int]:
        return self.size


class _InputJob(_JobFields):
    """Fields of the tasks that run on an input image."""

    image: str | None = None
    """Relative to the job file, inside the inbox; None: the job file's same-stem sketch."""

    @property
    def input_image(self) -> str | None:
        return self.image


class RedrawJob(_InputJob):
    """The input redrawn by the prompt (img2img, depth2img): noised to `strength`, then denoised.

    One runner (pipeline/img2img.py) makes both: the depth model estimates the depth itself.
    """

    strength: float = Field(0.75, gt=0, le=1)
    size: Size | None = None
    """None: the input's own size, cropped to multiples of 8 (a photo over `limits.max_pixels` is
    scaled down to fit first, keeping its aspect ratio)."""
    resize: ResizeMode = "crop"
    """How the input is made `size`: `crop` (scale to cover, centre crop; A1111's "crop and resize"),
    `fill` (scale to fit inside, edges extended; "resize and fill"), `stretch` ("just resize"), or
    `fit` (scale to fit inside `size`: the result keeps the input's aspect ratio)."""

    def denoise_steps(self) -> int:
        return int(self.steps * self.strength)

    def run_size(self, input_size: tuple[int, int] | None) -> tuple[int, int]:
        if self.size is None:
            return fit_multiple_of_8(_need_input(input_size))
        if self.resize == "fit":
            return fit_inside(_need_input(input_size), self.size)
        return self.size

    def _call_values(self) -> tuple[Any, ...]:
        return (self.strength,)


class Img2ImgJob(RedrawJob):
    """Image to image: `image` is redrawn; `strength` 1.0 ignores it almost entirely.

    With a mask it is inpainting: only the mask's white part is redrawn (with an inpainting model, or
    a normal one as masked img2img), and the rest keeps the input's pixels.
    """

    task: Literal[Task.IMG2IMG]
    mask: str | None = None
    """Relative to the job file: white is redrawn, black kept. None: the input's `<stem>.mask.png`
    (`.jpg`, `.webp`) beside it when there is one, else no mask."""
    mask_blur: int = Field(4, ge=0, le=64)
    """Pixels of Gaussian blur on the mask's edge, so the redrawn part blends in (A1111's Mask blur)."""
    invert_mask: bool = False
    """Redraw the black part instead (A1111's "Inpaint not masked")."""
    inpaint_full_res: bool = False
    """Redraw only the masked area, cropped with `inpaint_full_res_padding` and scaled to the job's
    size, then pasted back (A1111's "Only masked"): detail for a small area of a big image."""
    inpaint_full_res_padding: int = Field(32, ge=0, le=256)
    """Pixels of context around the masked area with `inpaint_full_res`."""

    def named_inputs(self) -> dict[str, str]:
        return super().named_inputs() | ({"mask": self.mask} if self.mask is not None else {})

    def _call_values(self) -> tuple[Any, ...]:
        # An inpainting model's jobs share a call without masks of their own: their mask settings too.
        return (self.strength, self.mask_blur, self.invert_mask, self.inpaint_full_res, self.inpaint_full_res_padding)


class UpscaleJob(_InputJob):
    """Upscale `image` by `scale`, with the x4 model (prompt-guided) or plain Lanczos."""

    task: Literal[Task.UPSCALE]
    method: Literal["sd-x4", "lanczos"] = "sd-x4"
    scale: float = Field(4, gt=1, le=8)
    noise_level: int = Field(20, ge=0, le=350)
    steps: int = Field(20, ge=1)
    guidance: float = Field(9.0, ge=0, le=50)

    @property
    def uses_model(self) -> bool:
        return self.method != "lanczos"

    def run_size(self, input_size: tuple[int, int] | None) -> tuple[int, int]:
        return _need_input(input_size)

    def output_size(self, input_size: tuple[int, int] | None) -> tuple[int, int]:
        width, height = _need_input(input_size)
        return (round(width * self.scale), round(height * self.scale))

    def _call_values(self) -> tuple[Any, ...]:
        return (self.noise_level,)


class Depth2ImgJob(RedrawJob):
    """Image to image that keeps the input's depth (SD 2 depth model): the shapes stay, the look changes."""

    task: Literal[Task.DEPTH2IMG]
    strength: float = Field(0.8, gt=0, le=1)


def fit_inside(size: tuple[int, int], box: tuple[int, int]) -> tuple[int, int]:
    """`size` scaled to fit inside `box` keeping its aspect ratio, in multiples of 8 (at least 8)."""
    scale = min(box[0] / size[0], box[1] / size[1])
    return (max(8, int(size[0] * scale) // 8 * 8), max(8, int(size[1] * scale) // 8 * 8))


def fit_pixels(size: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    """`size` scaled down (never up) to at most `max_pixels`, keeping its aspect ratio, in multiples of 8."""
    scale = min(1.0, (max_pixels / (size[0] * size[1])) ** 0.5)
    return (max(8, int(size[0] * scale) // 8 * 8), max(8, int(size[1] * scale) // 8 * 8))


def fit_multiple_of_8(size: tuple[int, int]) -> tuple[int, int]:
    """An input's own size cropped down to multiples of 8 (the VAE needs them): img2img's size when none is given."""
    return (size[0] - size[0] % 8, size[1] - size[1] % 8)


def _need_input(input_size: tuple[int, int] | None) -> tuple[int, int]:
    if input_size is None:
        raise ValueError("this task runs on an input image, and none was given")
    return input_size


Spec = Txt2ImgJob | Img2ImgJob | UpscaleJob | Depth2ImgJob
StageSpec = Annotated[Img2ImgJob | UpscaleJob | Depth2ImgJob, Field(discriminator="task")]
"""A stage of `then:`: a task that runs on an image."""
for _model in (_JobFields, Txt2ImgJob, _InputJob, RedrawJob, Img2ImgJob, UpscaleJob, Depth2ImgJob):
    _model.model_rebuild()  # `then:` names the classes defined after the base

JobSpec = Annotated[Spec, Field(discriminator="task")]
_SPEC_ADAPTER: TypeAdapter[Spec] = TypeAdapter(JobSpec)
STAGE_TASKS = (Task.IMG2IMG, Task.UPSCALE, Task.DEPTH2IMG)
MAX_STAGES = 8
"""Stages per job, its own task included: each keeps its images in the claim folder until the next ends."""
STAGE_INHERITS = ("prompt", "negative_prompt", "seed")
"""What a stage takes from the stage before it unless it sets its own."""
STAGE_INHERITS_WITH_MODEL = ("steps", "guidance", "scheduler", "loras")
"""What a stage also takes from the stage before when it runs on the same model (a hires fix)."""
NOT_IN_A_STAGE = {
    "sweep": "a sweep is the job's; set it on the job (each combination runs every stage)",
    "count": "each image of the job goes through every stage; set `count:` on the job",
    "image": "a stage runs on the images of the stage before it",
    "output": "the job's `output:` applies to every stage's images; set it on the job",
    "watermark": "the job's `watermark:` applies to the images it publishes; set it on the job",
    "keep": "`keep:` is the job's; set it on the job",
    "priority": "a job file is claimed as a whole: set `priority:` on the job",
    "then": "stages do not nest; list every stage in the job's `then:`",
    "control": "ControlNets steer the job's first stage, from its input; a stage runs on the image before",
    "mask": "a mask goes with the job's input image; a stage runs on the images of the stage before it",
    **dict.fromkeys(
        ("mask_blur", "invert_mask", "inpaint_full_res", "inpaint_full_res_padding"),
        "a stage has no mask (it redraws the whole image before); set it on the job with its mask",
    ),
}
"""Fields only a job has, and why a stage cannot set them."""


def spec_record(spec: Spec) -> dict[str, Any]:
    """The job as run, for records people and tools read: every field, each stage without the
    fields only a job has (a stage's own `count` is always 1; the job's `output` applies)."""
    return spec.model_dump(mode="json", exclude={"then": {"__all__": set(NOT_IN_A_STAGE)}} if spec.then else None)


def job_file_fields(record: Mapping[str, Any], keep: Collection[str] = ()) -> dict[str, Any]:
    """A job's record (`spec_record`: every field as run) as a job file needs it: a field at its
    default is left out, unless `keep` names it (a field the config's defaults would change)."""
    task = Task(record.get("task", Task.TXT2IMG))
    defaults = _TASK_MODELS[task].model_construct(task=task).model_dump(mode="json")  # every default, unvalidated
    unset = object()
    return {k: v for k, v in record.items() if k in keep or k == "task" or defaults.get(k, unset) != v}


def stage_record(spec: Spec) -> dict[str, Any]:
    """One stage's fields as run (a manifest's `stages[].job`): without the job's own fields."""
    return spec.model_dump(mode="json", exclude={"then", "keep", "output", "watermark", "priority"})


def stage_specs(spec: Spec) -> tuple[Spec, ...]:
    """The job's stages in order: its own task (stage 1), then each of `then:`."""
    return (spec, *spec.then)


def stage_sizes(spec: Spec, input_size: tuple[int, int] | None) -> list[tuple[int, int]]:
    """(width, height) of the images each stage makes, given the job's input image (None for txt2img)."""
    sizes: list[tuple[int, int]] = []
    size = input_size
    for stage in stage_specs(spec):
        size = stage.output_size(size)
        sizes.append(size)
    return sizes


def check_stage_sizes(spec: Spec, input_size: tuple[int, int] | None, max_pixels: int, *, image: str | None) -> None:
    """Every stage's images within the pixel limit; the error names the first stage that is over it."""
    for number, (stage, (width, height)) in enumerate(
        zip(stage_specs(spec), stage_sizes(spec, input_size), strict=True), start=1
    ):
        if width * height <= max_pixels:
            continue
        grows = "image" if number == 1 else ("scale" if isinstance(stage, UpscaleJob) else "size")
        raise JobRejected(
            f"the {'result' if number == 1 else f'result of stage {number}'} would be {width}x{height} "
            f"({width * height} pixels), over the limit of {max_pixels}",
            code=Code.OVER_LIMIT,
            field=grows,
            value=image if grows == "image" else getattr(stage, grows),
            stage=number if len(spec.then) else None,
            fix="use a smaller input image, size or scale, or raise limits.max_pixels in the config",
        )


def job_schema() -> dict[str, Any]:
    """The JSON Schema of one job (one YAML document of a job file), from the models above.

    `diffusiond schema` prints it, for editors (yaml-language-server applies it to each document
    of a multi-job file). It knows the fields; the daemon's config knows more (model names, limits,
    defaults and a default task: a job without `task:` is checked as txt2img here).
    """
    schema = _SPEC_ADAPTER.json_schema(mode="validation")
    schema.pop("discriminator", None)  # OpenAPI's keyword: a job may leave `task` out (txt2img)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "diffusiond job",
        "description": 'One job of a diffusiond job file (README.md, "A job file"); `---` separates jobs.',
        **schema,
    }


_TASK_MODELS: dict[Task, type[_JobFields]] = {
    Task.TXT2IMG: Txt2ImgJob,
    Task.IMG2IMG: Img2ImgJob,
    Task.UPSCALE: UpscaleJob,
    Task.DEPTH2IMG: Depth2ImgJob,
}


@dataclass(frozen=True)
class Limits:
    """Upper bounds from the config, so one job cannot take the machine for a day."""

    max_pixels: int = 1024 * 1024 * 4
    max_steps: int = 150
    max_count: int = 16
    max_file_bytes: int = 50 * 1024 * 1024
    """Per job file and per input image."""
    max_jobs_per_file: int = 1_000
    """YAML documents per job file: tiny ones (`{}` and `---`) could pack millions into `max_file_bytes`."""


@dataclass(frozen=True)
class InputImage:
    """A job's input image as the pre-check found it: decoded once, then carried, never asked again."""

    name: str
    """Its path relative to the inbox, as the user dropped it."""
    path: Path
    """Where the file is now (the claim folder)."""
    size_px: tuple[int, int]
    """(width, height) upright, with the EXIF orientation applied."""
    sha256: str
    """Of the file's bytes, for the manifest."""

    def probe_record(self) -> dict[str, Any]:
        """What `jobs.json` keeps of the probe, beside the image's name (`path` is rebuilt from the name)."""
        return {"size": list(self.size_px), "sha256": self.sha256}

    @classmethod
    def from_record(cls, name: str, probe: Mapping[str, Any], *, folder: Path) -> InputImage:
        width, height = probe["size"]
        return cls(name, folder / name, (int(width), int(height)), str(probe["sha256"]))


@dataclass(frozen=True)
class Job:
    """One validated job, where it came from, and its input image once the pre-check has probed it."""

    job_id: str
    source: str
    """The job file's path relative to the inbox, as the user dropped it."""
    index: int
    """1-based position of the job in its file."""
    spec: Spec
    image: InputImage | None = None
    """Set for tasks that take an input image, by the pre-check."""
    mask: InputImage | None = None
    """An img2img job's mask (its `mask:` or the input's `<stem>.mask.png`): inpainting."""
    controls: tuple[InputImage, ...] = ()
    """One image per `control:` entry, in order (the job's `image` where the control names none)."""

    @property
    def task(self) -> Task:
        return self.spec.task

    @property
    def input_size(self) -> tuple[int, int] | None:
        return self.image.size_px if self.image is not None else None


@dataclass(frozen=True)
class Rules:
    """What validation checks a job against, all taken from the config."""

    models: Mapping[str, ModelKind]
    defaults: Mapping[str, Mapping[str, Any]]
    """Field defaults: key `all` for every task, then one key per task."""
    limits: Limits = Limits()
    model_defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Per model, over the task defaults (e.g. an SD 2 model's habitual negative prompt)."""
    loras: Mapping[str, Any] | None = None
    """The config's LoRA names (None where unknown: `submit --spool` with no daemon announced)."""
    controlnets: Mapping[str, Any] | None = None
    """The config's ControlNet names (None where unknown, like `loras`)."""
    native_sizes: Mapping[str, int] = field(default_factory=dict)
    """Per model, the side in pixels it was trained at: txt2img's size when the job gives none."""
    watermark_required: bool = False
    """The config demands the invisible watermark: a job may not turn it off."""
    check_models: bool = True
    """False where the daemon's models are not known (`submit --spool` with no daemon announced): left to it."""


def spec_from_dict(data: Mapping[str, Any]) -> Spec:
    """Rebuild a spec saved earlier with `spec.model_dump()` (claim records)."""
    return _SPEC_ADAPTER.validate_python(dict(data))


def read_job_file(
    path: Path,
    *,
    label: str,
    rules: Rules,
    profile: Mapping[str, Any] | None = None,
) -> list[Spec]:
    """The only reader of job files: a plain file within the size limit, UTF-8, YAML, every job valid.

    `label` is the file's path relative to the inbox (what errors name, and what image
    paths are resolved against); `path` is where it is now. One message per fault.
    """
    with job_context(path=label):
        data = read_plain_file(
            path,
            what="job file",
            max_bytes=rules.limits.max_file_bytes,
            code=Code.NOT_A_JOB,
            fix_size="split the file, or raise limits.max_file_bytes in the config",
        )
    if not data:
        raise JobRejected(
            "the job file is empty (0 bytes)",
            code=Code.NOT_A_JOB,
            path=label,
            fix="write at least one job, e.g. `task: txt2img` and `prompt: ...`, and drop the file again",
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JobRejected(
            f"job file is not UTF-8 text ({exc.reason} at byte {exc.start})",
            code=Code.YAML_SYNTAX,
            path=label,
            fix="save the job file as UTF-8 text",
        ) from exc
    return parse_job_text(text, path=label, rules=rules, profile=profile)


def read_plain_file(path: Path, *, what: str, max_bytes: int, code: Code, fix_size: str) -> bytes:
    """The bytes of a regular file, read without following a link or blocking, up to `max_bytes`.

    Whatever a user names `*.yaml` or `*.png` must not hang or crash the daemon: a FIFO would
    block a plain open() for ever, a link could point at /dev/zero or out of the inbox, and a
    file can grow while it is read. `code` is the rejection's for a file that is no plain
    file or cannot be read; one over the limit is `over_limit` with `fix_size`. The caller's
    `job_context` says which file it was.
    """
    try:
        # Looked at first so that what it is can be named: open() fails on a socket with "No such
        # device or address", which reads like a permission problem.
        kind = file_kind(os.lstat(path).st_mode)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC) if kind is None else -1
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise JobRejected(
                f"cannot read the {what}: {exc.strerror or exc}",
                code=code,
                fix=f"make the {what} readable by the daemon's user (on a service install: the group diffusiond)",
            ) from exc
        kind = "a symbolic link"  # replaced by a link between the two calls
    if kind is not None:
        raise _not_plain(what, kind, code)
    try:
        st = os.fstat(fd)
        if (kind := file_kind(st.st_mode)) is not None:  # replaced between lstat and open
            raise _not_plain(what, kind, code)
        chunks: list[bytes] = []
        size = 0
        while size <= max_bytes and (chunk := os.read(fd, min(1 << 20, max_bytes + 1 - size))):
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise JobRejected(
            f"cannot read the {what}: {exc.strerror or exc}", code=code, fix="drop the file again"
        ) from exc
    finally:
        os.close(fd)
    if size > max_bytes:
        raise JobRejected(
            f"{what} is {max(size, st.st_size)} bytes, over the limit of {max_bytes}",
            code=Code.OVER_LIMIT,
            fix=fix_size,
        )
    return b"".join(chunks)


def file_kind(mode: int) -> str | None:
    """What a file that is not a plain file is, for a message (`a socket`); None for a plain file."""
    for test, kind in (
        (stat.S_ISREG, None),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a pipe (FIFO)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return "an unknown kind of file"


def _not_plain(what: str, kind: str, code: Code) -> JobRejected:
    if kind == "a symbolic link":
        return JobRejected(
            f"the {what} is a symbolic link, which the daemon does not follow",
            code=code,
            fix=f"drop the {what} itself, not a link to it",
        )
    return JobRejected(f"the {what} is {kind}, not a plain file", code=code, fix=f"drop a plain {what}")


def parse_job_text(
    text: str,
    *,
    path: str,
    rules: Rules,
    profile: Mapping[str, Any] | None = None,
) -> list[Spec]:
    """Validate every job of a job file's text; the first wrong one rejects the whole file.

    `path` is the job file relative to the inbox; image paths are resolved against
    its folder and must stay inside the inbox. Seeds are not filled in here.
    """
    limit = rules.limits.max_jobs_per_file
    try:
        # Read one document past the limit and no further: the rest of a flood is never parsed.
        read = list(itertools.islice(yaml.load_all(text, Loader=SAFE_LOADER), limit + 1))
    # PyYAML raises a bare ValueError for values it cannot build: `2001-02-30`, an integer of 5,000 digits.
    except (yaml.YAMLError, ValueError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise JobRejected(
            f"not valid YAML{where}: {problem}",
            code=Code.YAML_SYNTAX,
            path=path,
            fix="fix the YAML syntax (a YAML linter shows the spot) and drop the file again",
        ) from exc
    if len(read) > limit:
        raise JobRejected(
            f"the file holds more than {limit} jobs (YAML documents), the limit per job file",
            code=Code.OVER_LIMIT,
            path=path,
            fix=f"split the jobs into files of at most {limit} each",
        )
    documents = [doc for doc in read if doc is not None]
    if not documents:
        raise JobRejected(
            "the file holds no job",
            code=Code.NOT_A_JOB,
            path=path,
            fix="write at least one job, e.g. `task: txt2img` and `prompt: ...`",
        )
    specs: list[Spec] = []
    for i, doc in enumerate(documents, start=1):
        expanded = _expand_sweep(doc, path=path, index=i, max_jobs=limit - len(specs))
        swept = [validate_job(d, path=path, index=i, rules=rules, profile=profile) for d in expanded]
        if len(expanded) > 1 and (images := len(swept) * swept[0].count) > rules.limits.max_count:
            raise JobRejected(
                f"the sweep makes {len(swept)} jobs of {swept[0].count} image(s), {images} images: over the "
                f"limit of {rules.limits.max_count} images (limits.max_count) for one job",
                code=Code.OVER_LIMIT,
                path=path,
                job_index=i,
                field="sweep",
                value=shown(doc.get("sweep")),
                fix="sweep fewer values (or split the sweep into several jobs), or raise limits.max_count",
            )
        specs += swept
        if len(specs) > limit:
            raise JobRejected(
                f"the file's jobs, with its sweeps expanded, are more than {limit}, the limit per job file",
                code=Code.OVER_LIMIT,
                path=path,
                field="sweep",
                fix=f"split the jobs into files of at most {limit} each",
            )
    return specs


SWEEP_EXCLUDED = (
    "task",
    "then",
    "keep",
    "output",
    "watermark",
    "sweep",
    "count",
    "image",
    "mask",
    "control",
    "priority",
)
"""Fields a sweep cannot vary: what a job is, and what shapes its outputs."""


_ALTERNATIVES = re.compile(r"(?<!\\)\{([^{}]*\|[^{}]*)\}")
"""`{red|blue}` in a prompt: alternatives, one job each (an escaped `\\{` is text)."""


def _alternatives(prompt: str) -> list[str]:
    """Every prompt the `{a|b}` groups make, in order: `a {red|blue} {fox|cat}` is four."""
    groups = [m.group(1).split("|") for m in _ALTERNATIVES.finditer(prompt)]
    texts = _ALTERNATIVES.split(prompt)[::2]  # the text around the groups
    prompts = []
    for choice in itertools.product(*groups):
        pieces = [texts[0]]
        for option, after in zip(choice, texts[1:], strict=True):
            pieces += [option, after]
        prompts.append("".join(pieces))
    return prompts


def _expand_sweep(document: Any, *, path: str, index: int, max_jobs: int) -> list[Any]:
    """A document with `sweep:` as one document per combination of its values (the product, in the
    order written), each with `sweep:` holding its own values; any other document as it is."""
    if not isinstance(document, dict):
        return [document]
    prompt = document.get("prompt")
    if isinstance(prompt, str) and _ALTERNATIVES.search(prompt):
        sweep = document.get("sweep", {})
        if isinstance(sweep, dict) and "prompt" in sweep:
            with job_context(path=path, job_index=index):
                raise JobRejected(
                    "the prompt has alternatives ({a|b}) and the sweep varies the prompt too",
                    field="sweep.prompt",
                    value=shown(sweep["prompt"]),
                    fix="write the alternatives in the prompt or list the prompts in sweep.prompt, not both",
                )
        # A1111's dynamic prompts, combinatorial: every choice of every {a|b} group, as a sweep of prompts.
        document = document | {"sweep": {"prompt": _alternatives(prompt), **(sweep if isinstance(sweep, dict) else {})}}
    if "sweep" not in document:
        return [document]
    sweep = document["sweep"]
    with job_context(path=path, job_index=index):
        if not isinstance(sweep, dict) or not sweep:
            raise JobRejected(
                f"`sweep:` must map fields to lists of values, got {shown_text(sweep)}",
                field="sweep",
                value=shown(sweep),
                fix="write e.g. `sweep: {seed: [1, 2, 3], guidance: [5, 7.5]}`",
            )
        for key, values in sweep.items():
            if key in SWEEP_EXCLUDED or not isinstance(key, str):
                raise JobRejected(
                    f"a sweep cannot vary {shown_text(key)}; it varies fields such as seed, guidance, steps, "
                    f"strength, scheduler, prompt, model or size (not {', '.join(SWEEP_EXCLUDED)})",
                    field=f"sweep.{key}",
                    value=shown(values),
                    fix="sweep another field, or write separate jobs (`---`)",
                )
            if not isinstance(values, list) or not values:
                raise JobRejected(
                    f"sweep.{key} must be a non-empty list of values, got {shown_text(values)}",
                    field=f"sweep.{key}",
                    value=shown(values),
                    fix=f"write e.g. `{key}: [first, second]`",
                )
        if (jobs := math.prod(len(values) for values in sweep.values())) > max_jobs:
            raise JobRejected(
                f"the sweep makes {jobs} jobs, more than the file may still hold ({max_jobs} of "
                "limits.max_jobs_per_file)",
                code=Code.OVER_LIMIT,
                field="sweep",
                value=shown(sweep),
                fix="sweep fewer values, or split the sweep into several files",
            )
    keys = list(sweep)
    return [
        {**document, **dict(zip(keys, combination, strict=True))}
        | {"sweep": {k: [v] for k, v in zip(keys, combination, strict=True)}}
        for combination in itertools.product(*(sweep[k] for k in keys))
    ]


def validate_job(
    document: Any,
    *,
    path: str,
    index: int,
    rules: Rules,
    profile: Mapping[str, Any] | None = None,
) -> Spec:
    """Merge one document over the defaults and validate it completely."""
    with job_context(path=path, job_index=index):
        return _validate(document, path, rules, profile)


def _validate(document: Any, path: str, rules: Rules, profile: Mapping[str, Any] | None) -> Spec:
    if not isinstance(document, dict):
        raise JobRejected(
            f"a job must be a mapping of fields, got {type(document).__name__} {shown_text(document)}",
            code=Code.NOT_A_JOB,
            fix="write each job as `field: value` lines, e.g. `prompt: a red fox`",
        )
    profile = dict(profile or {})
    task_name = document.get("task", profile.get("task", rules.defaults.get("all", {}).get("task", "txt2img")))
    if task_name not in TASKS:
        raise JobRejected(
            f"unknown task {shown_text(task_name)}; allowed: {', '.join(TASKS)}",
            field="task",
            value=shown(task_name),
            fix="set `task:` to txt2img, img2img or upscale",
        )
    task = Task(task_name)
    task_defaults = _task_defaults(rules, task)
    model = document.get("model", profile.get("model", task_defaults.get("model")))
    merged = _defaults(rules, task, model, set(_TASK_MODELS[task].model_fields), profile)
    merged.update(document)
    merged["task"] = task
    if task is Task.TXT2IMG and "size" not in merged and isinstance(model, str) and model in rules.native_sizes:
        merged["size"] = rules.native_sizes[model]
    stages = merged.pop("then", None)
    try:
        spec = _SPEC_ADAPTER.validate_python(merged)
    except ValidationError as exc:
        raise _translate(exc, task) from exc
    spec = _with_prompt_loras(spec)
    _check_limits(spec, rules)
    _check_model(spec, rules)
    _check_loras(spec, rules)
    _check_controls(spec, rules)
    if stages:
        spec = spec.model_copy(update={"then": _validate_stages(stages, spec, rules)})
    if not task.takes_image:  # the sizes of every stage are known now; an input's once it is probed
        check_stage_sizes(spec, None, rules.limits.max_pixels, image=None)
    # The mark goes on the images the job publishes: the last stage's.
    size = stage_sizes(spec, None)[-1] if not task.takes_image else None
    if isinstance(spec, RedrawJob) and not spec.then:
        size = spec.size
    if rules.watermark_required and size is not None and min(size) < WATERMARK_MIN_SIDE_PX:
        raise JobRejected(
            f"this daemon's config requires the invisible watermark, which needs at least {WATERMARK_MIN_SIDE_PX} px "
            f"on each side; {size[0]}x{size[1]} is too small",
            field="size",
            value=f"{size[0]}x{size[1]}",
            fix=f"make the image at least {WATERMARK_MIN_SIDE_PX}x{WATERMARK_MIN_SIDE_PX}",
        )
    if rules.watermark_required and spec.watermark.invisible is False:
        raise JobRejected(
            "this daemon's config requires the invisible watermark; a job cannot turn it off",
            field="watermark.invisible",
            value=False,
            fix="remove `invisible: false` from the job's watermark",
        )
    _check_image_path(spec, path)
    return spec


def _task_defaults(rules: Rules, task: Task) -> dict[str, Any]:
    """The config's defaults for a task: `all`, then the task's own."""
    return {**rules.defaults.get("all", {}), **rules.defaults.get(task, {})}


def _defaults(
    rules: Rules, task: Task, model: Any, allowed: set[str], profile: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A job's (or stage's) fields before its own: the task's defaults, the model's, then the hot
    folder's profile. They fill only fields in `allowed`; a field the user wrote is checked strictly."""
    merged: dict[str, Any] = {}
    model_defaults = rules.model_defaults.get(model, {}) if isinstance(model, str) else {}
    for layer in (_task_defaults(rules, task), model_defaults, profile or {}):
        merged.update({k: v for k, v in layer.items() if k in allowed})
    return merged


def _validate_stages(stages: Any, job: Spec, rules: Rules) -> tuple[Spec, ...]:
    """Each stage of `then:` merged over its task's defaults and what it inherits, validated completely."""
    if not isinstance(stages, list):
        raise JobRejected(
            f"`then:` must be a list of stages, got {type(stages).__name__} {shown_text(stages)}",
            field="then",
            value=shown(stages),
            fix="write `then:` as a list, e.g. `then: [{task: img2img, strength: 0.35}, {task: upscale}]`",
        )
    if len(stages) + 1 > MAX_STAGES:
        raise JobRejected(
            f"the job has {len(stages) + 1} stages; at most {MAX_STAGES} are allowed",
            code=Code.OVER_LIMIT,
            field="then",
            value=f"{len(stages)} stages",
            fix="split the work into two jobs (the second on the first one's images)",
        )
    resolved: list[Spec] = []
    previous = job
    for number, document in enumerate(stages, start=2):
        with job_context(stage=number):
            previous = _validate_stage(document, previous, rules)
        resolved.append(previous)
    return tuple(resolved)


def _validate_stage(document: Any, previous: Spec, rules: Rules) -> Spec:
    if not isinstance(document, dict):
        raise JobRejected(
            f"a stage must be a mapping of fields, got {type(document).__name__} {shown_text(document)}",
            field="then",
            value=shown(document),
            fix="write each stage as a mapping, e.g. `- {task: img2img, strength: 0.35}`",
        )
    for key, why in NOT_IN_A_STAGE.items():
        if key in document:
            raise JobRejected(
                f"a stage cannot set '{key}': {why}", field=key, value=shown(document[key]), fix=f"remove '{key}'"
            )
    task_name = document.get("task")
    if task_name not in STAGE_TASKS:
        tasks = ", ".join(STAGE_TASKS)
        why = (
            "txt2img makes an image from the prompt alone, so it can only be a job's first stage"
            if task_name == Task.TXT2IMG
            else f"{'a stage must name its task' if task_name is None else f'unknown task {shown_text(task_name)}'}"
        )
        raise JobRejected(
            f"{why}; a stage's task is one of: {tasks}",
            field="task",
            value=shown(task_name),
            fix="set the stage's `task:` to img2img, upscale or depth2img",
        )
    task = Task(task_name)
    model = document.get("model")
    if model is None:  # the stage before's model when it can run this task (a hires fix), else the task's default
        model = previous.model if _can_run(previous.model, task, rules) else _task_defaults(rules, task).get("model")
    merged = _defaults(rules, task, model, set(_TASK_MODELS[task].model_fields) - set(NOT_IN_A_STAGE))
    merged.update({k: getattr(previous, k) for k in STAGE_INHERITS})
    if model is not None and model == previous.model:
        merged.update({k: getattr(previous, k) for k in STAGE_INHERITS_WITH_MODEL})
    merged |= dict(document) | {"task": task, "model": model}
    try:
        spec = _SPEC_ADAPTER.validate_python(merged)
    except ValidationError as exc:
        raise _translate(exc, task, stage=True) from exc
    if not spec.uses_model and "model" not in document:  # a Lanczos stage: no model made its images
        spec = spec.model_copy(update={"model": None})
    spec = _with_prompt_loras(spec)
    _check_limits(spec, rules)
    _check_model(spec, rules)
    _check_loras(spec, rules)
    return spec


def _with_prompt_loras(spec: Spec) -> Spec:
    """The prompt's `<lora:name:weight>` tags added to `loras` (a name already there keeps its weight)."""
    if spec.task not in LORA_TASKS:
        return spec
    uses = list(spec.loras)
    for name, weight in LORA_TAG.findall(spec.prompt):
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise JobRejected(
                f"<lora:{name}:{weight}> has a weight that is not a number",
                field="prompt",
                value=shown(spec.prompt),
                fix=f"write the tag as <lora:{name}:0.7> (or <lora:{name}> for weight 1)",
            ) from None
        if all(use.name != name for use in uses):
            uses.append(LoraUse(name=name, weight=value))
    return spec.model_copy(update={"loras": tuple(uses)}) if len(uses) != len(spec.loras) else spec


def _check_loras(spec: Spec, rules: Rules) -> None:
    if not spec.loras:
        return
    if spec.task not in LORA_TASKS:
        raise JobRejected(
            f"LoRAs are for txt2img and img2img; a {spec.task} job cannot use them",
            field="loras",
            value=[use.name for use in spec.loras],
            fix="remove `loras:` from this job",
        )
    if rules.loras is None or not rules.check_models:
        return
    for use in spec.loras:
        if use.name not in rules.loras:
            known = ", ".join(sorted(rules.loras)) or "(none: the config has no `loras:`)"
            raise JobRejected(
                f"LoRA {shown_text(use.name)} is not in the config's loras; known: {known}",
                field="loras",
                value=use.name,
                fix="use a LoRA name from the list (the file name without .safetensors), or add the file to "
                "the config's `loras:` folder",
            )


def _check_controls(spec: Spec, rules: Rules) -> None:
    if isinstance(spec, Txt2ImgJob) and spec.image is not None and not spec.needs_image:  # no control reads it
        if not spec.control:
            raise JobRejected(
                "txt2img starts from noise: its `image:` is only the picture its ControlNets read, and it has none",
                field="image",
                value=shown(spec.image),
                fix="add `control: {model: NAME}` to guide the image by it, or use `task: img2img` to redraw it",
            )
        raise JobRejected(
            "every control names its own image, so the job's `image:` would not be read",
            field="image",
            value=shown(spec.image),
            fix="remove `image:`, or remove `image:` from the control that should read it",
        )
    if not spec.control:
        return
    if spec.task not in CONTROL_TASKS:
        raise JobRejected(
            f"ControlNets steer txt2img and img2img; a {spec.task} job cannot use them",
            field="control",
            value=[use.model for use in spec.control],
            fix="remove `control:` from this job",
        )
    if len(spec.control) > MAX_CONTROLS:
        raise JobRejected(
            f"the job has {len(spec.control)} controls; at most {MAX_CONTROLS} are allowed",
            code=Code.OVER_LIMIT,
            field="control",
            value=[use.model for use in spec.control],
            fix=f"keep at most {MAX_CONTROLS} controls in the job",
        )
    if rules.controlnets is None or not rules.check_models:
        return
    for number, use in enumerate(spec.control):
        if use.model not in rules.controlnets:
            known = ", ".join(sorted(rules.controlnets)) or "(none: the config has no `controlnets:`)"
            raise JobRejected(
                f"ControlNet {shown_text(use.model)} is not in the config's controlnets; known: {known}",
                field=f"control.{number}.model",
                value=use.model,
                fix="use a ControlNet name from the list (its file or folder name), or add it to the config's "
                "`controlnets:` folder",
            )


def check_default_fields(fields: Mapping[str, Any], tasks: Sequence[Task]) -> None:
    """JobRejected for the first key that no job of `tasks` has, with a "did you mean".

    Defaults fill only the fields a job's task has (`defaults.all` holds fields of several), so
    a misspelt key would otherwise be dropped without a word: the config check calls this.
    """
    known = sorted(set().union(*(_TASK_MODELS[task].model_fields for task in tasks)) - {"task"})
    kind = "a job of any task" if set(tasks) == set(Task) else f"a {' or '.join(tasks)} job"
    for key, value in fields.items():
        if key in known or key == "task":
            continue
        guess = difflib.get_close_matches(str(key), known, n=1)
        hint = f" (did you mean '{guess[0]}'?)" if guess else ""
        if (ours := A1111_FIELDS.get(str(key))) in known:
            hint = f" (did you mean '{ours}'? '{key}' is AUTOMATIC1111's name for it)"
        raise JobRejected(
            f"unknown field '{key}'{hint}; fields {kind} accepts: {', '.join(known)}",
            field=str(key),
            value=shown(value),
            fix=f"rename or remove '{key}'",
        )


def _can_run(model: str | None, task: Task, rules: Rules) -> bool:
    """Whether a configured model runs `task`; a model of unknown family is taken to redraw like it generates."""
    kind = rules.models.get(model) if model is not None else None
    if model is None or kind is None or kind is ModelKind.UNKNOWN:
        return model is not None and task is Task.IMG2IMG
    return task in TASKS_BY_KIND[kind]


def _translate(exc: ValidationError, task: Task, *, stage: bool = False) -> JobRejected:
    """Turn pydantic's first error into one that names field, value and what is allowed."""
    error = exc.errors()[0]
    loc = [str(part) for part in error["loc"]]
    if loc and loc[0] == task:  # the discriminated union puts the task tag first
        loc = loc[1:]
    # Unions name their members in loc ("VisibleWatermark", "literal[False]"): not fields the user wrote.
    loc = [part for part in loc if not (part[:1].isupper() or part.startswith(("literal[", "function-")))]
    field = ".".join(loc) or "task"
    raw = error.get("input")
    value = shown(raw)
    if error["type"] == "extra_forbidden":
        section = _section_model(_TASK_MODELS[task], loc[:-1])
        known = sorted(set(section.model_fields) - (set(NOT_IN_A_STAGE) if stage and len(loc) == 1 else set()))
        guess = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f" (did you mean '{guess[0]}'?)" if guess else ""
        if len(loc) == 1 and (ours := A1111_FIELDS.get(loc[0])) in known:
            hint = f" (did you mean '{ours}'? '{loc[0]}' is AUTOMATIC1111's name for it)"
        kind = f"{task} {'stage' if stage else 'job'}"
        where_in = f"'{'.'.join(loc[:-1])}' of a {kind}" if len(loc) > 1 else f"a {kind}"
        return JobRejected(
            f"unknown field '{field}'{hint}; fields {where_in} accepts: {', '.join(known)}",
            field=field,
            value=value,
            fix=f"rename or remove '{field}'",
        )
    message = error["msg"].removeprefix("Value error, ")
    return JobRejected(f"{message}, got {shown_text(raw)}", field=field, value=value, fix=FIX_FIELD)


_SHOWN_CHARS = 200


def shown(value: Any) -> Any:
    """A wrong value as the report's `value:` holds it: itself when short, else `shown_text(value)`."""
    if _too_many_nodes(value):
        return shown_text(value)
    text = _repr(value)
    return value if text is not None and len(text) <= _SHOWN_CHARS else shown_text(value)


def shown_text(value: Any) -> str:
    """A wrong value as a message shows it: its repr, cut short.

    A job file can hold a 100,000-character prompt, or an integer too long for `repr` (4,300
    digits and more, which raises): neither may swell a report or stop the daemon.
    """
    text = _repr(value)
    if text is None:
        return f"an integer of {value.bit_length()} bits" if isinstance(value, int) else type(value).__name__
    return text if len(text) <= _SHOWN_CHARS else f"{text[: _SHOWN_CHARS - 3]}..."


_SHOWN_NODES = 1_000


def _short_repr() -> reprlib.Repr:
    short = reprlib.Repr()  # keyword arguments only from Python 3.12
    short.maxlevel, short.maxstring, short.maxother = 3, 60, 60
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 4
    return short


_SHORT_REPR = _short_repr()
"""For values too big to repr whole: a few items of a few levels, whatever the size."""


def _repr(value: Any) -> str | None:
    """The full repr, or None where it would be huge or fail: an alias bomb (`&a [*b, *b, ...]`) is
    a few hundred bytes of YAML whose repr runs to gigabytes; an integer of 5,000 digits raises."""
    if _too_many_nodes(value):
        return _SHORT_REPR.repr(value)
    try:
        return repr(value)
    except (ValueError, RecursionError):
        return None


def _too_many_nodes(value: Any) -> bool:
    """Whether `value` holds more than `_SHOWN_NODES` values, counting a shared one each time it appears."""
    todo, count = [value], 0
    while todo:
        item = todo.pop()
        count += 1
        if isinstance(item, dict | list | tuple | set):
            if count + len(item) > _SHOWN_NODES:
                return True
            todo.extend(item.values() if isinstance(item, dict) else item)
    return False


def _section_model(model: type[BaseModel], path: list[str]) -> type[BaseModel]:
    """The pydantic model of a nested section such as `output`, for listing its fields."""
    for part in path:
        field_info = model.model_fields.get(part)
        annotation = field_info.annotation if field_info else None
        # `X | Literal[False] | None`: the model member of the union is the section.
        members = [a for a in (annotation, *typing.get_args(annotation)) if isinstance(a, type)]
        nested = [a for a in members if issubclass(a, BaseModel)]
        if not nested:
            break
        model = nested[0]
    return model


def _over(field: str, value: Any, limit: Any) -> JobRejected:
    return JobRejected(
        f"{field} {value} is over the limit of {limit} set in the daemon's config",
        code=Code.OVER_LIMIT,
        field=field,
        value=value,
        fix=f"lower '{field}' to at most {limit}, or raise the limit in the config",
    )


def _check_limits(spec: Spec, rules: Rules) -> None:
    limits = rules.limits
    if spec.steps > limits.max_steps:
        raise _over("steps", spec.steps, limits.max_steps)
    if spec.count > limits.max_count:
        raise _over("count", spec.count, limits.max_count)
    size = spec.size if isinstance(spec, Txt2ImgJob | RedrawJob) else None
    if size is not None:
        try:
            _check_size(size)
        except ValueError as exc:
            raise JobRejected(str(exc), field="size", value=f"{size[0]}x{size[1]}", fix=FIX_FIELD) from None
        if size[0] * size[1] > limits.max_pixels:
            raise _over("size", f"{size[0]}x{size[1]} ({size[0] * size[1]} pixels)", f"{limits.max_pixels} pixels")
    if spec.scheduler is not None and spec.scheduler not in SCHEDULER_NAMES:
        raise JobRejected(
            f"unknown scheduler {spec.scheduler!r}; allowed: {', '.join(SCHEDULER_NAMES)} "
            f"(or A1111's names: {', '.join(sorted({s for s, _ in A1111_SAMPLERS.values()}))}, DPM++ 2M Karras)",
            field="scheduler",
            value=spec.scheduler,
            fix="pick a scheduler from the list, or leave `scheduler:` out to use the model's own",
        )
    if spec.eta and spec.scheduler not in (None, "ddim"):
        raise JobRejected(
            f"eta is DDIM's: the {spec.scheduler} scheduler does not use it",
            field="eta",
            value=spec.eta,
            fix="set `scheduler: ddim` to use eta, or remove `eta:`",
        )
    if isinstance(spec, RedrawJob) and spec.denoise_steps() < 1:
        raise JobRejected(
            f"strength {spec.strength:g} with {spec.steps} steps leaves no denoising step (steps x strength < 1)",
            field="strength",
            value=spec.strength,
            fix="raise `strength` or `steps` so that steps x strength is at least 1",
        )
    if isinstance(spec, UpscaleJob) and not spec.uses_model and spec.count != 1:
        raise JobRejected(
            f"lanczos upscaling is deterministic, so count must be 1, got {spec.count}",
            field="count",
            value=spec.count,
            fix="remove `count:` or use `method: sd-x4` for several variations",
        )
    if isinstance(spec, UpscaleJob) and spec.method == "sd-x4" and spec.scale != 4:
        raise JobRejected(
            f"method sd-x4 always scales by 4, got scale {spec.scale:g}",
            field="scale",
            value=spec.scale,
            fix="use `scale: 4` with sd-x4, or `method: lanczos` for other scales",
        )


def _check_model(spec: Spec, rules: Rules) -> None:
    if not spec.uses_model or not rules.check_models:
        return
    fitting = sorted(n for n, kind in rules.models.items() if spec.task in TASKS_BY_KIND[kind])
    if spec.model is None:
        raise JobRejected(
            f"no model given for task {spec.task} and the config sets no default",
            field="model",
            value=None,
            fix=f"add `model:` with one of: {', '.join(fitting) or '(none configured)'}",
        )
    if spec.model not in rules.models:
        raise JobRejected(
            f"model {shown_text(spec.model)} is not in the config's models; known: "
            f"{', '.join(sorted(rules.models)) or '(none)'}",
            field="model",
            value=shown(spec.model),
            fix="use a model name from the config, or add the model to `models:` in the config",
        )
    kind = rules.models[spec.model]
    if spec.clip_skip != 1 and kind in (ModelKind.SDXL, ModelKind.SDXL_REFINER, ModelKind.SDXL_INPAINT):
        raise JobRejected(
            f"clip_skip {spec.clip_skip} is for SD 1.x and 2.x: SDXL ('{spec.model}') already conditions on "
            "the text encoders' next-to-last layer",
            field="clip_skip",
            value=spec.clip_skip,
            fix="remove `clip_skip:` for an SDXL model",
        )
    if kind is not ModelKind.UNKNOWN and spec.task not in TASKS_BY_KIND[kind]:
        raise JobRejected(
            f"model '{spec.model}' is a {kind} model and cannot run {spec.task}; models that can: "
            f"{', '.join(fitting) or '(none configured)'}",
            field="model",
            value=spec.model,
            fix="pick a model that fits the task",
        )


def _check_image_path(spec: Spec, path: str) -> None:
    """Every file the job names (`image`, `mask`, each control's `image`) stays in the inbox and is an image."""
    for name, image in spec.named_inputs().items():
        what = "image" if name == "image" else name
        if posixpath.isabs(image) or "\\" in image or inbox_relative(path, image) is None:
            raise JobRejected(
                f"{what} path {shown_text(image)} leaves the inbox",
                code=Code.PATH_ESCAPES,
                field=name,
                value=image,
                fix=f"put the file in the inbox and name it relative to the job file, e.g. `{name}: sketch.png`",
            )
        if (problem := name_problem(image)) is not None:
            problem.add_context(field=name, value=shown(image))
            raise problem
        if not image.lower().endswith(IMAGE_SUFFIXES):
            raise JobRejected(
                f"{what} {shown_text(image)} is not a {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} file",
                field=name,
                value=image,
                fix="convert the image to PNG, JPEG or WebP",
            )


def name_problem(name: str) -> JobRejected | None:
    """Why a file's inbox-relative name cannot be used, or None.

    A newline, tab or terminal escape in a name would travel into every output name, manifest,
    log line and `ls` after it; bytes that are not UTF-8 (Python holds them as lone surrogates)
    cannot be written into a JSON manifest at all.
    """
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as exc:
        byte = os.fsencode(name[exc.start])[0]
        return JobRejected(
            f"the file name is not UTF-8 text (byte 0x{byte:02x} at position {exc.start + 1})",
            code=Code.BAD_NAME,
            fix="rename the file so that its name is UTF-8 text (as most tools write it), and drop it again",
        )
    for position, char in enumerate(name, start=1):
        if unicodedata.category(char) == "Cc":
            return JobRejected(
                f"the file name holds a control character ({char!r} at position {position})",
                code=Code.BAD_NAME,
                fix="rename the file without control characters (newlines, tabs, escapes), and drop it again",
            )
    return None


def inbox_relative(job_path: str, image: str) -> str | None:
    """The image's path relative to the inbox, or None when it would leave the inbox."""
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(job_path), image))
    if joined == ".." or joined.startswith("../") or posixpath.isabs(joined):
        return None
    return joined


def fill_seed(spec: Spec) -> Spec:
    """Pick a random seed when the job has none, so every run is recorded reproducibly; a stage
    without a seed of its own takes the stage before's (a crash between stages resumes with it)."""
    if spec.seed is None:
        spec = spec.model_copy(update={"seed": secrets.randbelow(SEED_MAX + 1)})
    if not spec.then:
        return spec
    seed, stages = spec.seed, []
    for stage in spec.then:
        if stage.seed is None:
            stage = stage.model_copy(update={"seed": seed})
        seed = stage.seed
        stages.append(stage)
    return spec.model_copy(update={"then": tuple(stages)})


def seeds_for(spec: Spec) -> list[int]:
    """One seed per image: seed, seed+1, ... (AUTOMATIC1111's convention, so a seed is comparable)."""
    if spec.seed is None:
        raise ValueError("fill_seed() must run before seeds_for()")
    return [(spec.seed + i) % (SEED_MAX + 1) for i in range(spec.count)]
