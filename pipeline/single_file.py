"""Single-file checkpoints (`.safetensors`, `.ckpt` in the original LDM layout), loaded offline.

A single file holds weights only. diffusers also needs a diffusers-layout folder with the
configs and tokenizers, and by default fetches one from the hub, which the daemon never
contacts. So this module:

1. tells the family from the file's tensor names (`families.inspect_shapes`; a `.safetensors`
   header is read without loading a tensor or importing torch);
2. finds a local config folder: the model's `config:`, a diffusers folder beside the file, or
   the configs shipped in `pipeline/configs/` (assembled, with the CLIP tokenizer files
   derived from the shipped BPE merges, into a cache folder);
3. hands both to `from_single_file(..., config=<folder>, local_files_only=True)`.

A `.ckpt` is a pickle, and unpickling can run arbitrary code. It is only ever read with
`torch.load(weights_only=True)`, which refuses to call anything a state dict does not need;
a file that needs more is refused with a clear error before diffusers sees it (diffusers
0.42 then reads it with `weights_only=True` as well).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffusiond.pipeline.clip_tokenizer import MERGES_SHA256, write_vocab_files
from diffusiond.pipeline.errors import Code, ConfigError, JobFailed, job_context
from diffusiond.pipeline.families import (
    CheckpointInfo,
    ModelEntry,
    ModelKind,
    detect_kind,
    inspect_shapes,
    model_file_error,
    safetensors_shapes,
)

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.loaders import FromSingleFileMixin

CONFIGS_DIR = Path(__file__).parent / "configs"
"""The configs the project ships, one diffusers-layout folder per family (see its README.md)."""

_SHIPPED = {ModelKind.SD1: "sd1", ModelKind.SD2: "sd2", ModelKind.SDXL: "sdxl"}
_SHIPPED_FROM = {
    "sd1": "runwayml/stable-diffusion-v1-5",
    "sd2": "stabilityai/stable-diffusion-2-1-base",
    "sd2-v": "stabilityai/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}
# Components a single-file load never needs: the daemon passes None for them.
_NOT_NEEDED = frozenset({"safety_checker", "feature_extractor", "image_encoder", "watermarker"})
# What a config folder must hold when it has no model_index.json to say so.
_DEFAULT_COMPONENTS: dict[ModelKind, tuple[str, ...]] = {
    ModelKind.SD1: ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    ModelKind.SD2: ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    ModelKind.SDXL: ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
    ModelKind.UPSCALER_X4: ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "low_res_scheduler"),
    ModelKind.DEPTH2IMG: ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "depth_estimator"),
}


# --- what a file is ------------------------------------------------------------------------


def read_keys(path: Path) -> list[str]:
    """The tensor names of a single file (`.ckpt`: read with `weights_only=True`, unwrapping "state_dict")."""
    return list(_shapes(Path(path)))


def kind_of_file(path: Path) -> ModelKind:
    """The family of a single file, or UNKNOWN for files the daemon cannot load (see `inspect_checkpoint`)."""
    return inspect_checkpoint(path).kind


_INFO_CACHE: dict[tuple[str, int, int, int], CheckpointInfo] = {}
_INFO_LOCK = threading.Lock()


def inspect_checkpoint(path: Path) -> CheckpointInfo:
    """Family, variant and any reason not to load, from the tensor names and the UNet's input channels.

    Remembered per (path, inode, size, mtime): a `.ckpt` has to be unpickled to be inspected,
    and the loader asks again right before loading.
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise model_file_error(path, f"cannot be read: {exc.strerror or exc}") from exc
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    with _INFO_LOCK:
        cached = _INFO_CACHE.get(key)
    if cached is not None:
        return cached
    info = inspect_shapes(_shapes(path))
    with _INFO_LOCK:
        _INFO_CACHE[key] = info
    return info


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return safetensors_shapes(path)
    if suffix == ".ckpt":
        state = read_ckpt(path)
        return {key: tuple(value.shape) for key, value in state.items() if hasattr(value, "shape")}
    raise model_file_error(path, "is neither a .safetensors nor a .ckpt file")


