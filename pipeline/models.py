"""Loading models once and keeping them warm: family, device, dtype, memory level, LRU.

Pipelines are loaded offline only (`local_files_only=True`, `HF_HUB_OFFLINE=1`),
from the paths the config names; a job can only reach a model by its config name.
The pipeline class comes from the model's family, never from the user. All tasks
of one model share one set of weights: the img2img pipeline is built from the
txt2img pipeline's components. Idle models are evicted least recently used first.
"""

from __future__ import annotations

import gc
import logging
import os
import pwd
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DiffusionPipeline,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionDepth2ImgPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionUpscalePipeline,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from diffusiond.pipeline.backend import ExtraNetworks
from diffusiond.pipeline.controls import MAX_CONTROLNETS, check_fits, controlnet_record, load_controlnet
from diffusiond.pipeline.embeddings import apply as apply_embeddings
from diffusiond.pipeline.errors import Code, ConfigError, JobFailed
from diffusiond.pipeline.families import INPAINT_KINDS, ModelEntry, ModelKind, detect_kind
from diffusiond.pipeline.hashing import model_hash
from diffusiond.pipeline.job import LoraUse, Task
from diffusiond.pipeline.loras import apply as apply_loras
from diffusiond.pipeline.single_file import kind_of_file, load_single_file, resolve_config

log = logging.getLogger(__name__)

# A daemon's log is read in the journal: no progress bars from loading.
diffusers_logging.disable_progress_bar()
transformers_logging.disable_progress_bar()

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# (family, task) → pipeline class. The first task listed per family is the one its
# weights are loaded with; the others are built from its components.
PIPELINES: dict[tuple[ModelKind, Task], type[DiffusionPipeline]] = {
    (ModelKind.SD1, Task.TXT2IMG): StableDiffusionPipeline,
    (ModelKind.SD1, Task.IMG2IMG): StableDiffusionImg2ImgPipeline,
    (ModelKind.SD2, Task.TXT2IMG): StableDiffusionPipeline,
    (ModelKind.SD2, Task.IMG2IMG): StableDiffusionImg2ImgPipeline,
    (ModelKind.SDXL, Task.TXT2IMG): StableDiffusionXLPipeline,
    (ModelKind.SDXL, Task.IMG2IMG): StableDiffusionXLImg2ImgPipeline,
    (ModelKind.SDXL_REFINER, Task.IMG2IMG): StableDiffusionXLImg2ImgPipeline,
    (ModelKind.SD1_INPAINT, Task.IMG2IMG): StableDiffusionInpaintPipeline,
    (ModelKind.SD2_INPAINT, Task.IMG2IMG): StableDiffusionInpaintPipeline,
    (ModelKind.SDXL_INPAINT, Task.IMG2IMG): StableDiffusionXLInpaintPipeline,
    (ModelKind.UPSCALER_X4, Task.UPSCALE): StableDiffusionUpscalePipeline,
    (ModelKind.DEPTH2IMG, Task.DEPTH2IMG): StableDiffusionDepth2ImgPipeline,
}

_SD_KINDS = (ModelKind.SD1, ModelKind.SD2, ModelKind.SD1_INPAINT, ModelKind.SD2_INPAINT)
_XL_KINDS = (ModelKind.SDXL, ModelKind.SDXL_INPAINT)
# (SDXL?, task, masked, controlled) -> the pipeline a job with a mask or ControlNets runs on, built
# over the model's weights like another task's (`DiffusionPipeline.from_pipe`: no copy).
VARIANTS: dict[tuple[bool, Task, bool, bool], type[DiffusionPipeline]] = {
    (False, Task.IMG2IMG, True, False): StableDiffusionInpaintPipeline,
    (False, Task.TXT2IMG, False, True): StableDiffusionControlNetPipeline,
    (False, Task.IMG2IMG, False, True): StableDiffusionControlNetImg2ImgPipeline,
    (False, Task.IMG2IMG, True, True): StableDiffusionControlNetInpaintPipeline,
    (True, Task.IMG2IMG, True, False): StableDiffusionXLInpaintPipeline,
    (True, Task.TXT2IMG, False, True): StableDiffusionXLControlNetPipeline,
    (True, Task.IMG2IMG, False, True): StableDiffusionXLControlNetImg2ImgPipeline,
    (True, Task.IMG2IMG, True, True): StableDiffusionXLControlNetInpaintPipeline,
}
"""An inpainting model (9-channel UNet) and a normal one run the same inpaint pipelines: diffusers
gives the former the mask and masked image as input, and blends the latter's latents with the
input's outside the mask at every step (masked img2img)."""


