"""The seam between the worker and the pixels: a `Generator` turns one batch of jobs into images.

Two generators exist, chosen by code, never by a config:

- `DiffusersGenerator` (pipeline/generate.py): the real one, warm diffusers pipelines on the
  configured device, the out-of-memory ladder, failures translated to `JobFailed`. The daemon
  uses it unless the code that starts it passes another (`Daemon(generator_factory=...)`).
- `StandInGenerator` (pipeline/standin.py): no model; seeded solid or noise images made in
  steps that report progress and honour a cancel like diffusers' callback does, with a gate
  to hold a job at a step and a way to fail with a given error. For lifecycle tests and the
  bench, whose subject is the daemon around generation, not the pixels.

This module imports no torch: a daemon run with the stand-in never loads it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from diffusiond.pipeline.families import ModelEntry
from diffusiond.pipeline.job import Job, Spec

StepHook = Callable[[int, int], None]
"""Called with (steps done, steps in all) after every denoising step."""


class Cancelled(Exception):
    """The job was asked to stop at a step boundary; nothing was written."""


@dataclass(frozen=True)
class ModelInfo:
    """What made the images, for the manifest: the daemon never looks into a generator's cache."""

    name: str
    path: str
    hash: str | None = None
    family: str | None = None
    pipeline: str | None = None
    """The diffusers pipeline class (for the stand-in: its own name)."""
    vae: str | None = None
    """The name of the VAE the config put in place of the model's own (None: its own)."""
    vae_hash: str | None = None

    def record(self) -> dict[str, Any]:
        """The manifest's `model`."""
        return {
            "name": self.name,
            "path": self.path,
            "hash": self.hash,
            "family": self.family,
            "pipeline": self.pipeline,
            "vae": self.vae,
            "vae_hash": self.vae_hash,
        }


@dataclass(frozen=True)
class Generated:
    """The images of one job, in seed order, and how they were made."""

    images: list[Image.Image]
    seeds: list[int]
    scheduler: str
    """The scheduler name the job asked for, or the model's own scheduler class."""
    load_s: float
    generate_s: float
    device: str
    dtype: str
    """`float32`, `float16`, `bfloat16`: the weights' precision."""
    model: ModelInfo | None = None
    """None when no configured model was named (a Lanczos upscale with no model default)."""
    memory: str | None = None
    """The memory level the images were made at (lower after an out-of-memory retry)."""
    batch_size: int = 1
    """How many jobs shared the pipeline call."""
    prediction: str | None = None
    """The scheduler's prediction type (`epsilon`, `v_prediction`)."""
    prompt_encoding: dict[str, Any] | None = None
    """How the prompts reached the text encoder (`prompts.PromptEncoding.record`); None without one."""
    loras: list[dict[str, Any]] | None = None
    """The LoRAs of the call: name, weight, file, sha256 and A1111's short `hash` of each."""
    embeddings: list[dict[str, Any]] | None = None
    """The textual-inversion embeddings the job's prompts named: name, file, sha256, short `hash`."""
    controls: list[dict[str, Any]] | None = None
    """The ControlNet models of the call, in the job's `control:` order: name, file, sha256, short `hash`."""


@dataclass(frozen=True)
class ExtraNetworks:
    """The files a job may add to a model, by name (A1111 calls them extra networks): only these load."""

    loras: Mapping[str, Path] = field(default_factory=dict)
    embeddings: Mapping[str, Path] = field(default_factory=dict)
    """Textual-inversion embeddings."""
    controlnets: Mapping[str, Path] = field(default_factory=dict)
    """ControlNet models: diffusers folders or single `.safetensors` files."""


@dataclass(frozen=True)
class EarlierStage:
    """A finished stage of a multi-stage job other than its last: the images the next stage ran on.

    Kept in the claim folder (`files`, lossless PNG) so a restart resumes after it; the images are
    read from there again when they are published too (`keep: all`).
    """

    number: int
    """1 for the job's own task, 2 for the first of its `then:`."""
    spec: Spec
    generated: Generated
    """How they were made; its `images` may be empty (read back after a restart): `files` has them."""
    files: tuple[Path, ...]
    sha256: tuple[str, ...]
    """Of each file's bytes."""
    sizes: tuple[tuple[int, int], ...]
    attempt: int
    """Which run of the claim made them."""
    finished_at: str


class Generator(Protocol):
    """What the worker needs from whatever makes the images. Only the worker thread calls
    `preload` and `generate`; `reconfigure` comes from the main thread on a config reload."""

    @property
    def device(self) -> str:
        """Where it runs, resolved (`cuda`, not `auto`)."""
        ...

    def preload(self, name: str) -> None:
        """Load a model now (before the daemon reports ready), so the first job finds it warm."""

    def generate(
        self,
        jobs: Sequence[Job],
        *,
        cancel: threading.Event | None = None,
        on_step: StepHook | None = None,
    ) -> list[Generated]:
        """One pipeline call for jobs with equal `batch_key` (or one job), each job's images apart.

        Raises `Cancelled` when `cancel` is set at a step, `JobFailed` when the work fails (naming
        the job it failed on: its `path` and `job_index`). Anything else is a bug.
        """
        ...

    def reconfigure(
        self,
        entries: Mapping[str, ModelEntry],
        *,
        memory: str,
        max_loaded: int,
        networks: ExtraNetworks | None = None,
    ) -> None:
        """A reloaded config: models whose entry changed are dropped, the rest stay warm; its LoRAs and embeddings."""

    def loaded(self) -> list[str]:
        """The models held warm now, least recently used first."""
        ...