def read_ckpt(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a `.ckpt`, read with `weights_only=True`: a pickle that needs more is refused, never run."""
    import torch

    path = Path(path)
    try:
        # mmap keeps a multi-GB zip-format checkpoint out of RAM; the legacy format cannot be mapped.
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        raise _unsafe_pickle(path, exc) from exc
    except Exception as exc:  # torch raises RuntimeError, EOFError, ValueError... for a damaged file
        if "weights only" in str(exc).lower():
            raise _unsafe_pickle(path, exc) from exc
        raise model_file_error(path, f"is not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise model_file_error(path, f"holds a {type(data).__name__}, not a state dict")
    return data


def _unsafe_pickle(path: Path, exc: BaseException) -> JobFailed:
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    what = f"it refers to {found.group(1)}, " if found else ""
    return JobFailed(
        f"{path} needs unsafe pickle loading: {what}which a .ckpt loaded with weights_only=True may not run "
        "(unpickling can execute arbitrary code), so it was not loaded",
        code=Code.MODEL_FAILED,
        fix="use the model's .safetensors release, or convert the file to .safetensors on a machine where you "
        "trust it (load it once with torch.load(weights_only=False), save the state dict with "
        "safetensors.torch.save_file) and point `models:` at the .safetensors file",
    )


# --- where its configs come from --------------------------------------------------------------


def default_cache_dir() -> Path:
    """Where shipped configs are assembled: systemd's CacheDirectory=, else the XDG cache folder."""
    systemd = os.environ.get("CACHE_DIRECTORY")
    if systemd:
        return Path(systemd.split(":")[0])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "diffusiond"


def shipped_config_name(kind: ModelKind, prediction: str | None = None) -> str | None:
    """The folder under `pipeline/configs/` for a family, or None when the project ships none."""
    if kind is ModelKind.SD2 and prediction == "v_prediction":
        return "sd2-v"
    return _SHIPPED.get(kind)


def missing_config_files(folder: Path, kind: ModelKind) -> list[str]:
    """The files (relative to `folder`) a single-file load of this family still needs from it."""
    folder = Path(folder)
    index_path = folder / "model_index.json"
    missing: list[str] = []
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        components = {
            name: str(value[1])
            for name, value in index.items()
            if isinstance(value, list) and len(value) == 2 and value[0] and value[1] and name not in _NOT_NEEDED
        }
    except (OSError, ValueError, AttributeError):
        missing.append("model_index.json")
        components = {name: _default_class(name) for name in _DEFAULT_COMPONENTS.get(kind, ())}
    for name, class_name in sorted(components.items()):
        for required in _required_files(name, class_name):
            alternatives = required.split("|")
            if not any((folder / name / option).is_file() for option in alternatives):
                missing.append(f"{name}/{alternatives[0]}")
    return missing


def _default_class(name: str) -> str:
    if name.endswith("scheduler"):
        return "Scheduler"
    return "CLIPTokenizer" if name.startswith("tokenizer") else "Model"


def _required_files(name: str, class_name: str) -> list[str]:
    """`a|b`: either will do (transformers 5 saves a tokenizer as tokenizer.json)."""
    if "Scheduler" in class_name:
        return ["scheduler_config.json"]
    if "Tokenizer" in class_name:
        return ["tokenizer_config.json", "vocab.json|tokenizer.json", "merges.txt|tokenizer.json"]
    if name == "depth_estimator":  # not in the single file: its weights must be in the folder
        return ["config.json", "model.safetensors|pytorch_model.bin"]
    return ["config.json"]


def resolve_config(entry: ModelEntry, kind: ModelKind, *, cache_dir: Path | None = None) -> Path:
    """The local diffusers folder whose configs and tokenizers a single-file load uses.

    In order: the model's `config:` (it must be complete: naming a folder is a promise), a
    diffusers folder beside the file (`<dir>/<file stem>/`, or the file's own folder when it
    has a model_index.json), then the configs the project ships for the family. Raises
    ConfigError saying which files are missing where when none of them will do.
    """
    name = entry.name
    if entry.config is not None:
        folder = Path(entry.config)
        problem = _folder_problem(folder, kind)
        if problem:
            raise ConfigError(
                f"model '{name}': the `config:` folder {folder} {problem}",
                field="models",
                value=name,
                fix=_config_fix(kind, entry.prediction, folder),
            )
        return folder
    tried: list[str] = []
    path = Path(entry.path)
    for folder in (path.parent / path.stem, path.parent):
        if not (folder / "model_index.json").is_file():
            if folder.is_dir() and folder.name == path.stem:
                tried.append(f"{folder} has no model_index.json")
            continue
        problem = _folder_problem(folder, kind)
        if not problem:
            return folder
        tried.append(f"{folder} {problem}")
    shipped = shipped_config_name(kind, entry.prediction)
    if shipped is not None and (CONFIGS_DIR / shipped / "model_index.json").is_file():
        return assemble_shipped_config(shipped, cache_dir=cache_dir)
    where = "; ".join(tried) if tried else f"there is no diffusers folder {path.parent / path.stem}"
    shipped_note = (
        f"the project ships none for {kind}"
        if shipped is None
        else f"the shipped configs {CONFIGS_DIR / shipped} are missing"
    )
    raise ConfigError(
        f"model '{name}': no diffusers configs for the single file {path} ({kind}): {where}; {shipped_note}",
        field="models",
        value=name,
        fix=_config_fix(kind, entry.prediction, path.parent / path.stem),
    )


def _folder_problem(folder: Path, kind: ModelKind) -> str:
    """Why `folder` cannot serve as the config of a `kind` single file; empty when it can."""
    if not folder.is_dir():
        return "does not exist"
    missing = missing_config_files(folder, kind)
    if missing:
        return "is missing " + ", ".join(missing)
    found = detect_kind(folder)
    if kind is not ModelKind.UNKNOWN and found not in (ModelKind.UNKNOWN, kind):
        return f"holds {found} configs, but the file is {kind}"
    return ""


def _config_fix(kind: ModelKind, prediction: str | None, folder: Path) -> str:
    shipped = shipped_config_name(kind, prediction)
    origin = (
        f"the diffusers configs of {_SHIPPED_FROM[shipped]}"
        if shipped
        else f"the diffusers configs of the {kind} model"
    )
    files = ["model_index.json"]
    for component in _DEFAULT_COMPONENTS.get(kind, ("unet", "vae", "text_encoder", "tokenizer", "scheduler")):
        files += [f"{component}/{f.split('|')[0]}" for f in _required_files(component, _default_class(component))]
    return f"put {origin} ({', '.join(files)}) in {folder}, or name such a folder as `config:` for this model"


# --- the shipped configs -----------------------------------------------------------------------


def assemble_shipped_config(name: str, *, cache_dir: Path | None = None) -> Path:
    """A complete diffusers config folder from `pipeline/configs/<name>` plus derived tokenizer files.

    The package folder may be read-only and lacks the 1.5 MB of tokenizer files, so the folder
    is assembled once under the cache, named by a digest of its sources (an upgrade gets a new
    folder), staged under a temporary name and renamed into place (a crash leaves no half folder).
    """
    source = CONFIGS_DIR / name
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "configs" / f"{name}-{_digest(source)}"
    if (target / ".complete").is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            shutil.copytree(source, staging, dirs_exist_ok=True)
            for sub in sorted(staging.iterdir()):
                if sub.is_dir() and sub.name.startswith("tokenizer"):
                    write_vocab_files(sub)
            (staging / ".complete").write_text(f"assembled from {source}\n", encoding="utf-8")
            if target.exists() and not (target / ".complete").is_file():
                shutil.rmtree(target)  # left incomplete by hand: the marker is written before the rename
            try:
                staging.rename(target)
            except OSError:
                if not (target / ".complete").is_file():  # not another daemon winning the race
                    raise
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot write the shipped {name} configs to {target.parent}: {exc.strerror or exc}",
            fix=f"make {root} writable for the daemon (systemd: CacheDirectory=diffusiond), "
            "or name a diffusers config folder as `config:` for the model",
        ) from exc
    return target