class Memory(IntEnum):
    """How hard a pipeline saves memory; `auto` starts at NORMAL and steps down on out-of-memory."""

    NORMAL = 0
    """Everything on the device: fastest."""
    LOW = 1
    """Attention slicing, VAE slicing and tiling, and (on a GPU) model CPU offload."""
    MINIMAL = 2
    """LOW plus sequential CPU offload (on a GPU): slowest, smallest."""


def resolve_device(setting: str) -> str:
    """`auto` is the first of cuda, mps, cpu that this machine has; a device named outright must exist.

    Checked at start, so a machine without the configured device refuses to start with the fix
    instead of sending every job to failed/.
    """
    if setting == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if _has_mps() else "cpu"
    if setting.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"`device: {setting}` but this machine has no CUDA device (torch.cuda.is_available() is False)",
                field="device",
                value=setting,
                fix="set `device: cpu` or `auto`, or install a CUDA build of PyTorch where there is an NVIDIA GPU "
                "(`make TORCH=torch setup`)",
            )
        index = int(setting.partition(":")[2] or 0)
        count = torch.cuda.device_count()
        if index >= count:
            raise ConfigError(
                f"`device: {setting}` but this machine has {count} CUDA device{'s' if count != 1 else ''} "
                f"(cuda:0 to cuda:{count - 1})",
                field="device",
                value=setting,
                fix=f"pick cuda:0 to cuda:{count - 1} (under diffusiond@N.service the process sees GPU N only, "
                "as cuda:0)",
            )
    elif setting == "mps" and not _has_mps():
        raise ConfigError(
            "`device: mps` but this machine has no Apple GPU (torch.backends.mps.is_available() is False)",
            field="device",
            value=setting,
            fix="set `device: cpu` or `auto`",
        )
    return setting


def _has_mps() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


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


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA raises torch.OutOfMemoryError; MPS and some allocators a RuntimeError that says so."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


@dataclass(frozen=True)
class Loaded:
    """A warm pipeline and what a job needs to know about it."""

    name: str
    pipe: Any
    scheduler_config: Any
    """The model's own scheduler config: each job's scheduler is rebuilt from it."""
    kind: ModelKind = ModelKind.SD1
    hash: str | None = None
    path: str = ""
    """Where it was loaded from (a reload may change the config's entry while a job runs)."""
    vae: str | None = None
    """The file or folder name of a VAE the config put in place of the model's own."""
    vae_hash: str | None = None
    masked: bool = False
    """An inpainting pipeline (`variant`): the job runs through pipeline/inpaint.py."""
    controls: tuple[dict[str, Any], ...] = ()
    """What the manifest says of each ControlNet of the pipeline (`variant`), in the job's order."""


@dataclass
class _Model:
    kind: ModelKind
    hash: str | None
    scheduler_config: Any
    level: Memory
    path: str
    pipes: dict[str, Any] = field(default_factory=dict)
    vae: str | None = None
    vae_hash: str | None = None
    adapters: OrderedDict[str, str] = field(default_factory=OrderedDict)
    """LoRAs loaded on its UNet and text encoders (peft adapter name -> LoRA name): pipeline/loras.py."""
    embeddings: set[str] = field(default_factory=set)
    """Textual-inversion embeddings loaded into its tokenizers and text encoders: pipeline/embeddings.py."""


@dataclass(frozen=True)
class _ControlNet:
    path: str
    module: Any
    record: dict[str, Any]
    """What the manifest and infotext say of it: name, file, sha256, A1111's short `hash`."""


