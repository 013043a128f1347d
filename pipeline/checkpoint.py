"""Single-file checkpoints (`.safetensors`, `.ckpt` in the original LDM layout), loaded offline.

A single file holds weights only. diffusers also needs a diffusers-layout folder with the
configs and tokenizers, and by default fetches one from the hub, which the daemon never
contacts. So this module:

1. tells the family from the file's tensor names (a `.safetensors` header is read without
   loading a tensor or importing torch);
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

import bz2
import functools
import hashlib
import json
import os
import pickle
import re
import shutil
import struct
import tempfile
import threading
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffusiond.pipeline.catalog import ModelEntry, ModelKind, detect_kind
from diffusiond.pipeline.errors import Code, ConfigError, DiffusiondError, JobFailed

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

CONFIGS_DIR = Path(__file__).parent / "configs"
"""The configs the project ships, one diffusers-layout folder per family (see its README.md)."""

_MERGES_FILE = CONFIGS_DIR / "clip-merges.txt.bz2"
_MERGES_SHA256 = "d308b7377a8ceaa9707a21614fe8c831b9196e197b7aeb69833359362907af02"
"""sha256 of the decompressed merges: a damaged install is reported, not turned into a wrong tokenizer."""

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
OPENCLIP_PAD = "!"
"""OpenCLIP (SD 2, SDXL's second encoder) pads with token 0, which is "!"; CLIP ViT-L pads with EOS."""

UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
"""The UNet's input conv: its in_channels tell txt2img (4), depth (5), x4 upscaler (7) and inpaint (9) apart."""

_MAX_HEADER = 100_000_000
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


@dataclass(frozen=True)
class CheckpointInfo:
    """What a single file's tensor names say about it."""

    kind: ModelKind
    variant: str
    """In words: sd1, sd2, sdxl, sd2-depth, x4-upscaler, or an unsupported one (sd1-inpaint, sdxl-refiner, ...)."""
    problem: str = ""
    """Why the daemon cannot load this file; empty when it can."""


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
        raise _file_error(path, f"cannot be read: {exc.strerror or exc}") from exc
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    with _INFO_LOCK:
        cached = _INFO_CACHE.get(key)
    if cached is not None:
        return cached
    info = inspect_shapes(_shapes(path))
    with _INFO_LOCK:
        _INFO_CACHE[key] = info
    return info


def inspect_shapes(shapes: Mapping[str, tuple[int, ...]]) -> CheckpointInfo:
    """The family from an original-layout state dict's names (and one shape), without its values."""

    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in shapes)

    unet_in = shapes.get(UNET_IN, ())
    in_channels = unet_in[1] if len(unet_in) >= 2 else None
    inpaint = "inpainting checkpoints are not supported (diffusiond runs txt2img, img2img and upscale)"
    if has("conditioner.embedders."):
        if not has("conditioner.embedders.1."):
            return CheckpointInfo(
                ModelKind.UNKNOWN, "sdxl-refiner", "an SDXL refiner checkpoint: only SDXL base models are supported"
            )
        if in_channels == 9:
            return CheckpointInfo(ModelKind.UNKNOWN, "sdxl-inpaint", f"an SDXL inpainting checkpoint: {inpaint}")
        return CheckpointInfo(ModelKind.SDXL, "sdxl")
    if has("cond_stage_model.model."):  # OpenCLIP ViT-H: the SD 2.x family
        if in_channels == 5:
            return CheckpointInfo(ModelKind.DEPTH2IMG, "sd2-depth")
        if in_channels == 7:
            return CheckpointInfo(ModelKind.UPSCALER_X4, "x4-upscaler")
        if in_channels == 9:
            return CheckpointInfo(ModelKind.UNKNOWN, "sd2-inpaint", f"an SD 2 inpainting checkpoint: {inpaint}")
        return CheckpointInfo(ModelKind.SD2, "sd2")
    if has("cond_stage_model.transformer."):  # OpenAI CLIP ViT-L: the SD 1.x family
        if in_channels == 9:
            return CheckpointInfo(ModelKind.UNKNOWN, "sd1-inpaint", f"an SD 1 inpainting checkpoint: {inpaint}")
        if in_channels == 8:
            return CheckpointInfo(
                ModelKind.UNKNOWN, "sd1-instruct-pix2pix", "an InstructPix2Pix checkpoint: not supported"
            )
        return CheckpointInfo(ModelKind.SD1, "sd1")
    if has("model.diffusion_model."):
        return CheckpointInfo(
            ModelKind.UNKNOWN, "unet-only", "it holds a UNet but no text encoder (cond_stage_model.* / conditioner.*)"
        )
    return CheckpointInfo(
        ModelKind.UNKNOWN,
        "unknown",
        "it is not a Stable Diffusion checkpoint in the original layout (no model.diffusion_model.*, "
        "cond_stage_model.* or conditioner.* tensors): a LoRA, a VAE, an embedding or a diffusers-layout file "
        "cannot be loaded as a model",
    )


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            header = _safetensors_header(path)
            return {key: tuple(int(n) for n in meta["shape"]) for key, meta in header.items()}
        except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
            raise _file_error(path, f"is not a readable .safetensors file ({exc})") from exc
    if suffix == ".ckpt":
        state = read_ckpt(path)
        return {key: tuple(value.shape) for key, value in state.items() if hasattr(value, "shape")}
    raise _file_error(path, "is neither a .safetensors nor a .ckpt file")


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The header of a .safetensors file (8-byte little-endian length, then JSON): no tensor, no torch."""
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ValueError("shorter than a safetensors header")
        (length,) = struct.unpack("<Q", raw)
        if length > _MAX_HEADER:
            raise ValueError(f"a {length}-byte header")
        header = json.loads(handle.read(length))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    header.pop("__metadata__", None)
    return header


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
        raise _file_error(path, f"is not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise _file_error(path, f"holds a {type(data).__name__}, not a state dict")
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


def _file_error(path: Path, what: str) -> JobFailed:
    return JobFailed(
        f"{path} {what}",
        code=Code.MODEL_FAILED,
        fix="point `models:` at a Stable Diffusion .safetensors/.ckpt file in the original layout, "
        "or at a diffusers folder",
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
                    _write_vocab_files(sub)
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
    sha = hashlib.sha256(_MERGES_SHA256.encode())
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        sha.update(file.relative_to(source).as_posix().encode() + b"\0" + file.read_bytes())
    return sha.hexdigest()[:12]


# --- the CLIP tokenizer ----------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's byte-level alphabet: each of the 256 bytes maps to a printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


@functools.cache
def clip_merges() -> tuple[str, ...]:
    """The 48,894 BPE merges of the CLIP tokenizer, from the shipped compressed file."""
    try:
        data = bz2.decompress(_MERGES_FILE.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot read the shipped CLIP merges {_MERGES_FILE}: {exc}", fix="reinstall diffusiond"
        ) from exc
    if hashlib.sha256(data).hexdigest() != _MERGES_SHA256:
        raise ConfigError(f"the shipped CLIP merges {_MERGES_FILE} are damaged", fix="reinstall diffusiond")
    return tuple(data.decode("utf-8").splitlines())


def clip_vocab() -> dict[str, int]:
    """CLIP's vocabulary as its SimpleTokenizer builds it: bytes, bytes + `</w>`, one per merge, BOS, EOS."""
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [symbol + "</w>" for symbol in alphabet]
    tokens += [merge.replace(" ", "") for merge in clip_merges()]
    tokens += [BOS, EOS]
    return {token: index for index, token in enumerate(tokens)}


def _write_vocab_files(folder: Path) -> None:
    (folder / "vocab.json").write_text(json.dumps(clip_vocab(), ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(clip_merges()) + "\n", encoding="utf-8")


def write_clip_tokenizer(folder: Path, *, pad_token: str = EOS) -> None:
    """A complete CLIPTokenizer folder (the real 49,408-token vocabulary), e.g. for a hand-made config.

    `pad_token`: EOS for CLIP ViT-L (SD 1, SDXL `tokenizer`), OPENCLIP_PAD for SD 2 and SDXL `tokenizer_2`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_vocab_files(folder)
    config = {
        "add_prefix_space": False,
        "bos_token": BOS,
        "do_lower_case": True,
        "eos_token": EOS,
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS,
    }
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": pad_token, "unk_token": EOS}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


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
    try:
        if not path.is_file():
            raise _file_error(path, "does not exist")
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
    except DiffusiondError as exc:
        if exc.field is None:
            exc.field, exc.value = "model", entry.name
        raise
    _apply_prediction(pipe, entry.prediction)
    return pipe


def _pipeline_for(kind: ModelKind) -> tuple[type, dict[str, Any]]:
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