def _digest(source: Path) -> str:
    sha = hashlib.sha256(MERGES_SHA256.encode())
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        sha.update(file.relative_to(source).as_posix().encode() + b"\0" + file.read_bytes())
    return sha.hexdigest()[:12]


# --- loading ---------------------------------------------------------------------------------


def load_single_file(
    entry: ModelEntry, kind: ModelKind, *, dtype: torch.dtype, cache_dir: Path | None = None
) -> DiffusionPipeline:
    """The txt2img (or x4 upscale) pipeline of a single file, on the CPU, loaded offline.

    `kind` may be UNKNOWN (it is then read from the file); a known `kind` that the file
    contradicts is an error rather than a load into the wrong pipeline. `entry.prediction`
    overrides the scheduler's prediction type (SD 2 768-v files cannot say it themselves).
    """
    path = Path(entry.path)
    with job_context(field="model", value=entry.name):
        if not path.is_file():
            raise model_file_error(path, "does not exist")
        info = inspect_checkpoint(path)  # for a .ckpt: the weights_only read, before diffusers opens it
        if info.problem:
            raise JobFailed(
                f"{path} cannot be loaded: {info.problem}",
                code=Code.MODEL_FAILED,
                fix="use a Stable Diffusion 1.x, 2.x or XL base checkpoint (or an x4 upscaler)",
            )
        if kind is not ModelKind.UNKNOWN and kind is not info.kind:
            raise JobFailed(
                f"{path} holds an {info.variant} model, but it was taken for {kind}",
                code=Code.MODEL_FAILED,
                fix="check which file `models:` names",
            )
        kind = info.kind
        if kind is ModelKind.DEPTH2IMG:
            raise JobFailed(
                f"{path} is an SD 2 depth checkpoint: diffusers cannot load depth models from a single file",
                code=Code.MODEL_FAILED,
                fix="use the diffusers folder of the depth model (stable-diffusion-2-depth layout) instead",
            )
        config = resolve_config(entry, kind, cache_dir=cache_dir)
        pipeline_class, extra = _pipeline_for(kind)
        try:
            pipe = pipeline_class.from_single_file(
                str(path), config=str(config), local_files_only=True, torch_dtype=dtype, **extra
            )
        except Exception as exc:
            raise JobFailed(
                f"{path} could not be loaded with the configs in {config}: {type(exc).__name__}: {exc}",
                code=Code.MODEL_FAILED,
                fix="check that the configs belong to this checkpoint's architecture (same family and sizes); "
                "name the right diffusers folder as `config:` for the model",
            ) from exc
    _apply_prediction(pipe, entry.prediction)
    return pipe


def _pipeline_for(kind: ModelKind) -> tuple[type[FromSingleFileMixin], dict[str, Any]]:
    """The pipeline class and the components it must not look for in the config folder."""
    from diffusers import StableDiffusionPipeline, StableDiffusionUpscalePipeline, StableDiffusionXLPipeline

    if kind is ModelKind.SDXL:
        # diffusiond applies its own watermark; SDXL's built-in one would stamp a second, fixed one.
        return StableDiffusionXLPipeline, {"image_encoder": None, "feature_extractor": None, "add_watermarker": False}
    if kind is ModelKind.UPSCALER_X4:
        return StableDiffusionUpscalePipeline, {"safety_checker": None, "feature_extractor": None, "watermarker": None}
    return StableDiffusionPipeline, {
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }


def _apply_prediction(pipe: Any, prediction: str | None) -> None:
    if prediction and pipe.scheduler.config.get("prediction_type") != prediction:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction)