class ModelCache:
    """Pipelines by (model name, task): loaded on first use, kept warm, evicted least recently used."""

    def __init__(
        self,
        entries: Mapping[str, ModelEntry],
        *,
        device: str,
        dtype: torch.dtype,
        memory: str = "normal",
        max_loaded: int = 2,
        state_dir: Path | None = None,
        networks: ExtraNetworks | None = None,
    ) -> None:
        self.entries = dict(entries)
        self.networks = networks or ExtraNetworks()
        """The config's LoRA and embedding files by name: the only ones a job can load."""
        self.device = device
        self.dtype = dtype
        self.memory = memory
        self.max_loaded = max_loaded
        self.state_dir = state_dir
        self._models: OrderedDict[str, _Model] = OrderedDict()
        self._levels: dict[str, Memory] = {}
        """The memory level that worked for each model, kept across evictions."""
        self._lock = threading.RLock()
        self._controlnets: OrderedDict[str, _ControlNet] = OrderedDict()
        """ControlNets by config name, the least recently used first."""

    def update(
        self,
        entries: Mapping[str, ModelEntry],
        *,
        memory: str,
        max_loaded: int,
        networks: ExtraNetworks | None = None,
    ) -> None:
        """A reloaded config: models whose entry changed or went away are unloaded, the rest stay warm."""
        with self._lock:
            self.networks = networks or ExtraNetworks()
            for name, loaded in list(self._controlnets.items()):
                if str(self.networks.controlnets.get(name)) != loaded.path:
                    del self._controlnets[name]
            for name in list(self._models):
                if entries.get(name) != self.entries.get(name):
                    self.evict(name)
                    self._levels.pop(name, None)
            self.entries, self.memory, self.max_loaded = dict(entries), memory, max_loaded

    def pipeline(self, name: str, task: Task) -> Loaded:
        """The warm pipeline for this model and task; loads the model the first time."""
        with self._lock:
            model = self._models.get(name) or self._load(name)
            self._models.move_to_end(name)
            if task not in model.pipes:
                model.pipes[task] = self._derive(name, model, task)
            return Loaded(
                name,
                model.pipes[task],
                model.scheduler_config,
                model.kind,
                model.hash,
                model.path,
                model.vae,
                model.vae_hash,
            )

    def variant(self, name: str, task: Task, *, masked: bool, controls: Sequence[str] = ()) -> Loaded:
        """The pipeline for a job with a mask (inpainting) or ControlNets, over the model's warm weights.

        An inpainting model is always masked: a job without a mask gives it one of the whole image.
        """
        with self._lock:
            loaded = self.pipeline(name, task)
            model = self._models[name]
            masked = masked or model.kind in INPAINT_KINDS
            if not masked and not controls:
                return loaded
            family = model.kind in _XL_KINDS
            runs_variants = model.kind in (*_SD_KINDS, *_XL_KINDS)
            cls = VARIANTS.get((family, task, masked, bool(controls))) if runs_variants else None
            if cls is None:
                raise JobFailed(
                    f"model '{name}' ({model.kind}) cannot run {task} with "
                    f"{'a mask' if masked and not controls else 'ControlNets'}",
                    code=Code.MODEL_FAILED,
                    field="control" if controls else "mask",
                    value=name,
                    fix="use an SD 1.x, 2.x or SDXL model for inpainting and ControlNets",
                )
            extra: dict[str, Any] = {}
            records: list[dict[str, Any]] = []
            if controls:
                loaded_nets = [self._controlnet(control, name, model) for control in controls]
                nets = [net.module for net in loaded_nets]
                records = [dict(net.record) for net in loaded_nets]
                extra["controlnet"] = nets[0] if len(nets) == 1 else nets
            if family:
                extra["add_watermarker"] = False  # diffusiond applies its own, configurable watermark
            base = loaded.pipe
            # from_pipe casts what it shares to `dtype`, float32 unless told: the warm model's own.
            pipe = base if type(base) is cls else cls.from_pipe(base, dtype=self.dtype, **extra)
            pipe.set_progress_bar_config(disable=True)
            record = (model.scheduler_config, model.kind, model.hash, model.path, model.vae, model.vae_hash)
            return Loaded(name, pipe, *record, masked=masked, controls=tuple(records))

    def _controlnet(self, control: str, model_name: str, model: _Model) -> _ControlNet:
        """A ControlNet from the config's `controlnets:`, loaded once and kept (at most MAX_CONTROLNETS)."""
        path = self.networks.controlnets.get(control)
        if path is None:  # the config was reloaded without it since the job was validated
            raise JobFailed(
                f"ControlNet {control!r} is no longer in the config's controlnets",
                code=Code.MODEL_FAILED,
                field="control",
                value=control,
                fix="put it back in the controlnets folder, or drop the job again without it",
            )
        cached = self._controlnets.get(control)
        if cached is None or cached.path != str(path):
            module = load_controlnet(control, Path(path), dtype=self.dtype, base=next(iter(model.pipes.values())))
            module.to(self.device)
            cached = _ControlNet(str(path), module, controlnet_record(control, Path(path)))
            self._controlnets[control] = cached
            while len(self._controlnets) > MAX_CONTROLNETS:
                self._controlnets.popitem(last=False)
        self._controlnets.move_to_end(control)
        check_fits(control, cached.module, model_name, next(iter(model.pipes.values())))
        return cached

    def preload(self, names: Iterable[str]) -> None:
        for name in names:
            with self._lock:
                if name not in self._models:
                    self._load(name)

    def loaded(self) -> list[str]:
        return list(self._models)

    def level(self, name: str) -> Memory:
        return self._levels.get(name, self._start_level())

    def lower_memory(self, name: str) -> bool:
        """After an out-of-memory error: one level down, remembered for this model. False at the bottom."""
        with self._lock:
            current = self.level(name)
            if self.memory != "auto" or current is Memory.MINIMAL:
                return False
            self._levels[name] = Memory(current + 1)
            log.warning(
                "model %s ran out of memory; retrying at memory level %s", name, self._levels[name].name.lower()
            )
            self.evict(name)
            _free_device_memory()
            return True

    def evict(self, name: str) -> None:
        with self._lock:
            if self._models.pop(name, None) is not None:
                log.info("unloaded model %s", name)
                _free_device_memory()

    def _start_level(self) -> Memory:
        return Memory.NORMAL if self.memory == "auto" else Memory[self.memory.upper()]

    def _load(self, name: str) -> _Model:
        entry = self.entries[name]
        while len(self._models) >= self.max_loaded:
            self.evict(next(iter(self._models)))
        kind = self._kind(entry)
        base_task = next(task for (k, task) in PIPELINES if k is kind)
        level = self.level(name)
        try:
            pipe = self._from_disk(entry, kind, PIPELINES[(kind, base_task)])
            digest = model_hash(entry, self.state_dir)
            vae_hash = None
            if entry.vae is not None:
                pipe.vae = self._vae(entry, kind)
                vae_hash = model_hash(ModelEntry(f"{name} vae", entry.vae, ModelKind.UNKNOWN), self.state_dir)
        except JobFailed:
            raise
        except PermissionError as exc:  # a file of the model the daemon's user may not read
            raise _unreadable(entry, Path(exc.filename) if exc.filename else entry.path) from exc
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
            raise JobFailed(
                f"model '{name}' could not be loaded from {entry.path}: {type(exc).__name__}: {exc}",
                code=Code.MODEL_FAILED,
                field="model",
                value=name,
                fix="check that the path holds a complete model of a supported family (SD 1.x, 2.x, XL, x4 upscaler, "
                "2-depth) and that `config:` names its configs for a single file",
            ) from exc
        try:
            self._place(pipe, level)
        except Exception as exc:
            if is_out_of_memory(exc):
                raise  # the memory ladder's business: the job runs again one level lower
            raise JobFailed(
                f"model '{name}' could not be placed on {self.device}: {type(exc).__name__}: {exc}",
                code=Code.MODEL_FAILED,
                field="model",
                value=name,
                fix=f"check that {self.device} works with this PyTorch build (set `device:` and `dtype:` to what the "
                "machine has), or set `memory: low` to keep parts of the model off the device",
            ) from exc
        scheduler_config = dict(pipe.scheduler.config)
        if entry.prediction:
            scheduler_config["prediction_type"] = entry.prediction
        vae = entry.vae.name if entry.vae is not None else None
        model = _Model(kind, digest, scheduler_config, level, str(entry.path), {base_task: pipe}, vae, vae_hash)
        self._models[name] = model
        log.info("loaded model %s (%s, %s, memory %s, hash %s)", name, kind, self.dtype, level.name.lower(), digest)
        return model

    def _kind(self, entry: ModelEntry) -> ModelKind:
        if entry.single_file:
            if not entry.path.is_file():
                raise _missing(entry)
            if entry.kind is not ModelKind.UNKNOWN:
                return entry.kind
            return kind_of_file(entry.path)
        kind = detect_kind(entry.path)
        if kind is ModelKind.UNKNOWN:
            if not entry.path.exists():
                raise _missing(entry)
            index = entry.path / "model_index.json"
            for part, readable in ((entry.path, os.R_OK | os.X_OK), (index, os.R_OK)):
                if os.path.lexists(part) and not os.access(part, readable):
                    raise _unreadable(entry, part)
            raise JobFailed(
                f"model '{entry.name}' at {entry.path} is not a diffusers model folder of a known family "
                "(no usable model_index.json)",
                code=Code.MODEL_FAILED,
                field="model",
                value=entry.name,
                fix="point the config's `models:` entry at a diffusers folder (with model_index.json) "
                "or a single .safetensors/.ckpt file",
            )
        return kind

    def _from_disk(self, entry: ModelEntry, kind: ModelKind, cls: type[DiffusionPipeline]) -> Any:
        if entry.single_file:
            # Shipped configs are assembled under the state dir (local disk), not ~/.cache.
            cache_dir = self.state_dir / "configs" if self.state_dir else None
            return load_single_file(entry, kind, dtype=self.dtype, cache_dir=cache_dir)
        extra: dict[str, Any] = {}
        if kind in (ModelKind.SD1, ModelKind.SD2, ModelKind.SD1_INPAINT, ModelKind.SD2_INPAINT):
            extra = {"safety_checker": None, "requires_safety_checker": False}
        elif kind in (ModelKind.SDXL, ModelKind.SDXL_REFINER, ModelKind.SDXL_INPAINT):
            extra = {"add_watermarker": False}  # diffusiond applies its own, configurable watermark
        elif kind is ModelKind.DEPTH2IMG:
            _map_removed_transformers_classes()
        return cls.from_pretrained(entry.path, dtype=self.dtype, local_files_only=True, **extra)

    def use_loras(self, name: str, pipe: Any, uses: Sequence[LoraUse]) -> list[dict[str, Any]]:
        """Set the model's LoRAs for the next call (none: off); what the manifest says of each."""
        return apply_loras(pipe, uses, self.networks.loras, self._models[name].adapters)

    def use_embeddings(self, name: str, pipe: Any, texts: Sequence[str]) -> list[dict[str, Any]]:
        """Load the embeddings the prompts name into the model (once); what the manifest says of each."""
        return apply_embeddings(pipe, texts, self.networks.embeddings, self._models[name].embeddings)

    def _vae(self, entry: ModelEntry, kind: ModelKind) -> Any:
        """The config's VAE for this model: a diffusers folder, or a single .safetensors in the original
        layout, built on the model's own VAE config (its folder's, or the single file's configs)."""
        from diffusers import AutoencoderKL

        path = entry.vae
        assert path is not None
        if not path.exists():
            raise JobFailed(
                f"model '{entry.name}': its vae {path} does not exist",
                code=Code.MODEL_FAILED,
                field="model",
                value=entry.name,
                fix="point the model's `vae:` in the config at a VAE folder or .safetensors file",
            )
        if path.is_dir():
            return AutoencoderKL.from_pretrained(path, dtype=self.dtype, local_files_only=True)
        cache_dir = self.state_dir / "configs" if self.state_dir else None
        root = resolve_config(entry, kind, cache_dir=cache_dir) if entry.single_file else entry.path
        return AutoencoderKL.from_single_file(
            str(path), config=str(root), subfolder="vae", dtype=self.dtype, local_files_only=True
        )

    def _derive(self, name: str, model: _Model, task: Task) -> Any:
        """Another task's pipeline over the same weights (no copy)."""
        cls = PIPELINES.get((model.kind, task))
        if cls is None:
            raise JobFailed(
                f"model '{name}' ({model.kind}) cannot run {task}",
                code=Code.MODEL_FAILED,
                field="model",
                value=name,
                fix="pick a model of a family that runs this task",
            )
        base = next(iter(model.pipes.values()))
        extra: dict[str, Any] = {}
        if cls is StableDiffusionImg2ImgPipeline:
            extra = {"requires_safety_checker": False}
        elif cls is StableDiffusionXLImg2ImgPipeline:
            extra = {
                "force_zeros_for_empty_prompt": base.config.get("force_zeros_for_empty_prompt", True),
                "add_watermarker": False,
            }
        pipe = cls(**base.components, **extra)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _place(self, pipe: Any, level: Memory) -> None:
        """Move to the device with the memory savings of `level`."""
        pipe.set_progress_bar_config(disable=True)
        on_gpu = self.device.startswith(("cuda", "mps"))
        gpu_id = int(self.device.split(":")[1]) if ":" in self.device else None
        if level >= Memory.LOW:
            pipe.enable_attention_slicing()
            if getattr(pipe, "vae", None) is not None:
                pipe.vae.enable_slicing()
                pipe.vae.enable_tiling()
        if on_gpu and level is Memory.MINIMAL:
            pipe.enable_sequential_cpu_offload(gpu_id=gpu_id, device=self.device.split(":")[0])
        elif on_gpu and level is Memory.LOW:
            pipe.enable_model_cpu_offload(gpu_id=gpu_id, device=self.device.split(":")[0])
        else:
            pipe.to(self.device)
        if getattr(pipe, "unet", None) is not None and (self.device.startswith("cuda") or self.dtype == torch.bfloat16):
            # NHWC convolutions: 12 % faster per bf16 step on this project's CPU (bench/run.py), the
            # usual layout on CUDA tensor cores; slower in fp32 on CPU, so left alone there.
            pipe.unet.to(memory_format=torch.channels_last)


