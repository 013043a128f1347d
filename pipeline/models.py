"""Loading models once and keeping them warm: device, dtype, pipeline per task.

Pipelines are loaded offline only (`local_files_only=True`, `HF_HUB_OFFLINE=1`),
from the paths the config names; a job can only reach a model by its config name.
txt2img and img2img of one model share one set of weights (the img2img pipeline
is built from the txt2img pipeline's components).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionUpscalePipeline,
)
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from diffusiond.pipeline.catalog import ModelEntry, ModelKind, detect_kind
from diffusiond.pipeline.errors import Code, ConfigError, JobFailed

# A daemon's log is read in the journal: no progress bars from loading.
diffusers_logging.disable_progress_bar()
transformers_logging.disable_progress_bar()

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(setting: str) -> str:
    """`auto` is the first of cuda, mps, cpu that this machine has."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(setting: str, device: str) -> torch.dtype:
    """`auto` is fp32 on CPU and fp16 on a GPU; fp16 on CPU is refused (no CPU fp16 convolution)."""
    if setting == "auto":
        return torch.float32 if device == "cpu" else torch.float16
    if setting == "fp16" and device == "cpu":
        raise ConfigError(
            "dtype fp16 cannot run on the CPU (PyTorch has no fp16 convolution there)",
            field="dtype",
            value=setting,
            fix="use `dtype: auto` (fp32 on CPU) or `dtype: bf16`",
        )
    return _DTYPES[setting]


@dataclass(frozen=True)
class Loaded:
    """A warm pipeline and what a job needs to know about it."""

    name: str
    pipe: Any
    scheduler_config: Any
    """The model's own scheduler config: each job's scheduler is rebuilt from it."""


class ModelCache:
    """Pipelines by (model name, task), loaded on first use and kept for the next job."""

    def __init__(self, entries: Mapping[str, ModelEntry], *, device: str, dtype: torch.dtype) -> None:
        self.entries = dict(entries)
        self.device = device
        self.dtype = dtype
        self._pipelines: dict[tuple[str, str], Loaded] = {}
        self._lock = threading.Lock()

    def pipeline(self, name: str, task: str) -> Loaded:
        """The warm pipeline for this model and task; loads the model the first time."""
        with self._lock:
            key = (name, task)
            if key not in self._pipelines:
                self._pipelines[key] = self._build(name, task)
            return self._pipelines[key]

    def loaded(self) -> list[str]:
        return sorted({name for name, _ in self._pipelines})

    def _build(self, name: str, task: str) -> Loaded:
        if task == "img2img":
            base = self._pipelines.get((name, "txt2img")) or self._build(name, "txt2img")
            self._pipelines[(name, "txt2img")] = base
            pipe = StableDiffusionImg2ImgPipeline(**base.pipe.components, requires_safety_checker=False)
            pipe.set_progress_bar_config(disable=True)
            return Loaded(name, pipe, base.scheduler_config)
        pipe = self._load(self.entries[name])
        return Loaded(name, pipe, pipe.scheduler.config)

    def _load(self, entry: ModelEntry) -> Any:
        kind = detect_kind(entry.path)
        if kind is ModelKind.UNKNOWN:
            raise JobFailed(
                f"model '{entry.name}' at {entry.path} is not a diffusers model folder (no usable model_index.json)",
                code=Code.MODEL_FAILED,
                field="model",
                value=entry.name,
                fix="point the config's `models:` entry at a diffusers folder (with model_index.json)",
            )
        try:
            if kind is ModelKind.UPSCALER_X4:
                pipe = StableDiffusionUpscalePipeline.from_pretrained(
                    entry.path, dtype=self.dtype, local_files_only=True
                )
            else:
                pipe = StableDiffusionPipeline.from_pretrained(
                    entry.path,
                    dtype=self.dtype,
                    local_files_only=True,
                    safety_checker=None,
                    requires_safety_checker=False,
                )
        except (OSError, ValueError, RuntimeError) as exc:
            raise JobFailed(
                f"model '{entry.name}' could not be loaded from {entry.path}: {exc}",
                code=Code.MODEL_FAILED,
                field="model",
                value=entry.name,
                fix="check that the folder holds a complete diffusers model (all components and weights)",
            ) from exc
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        return pipe