def _unreadable(entry: ModelEntry, part: Path) -> JobFailed:
    """A model the daemon's user may not read (a folder made 0700 by root, say): not "no model_index.json"."""
    user = pwd.getpwuid(os.geteuid()).pw_name if hasattr(os, "geteuid") else "this user"
    return JobFailed(
        f"model '{entry.name}': {part} cannot be read by {user}, the user the daemon runs as (permission denied)",
        code=Code.MODEL_FAILED,
        field="model",
        value=entry.name,
        fix=f"let it read the model: chmod -R a+rX {entry.path} (or give the files to group diffusiond)",
    )


def _missing(entry: ModelEntry) -> JobFailed:
    return JobFailed(
        f"model '{entry.name}': {entry.path} does not exist",
        code=Code.MODEL_FAILED,
        field="model",
        value=entry.name,
        fix="fix the path in the config's `models:` (paths are relative to the config file)",
    )


def _map_removed_transformers_classes() -> None:
    """stable-diffusion-2-depth's model_index.json names DPTFeatureExtractor, gone in transformers 5.

    diffusers already remaps CLIPFeatureExtractor the same way; without this the real
    depth model cannot load on current transformers.
    """
    try:
        from diffusers.utils import deprecation_utils

        remap = deprecation_utils._TRANSFORMERS_CLASS_REMAPPING
    except (ImportError, AttributeError):
        return
    remap.setdefault("DPTFeatureExtractor", {"new_class": "DPTImageProcessor", "transformers_version": (">=", "5.0.0")})


def _free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
