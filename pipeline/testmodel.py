"""Tiny random-weight models in the real on-disk layouts, for tests and demos without downloads.

The daemon loads models only from local diffusers folders, so tests need folders that load
exactly like real ones (`from_pretrained(..., local_files_only=True)`, safetensors weights)
but are about 6 MB each and generate in well under a second on a CPU. The weights are
random (seeded, so the files are byte-identical from run to run): the images are noise.

Shapes follow the real models where the pipelines depend on them:

- the SD VAE has 4 blocks, so it downsamples by 8 (a 512 px request is a 64 px latent,
  not the 256 px latent a 2-block test VAE gives, which took over 10 minutes);
- the x4 upscaler VAE has 3 blocks (latent = image / 4) and `scaling_factor` 0.08333, and
  its UNet takes 7 channels (4 latent + 3 noised low-res image) and the noise level as a
  class label;
- the tokenizer pads to 77 tokens and the text encoder has 77 positions.

`make_family_models` adds the other families the daemon drives, told apart by
`catalog.detect_kind` exactly as real folders are:

- `sd2-v`: SD 2.1 768-v layout, an OpenCLIP-like text encoder (`gelu`), a UNet with linear
  projections and per-block head counts, a tokenizer padding with "!", v-prediction DDIM;
- `sdxl`: SDXL base layout, CLIP + OpenCLIP-with-projection text encoders whose penultimate
  states the UNet reads side by side, `text_time` added conditioning (pooled text + 6 size and
  crop numbers), Euler, `force_zeros_for_empty_prompt`; it also drives the img2img pipeline;
- `depth2img`: SD 2 depth layout, a 5-channel UNet (latent + depth), a tiny DPT depth
  estimator and its image processor (the PIL one: transformers 5 wants torchvision otherwise).

Their default size is 64 px (`sample_size` 8), not the real 768/1024/512 px.

`make_test_inpaint` writes `sd-inpaint`, the SD 1.5 inpainting layout (a 9-channel UNet: latent,
mask, masked-image latent) with the `sd` model's text encoder, tokenizer and VAE (and
`make_test_sdxl_inpaint` `sdxl-inpaint`, the same for SDXL), and
`make_test_controlnet` a ControlNet for any of the test models (its UNet's encoder copied, the
zero-initialised output convs made random so that a control changes the image).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any

from diffusiond.pipeline.clip_tokenizer import BOS, EOS, OPENCLIP_PAD, bytes_to_unicode, write_clip_tokenizer

MARKER_NAME = "diffusiond_test_model.json"
"""The file that marks a folder as a generated test model."""

SEED = 20241124
"""Seed of the random weights: a fixed seed makes the written files byte-identical."""

_FORMAT_VERSION = 1
"""Bump when the layout changes, so an old folder is rebuilt rather than reused."""

_SD_DIR = "sd"
_UPSCALER_DIR = "x4-upscaler"
_SD2_V_DIR = "sd2-v"
_SDXL_DIR = "sdxl"
_SDXL_REFINER_DIR = "sdxl-refiner"
_DEPTH2IMG_DIR = "depth2img"
_SD_INPAINT_DIR = "sd-inpaint"
_SDXL_INPAINT_DIR = "sdxl-inpaint"
_CONTROLNET_KIND = "controlnet"
_CONTROL_EMBEDDING_CHANNELS = (8, 8, 16, 16)
"""The control image encoder's channels: 4 entries, 3 stride-2 convs, so a control image is encoded
at 1/8 of its size, the latent size (real ControlNets: 16, 32, 96, 256)."""
_SD_BETAS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}
"""The noise schedule every SD 1.x/2.x/XL model was trained with (the x4 upscaler has its own)."""

# Words the hand-written BPE merges spell whole, so common prompt words are single tokens
# (as with the real CLIP vocabulary); anything else still tokenizes, byte by byte.
_WORDS = " ".join(
    (
        "a an and at by in of on the to with photo painting portrait landscape cat dog house tree",
        "mountain river sky sunset city street forest flower red blue green black white big small",
        "old new beautiful detailed sharp blurry bad ugly low quality high best art style light dark",
        "night day water sea cloud person woman man girl boy face eyes hair car boat road",
    )
).split()


@dataclass(frozen=True)
class TestModelPaths:
    """Where `make_test_model` put the two models."""

    __test__ = False  # not a pytest test class, despite the name

    sd: Path
    """Diffusers folder in the StableDiffusionPipeline layout (txt2img and img2img)."""
    upscaler: Path
    """Diffusers folder in the StableDiffusionUpscalePipeline (x4) layout."""


@dataclass(frozen=True)
class FamilyModelPaths:
    """Where `make_family_models` put the SD 2.x, SDXL and depth-to-image models."""

    sd2_v: Path
    """StableDiffusionPipeline folder in the SD 2.1 (768-v) layout: OpenCLIP-like text encoder, v-prediction."""
    sdxl: Path
    """StableDiffusionXLPipeline folder (two text encoders); also drives StableDiffusionXLImg2ImgPipeline."""
    depth2img: Path
    """StableDiffusionDepth2ImgPipeline folder (5-channel UNet, DPT depth estimator)."""
    sdxl_refiner: Path
    """StableDiffusionXLImg2ImgPipeline folder in the refiner layout (second text encoder only)."""


def is_test_model(path: Path | str) -> bool:
    """Whether `path` is a folder written by `make_test_model` or `make_family_models` (random weights)."""
    try:
        marker = json.loads((Path(path) / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("test_model") is True


def make_test_model(directory: Path, *, overwrite: bool = False) -> TestModelPaths:
    """Write tiny random-weight models into `directory/sd` and `directory/x4-upscaler`.

    A folder that already holds a test model of this format is kept as it is (the same
    seed gives the same weights, so rebuilding would write the same bytes) unless
    `overwrite` is set. A folder that exists but is not a test model is never deleted:
    `FileExistsError`. Each model is written to a temporary folder and renamed into
    place, so an interrupted run leaves no half-written model behind.
    """
    directory = Path(directory)
    paths = TestModelPaths(sd=directory / _SD_DIR, upscaler=directory / _UPSCALER_DIR)
    _write_models(directory, {paths.sd: _save_sd, paths.upscaler: _save_upscaler}, _build_components, overwrite)
    return paths


def make_test_inpaint(directory: Path, *, overwrite: bool = False) -> Path:
    """Write a tiny random-weight SD 1.5 inpainting model into `directory/sd-inpaint` and return its path.

    A StableDiffusionInpaintPipeline folder: the `sd` test model's text encoder, tokenizer, VAE and
    scheduler (the same seed gives the same modules) and a UNet like its UNet but with 9 input channels
    (4 latent + 1 mask + 4 masked-image latent), as runwayml's stable-diffusion-inpainting has. Kept,
    replaced and written exactly as `make_test_model` does.
    """
    directory = Path(directory)
    target = directory / _SD_INPAINT_DIR
    _write_models(directory, {target: _save_sd_inpaint}, _build_inpaint_components, overwrite)
    return target


def make_test_sdxl_inpaint(directory: Path, *, overwrite: bool = False) -> Path:
    """Write a tiny random-weight SDXL inpainting model into `directory/sdxl-inpaint` and return its path.

    A StableDiffusionXLInpaintPipeline folder as diffusers/stable-diffusion-xl-1.0-inpainting-0.1 ships
    it: the `sdxl` test model's text encoders, tokenizers, VAE and scheduler, and its UNet with 9 input
    channels. Kept, replaced and written exactly as `make_test_model` does.
    """
    directory = Path(directory)
    target = directory / _SDXL_INPAINT_DIR
    _write_models(directory, {target: _save_sdxl_inpaint}, _build_sdxl_inpaint_components, overwrite)
    return target


def write_controlnet_file(controlnet: Path, path: Path) -> Path:
    """A diffusers ControlNet folder (`make_test_controlnet`) as one `.safetensors` file in the original
    (lllyasviel) layout, `control_model.input_blocks...`, as ControlNets are published: the reverse of
    diffusers' `convert_controlnet_checkpoint`, so loading it back gives every tensor again (SD 1.x, 2.x)."""
    import re

    from safetensors.torch import load_file, save_file

    config = json.loads((Path(controlnet) / "config.json").read_text(encoding="utf-8"))
    per_block = config["layers_per_block"]
    resnet = (
        ("norm1", "in_layers.0"),
        ("conv1", "in_layers.2"),
        ("time_emb_proj", "emb_layers.1"),
        ("norm2", "out_layers.0"),
        ("conv2", "out_layers.3"),
        ("conv_shortcut", "skip_connection"),
    )
    plain = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "controlnet_cond_embedding.conv_in": "input_hint_block.0",
        "controlnet_cond_embedding.conv_out": "input_hint_block.14",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
    }

    def resnet_key(key: str) -> str:
        for ours, theirs in resnet:
            if key.startswith(ours):
                return theirs + key[len(ours) :]
        return key

    original = {}
    for key, tensor in load_file(str(Path(controlnet) / "diffusion_pytorch_model.safetensors")).items():
        if found := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.*)", key):
            block, kind, layer, rest = int(found[1]), found[2], int(found[3]), found[4]
            first = 1 + block * (per_block + 1)
            if kind == "resnets":
                name = f"input_blocks.{first + layer}.0.{resnet_key(rest)}"
            elif kind == "attentions":
                name = f"input_blocks.{first + layer}.1.{rest}"
            else:
                name = f"input_blocks.{first + per_block}.0.op.{rest.removeprefix('conv.')}"
        elif found := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
            kind, layer, rest = found[1], int(found[2]), found[3]
            name = f"middle_block.{2 * layer}.{resnet_key(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
        elif found := re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(.*)", key):
            name = f"zero_convs.{found[1]}.0.{found[2]}"
        elif key.startswith("controlnet_mid_block."):
            name = "middle_block_out.0." + key.split(".", 1)[1]
        elif found := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.*)", key):
            name = f"input_hint_block.{2 * (int(found[1]) + 1)}.{found[2]}"
        else:
            module, parameter = key.rsplit(".", 1)
            name = f"{plain[module]}.{parameter}"
        original[f"control_model.{name}"] = tensor.contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(original, str(path))
    return path


def make_test_controlnet(model: Path, path: Path, *, seed: int = 11) -> Path:
    """Write a tiny random-weight ControlNet for the test model folder `model` into the folder `path`.

    A diffusers `ControlNetModel` folder (config.json, diffusion_pytorch_model.safetensors) made with
    `ControlNetModel.from_unet` from `model`'s UNet (SD 1, SD 2.x and SDXL alike: the SDXL `text_time`
    conditioning comes along), so it has the UNet's encoder weights; its control image encoder has
    small channels and encodes at 1/8 of the image size (a 64 px control image gives 8 x 8 features,
    the latent size). A real ControlNet starts with zero output convolutions, which add nothing to
    the UNet: here they are random (after `seed`), so a control visibly changes the image, and a
    different control image gives a different image.

    A folder that already holds a test ControlNet made with `seed` is kept as it is; one that is not
    a test model is never deleted (`FileExistsError`); the folder is written to a temporary folder
    next to it and renamed into place.
    """
    path = Path(path)
    if not _needs_build(path, overwrite=False):
        marker = json.loads((path / MARKER_NAME).read_text(encoding="utf-8"))
        if marker.get("kind") != _CONTROLNET_KIND:
            raise FileExistsError(f"{path} is a diffusiond test model, not a ControlNet; refusing to replace it")
        if marker.get("seed") == seed:
            return path

    def save(staging: Path) -> None:
        import torch
        from diffusers import ControlNetModel, UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(Path(model) / "unet", local_files_only=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the modules from_unet does not copy from the UNet
            controlnet = ControlNetModel.from_unet(
                unet, conditioning_embedding_out_channels=_CONTROL_EMBEDDING_CHANNELS
            )
        # The zero convolutions (into the UNet's skip connections) made random; and the control image's
        # encoder given He-normal weights and a strong output conv: with the default init its features are
        # so small that two different control images gave the same picture (0.001 of 255 apart; now ~4).
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, parameter in controlnet.named_parameters():
                if name.startswith(("controlnet_down_blocks.", "controlnet_mid_block.")):
                    scale = 0.1
                elif name.startswith("controlnet_cond_embedding.conv_out."):
                    scale = 1.0
                elif name.startswith("controlnet_cond_embedding.") and name.endswith(".weight"):
                    scale = (2.0 / parameter[0].numel()) ** 0.5
                else:
                    continue
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
        controlnet.save_pretrained(staging, safe_serialization=True)

    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, save, kind=_CONTROLNET_KIND, seed=seed)
    return path


def make_test_lora(model: Path, path: Path, *, seed: int = 7, kohya: bool = True, text_encoder: bool = False) -> Path:
    """A tiny random LoRA for the test SD model at `model`, written to `path` (a .safetensors).

    `kohya`: the Kohya/A1111 layout (`lora_unet_..._to_q.lora_down.weight`, `.alpha`), as LoRA
    files from model sites are; else diffusers' own layout (`unet.<module>.lora_A.weight`).
    `text_encoder`: also the text encoder's attention (`lora_te_text_model_encoder_layers_N_...`,
    Kohya layout), as most LoRAs trained with kohya's scripts have.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    unet = UNet2DConditionModel.from_pretrained(Path(model) / "unet", local_files_only=True)
    rank = 4
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_" in name:  # peft starts B at zero (a no-op LoRA): both random, so it changes images
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    state = get_peft_model_state_dict(unet)
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        module, _, kind = key.rpartition(".lora_")
        if not kohya:
            tensors[f"unet.{key}"] = tensor.contiguous()
            continue
        name = "lora_unet_" + module.replace(".", "_")
        tensors[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = tensor.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    if text_encoder:
        config = json.loads((Path(model) / "text_encoder" / "config.json").read_text())
        hidden = config["hidden_size"]
        for layer in range(config["num_hidden_layers"]):
            for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):
                name = f"lora_te_text_model_encoder_layers_{layer}_self_attn_{projection}"
                tensors[f"{name}.lora_down.weight"] = torch.randn((rank, hidden), generator=generator) * 0.3
                tensors[f"{name}.lora_up.weight"] = torch.randn((hidden, rank), generator=generator) * 0.3
                tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def make_test_embedding(model: Path, path: Path, *, vectors: int = 2, seed: int = 9) -> Path:
    """A tiny random textual-inversion embedding for a test model's text encoder, in A1111's `.pt`
    layout (`string_to_param`, read back with `weights_only=True`) or, for `.safetensors`, diffusers'
    one (`{name: tensor}`); for an SDXL model `{clip_l, clip_g}` (a .safetensors), as SDXL files are."""
    import json

    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)

    def vectors_for(encoder: str) -> torch.Tensor:
        width = json.loads((Path(model) / encoder / "config.json").read_text())["hidden_size"]
        return torch.randn((vectors, width), generator=generator)

    path.parent.mkdir(parents=True, exist_ok=True)
    if (Path(model) / "text_encoder_2").is_dir():  # SDXL: one set of vectors per text encoder
        save_file({"clip_l": vectors_for("text_encoder"), "clip_g": vectors_for("text_encoder_2")}, str(path))
        return path
    tensor = vectors_for("text_encoder")
    if path.suffix == ".safetensors":
        save_file({path.stem: tensor}, str(path))
    else:
        torch.save({"string_to_param": {"*": tensor}, "name": path.stem, "step": 0}, path)
    return path


def make_family_models(directory: Path, *, overwrite: bool = False) -> FamilyModelPaths:
    """Write tiny random-weight SD 2.x (v), SDXL and SD 2 depth models into `directory`.

    Folders `sd2-v`, `sdxl` and `depth2img`, kept, replaced and written exactly as
    `make_test_model` does (same marker file, same refusal to touch foreign folders).
    """
    directory = Path(directory)
    paths = FamilyModelPaths(
        sd2_v=directory / _SD2_V_DIR,
        sdxl=directory / _SDXL_DIR,
        depth2img=directory / _DEPTH2IMG_DIR,
        sdxl_refiner=directory / _SDXL_REFINER_DIR,
    )
    builders = {
        paths.sd2_v: _save_sd2_v,
        paths.sdxl: _save_sdxl,
        paths.depth2img: _save_depth2img,
        paths.sdxl_refiner: _save_sdxl_refiner,
    }
    _write_models(directory, builders, _build_family_components, overwrite)
    return paths


def _write_models(
    directory: Path,
    builders: Mapping[Path, Callable[[dict[str, Any], Path], None]],
    build_components: Callable[[], dict[str, Any]],
    overwrite: bool,
) -> None:
    """Build the modules once, then save each model that needs it to a temporary folder and rename it into place."""
    todo = [target for target in builders if _needs_build(target, overwrite)]
    if not todo:
        return
    directory.mkdir(parents=True, exist_ok=True)
    components = build_components()
    for target in todo:
        _write_atomically(target, partial(builders[target], components), kind=target.name)


def _write_atomically(target: Path, save: Callable[[Path], None], *, kind: str, seed: int = SEED) -> None:
    """`save` into a temporary folder beside `target`, mark it, open its modes, then rename it into place."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with _no_progress_bars():
            save(staging)
        _write_marker(staging, kind=kind, seed=seed)
        _readable_by_all(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _readable_by_all(folder: Path) -> None:
    """Modes as the umask gives them: mkdtemp makes the folder 0700 and safetensors its files 0600,
    which would hide a model made by root from a service's own user (`diffusiond make-test-model`
    then the service: "permission denied")."""
    umask = _umask()
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _umask() -> int:
    """The process's umask, read without changing it (Linux; elsewhere the usual 022)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence transformers' "Writing model shards" bar (it would clutter test and daemon logs)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _needs_build(target: Path, overwrite: bool) -> bool:
    """False to reuse `target`; raises rather than touch a folder that is not ours."""
    if not target.exists():
        return True
    if not is_test_model(target):
        if target.is_dir() and not any(target.iterdir()):
            return True
        raise FileExistsError(f"{target} exists and is not a diffusiond test model; refusing to replace it")
    if overwrite:
        return True
    marker = json.loads((target / MARKER_NAME).read_text(encoding="utf-8"))
    return marker.get("format") != _FORMAT_VERSION


def _write_marker(folder: Path, *, kind: str, seed: int = SEED) -> None:
    marker = {
        "test_model": True,
        "note": "random weights: images are noise; made by diffusiond.pipeline.testmodel for tests",
        "kind": kind,
        "format": _FORMAT_VERSION,
        "seed": seed,
    }
    (folder / MARKER_NAME).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# --- tokenizer -----------------------------------------------------------------------------


def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """A CLIP-style vocabulary: bytes, bytes ending a word, merges spelling `_WORDS`, then BOS/EOS."""
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    ranks: dict[tuple[str, str], int] = {}
    for word in _WORDS:
        # Segment with the merges so far (BPE applies them by rank, so "cat" would stop at
        # "c" + "at</w>" once "at" has a merge), then join the pieces left to right.
        symbols = _apply_merges([*word[:-1], word[-1] + "</w>"], ranks)
        while len(symbols) > 1:
            ranks[(symbols[0], symbols[1])] = len(ranks)
            tokens.append(symbols[0] + symbols[1])
            symbols = [symbols[0] + symbols[1], *symbols[2:]]
    tokens += [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}, [f"{a} {b}" for a, b in ranks]


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly join the adjacent pair with the best rank."""
    while len(symbols) > 1:
        pairs = [(ranks[pair], i) for i, pair in enumerate(pairwise(symbols)) if pair in ranks]
        if not pairs:
            break
        _, i = min(pairs)
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2 :]]
    return symbols


# --- models --------------------------------------------------------------------------------


def _build_components() -> dict[str, Any]:
    """Every module of both models, made in a fixed order after one fixed seed."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    vocab, merges = _vocab_and_merges()
    tokenizer = _tokenizer(vocab, merges, pad_token=EOS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        text_encoder = CLIPTextModel(_text_config(vocab, hidden=32, act="quick_gelu", pad_token=EOS))
        sd_unet = _sd_unet(in_channels=4)
        sd_vae = _vae(scaling_factor=0.18215)
        up_unet = UNet2DConditionModel(
            sample_size=32,
            in_channels=7,  # 4 latent channels + the 3-channel noised low-res image
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            use_linear_projection=True,
            only_cross_attention=(True, True, False),
            num_class_embeds=1000,  # the noise level (<= max_noise_level 350) is the class label
        )
        # 3 blocks: latents are 1/4 of the image. The real x4 upscaler's scaling factor (the pipeline warns otherwise).
        up_vae = _vae(scaling_factor=0.08333, blocks=3, sample_size=128)
    return {
        "tokenizer": tokenizer,
        "vocab": vocab,
        "merges": merges,
        "text_encoder": text_encoder,
        "sd_unet": sd_unet,
        "sd_vae": sd_vae,
        "up_unet": up_unet,
        "up_vae": up_vae,
    }


def _sd_unet(*, in_channels: int) -> Any:
    """The SD 1 test UNet: 2 blocks, 64 px by default (sample size 8; SD 1.5: 64 -> 512 px)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )


def _build_inpaint_components() -> dict[str, Any]:
    """`_build_components`'s modules (so `sd-inpaint` shares the `sd` text encoder and VAE) and a 9-channel UNet."""
    import torch

    c = _build_components()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        c["inpaint_unet"] = _sd_unet(in_channels=9)  # 4 latent + 1 mask + 4 masked-image latent channels
    return c


def _sd_scheduler() -> Any:
    """PNDM as SD 1.5 (and its inpainting model) ships it."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        **_SD_BETAS,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def _save_sd(c: dict[str, Any], folder: Path) -> None:
    """SD 1.5 layout with the SD 1.5 scheduler config; no safety checker."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=c["sd_vae"],
        text_encoder=c["text_encoder"],
        tokenizer=c["tokenizer"],
        unet=c["sd_unet"],
        scheduler=_sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    _save_with_tokenizers(pipe, folder, c, {"tokenizer": EOS})


def _save_sd_inpaint(c: dict[str, Any], folder: Path) -> None:
    """SD 1.5 inpainting layout: the `sd` model's parts and scheduler, the 9-channel UNet; no safety checker."""
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline(
        vae=c["sd_vae"],
        text_encoder=c["text_encoder"],
        tokenizer=c["tokenizer"],
        unet=c["inpaint_unet"],
        scheduler=_sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    _save_with_tokenizers(pipe, folder, c, {"tokenizer": EOS})


def _save_upscaler(c: dict[str, Any], folder: Path) -> None:
    """x4 upscaler layout: v-prediction DDIM, DDPM for noising the low-res input, max noise 350."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline

    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
    )
    low_res_scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="scaled_linear",
        clip_sample=False,
        variance_type="fixed_small",
    )
    pipe = StableDiffusionUpscalePipeline(
        vae=c["up_vae"],
        text_encoder=c["text_encoder"],
        tokenizer=c["tokenizer"],
        unet=c["up_unet"],
        low_res_scheduler=low_res_scheduler,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        watermarker=None,
        max_noise_level=350,
    )
    _save_with_tokenizers(pipe, folder, c, {"tokenizer": EOS})


# --- SD 2.x, SDXL and depth-to-image -------------------------------------------------------


def _tokenizer(vocab: dict[str, int], merges: list[str], *, pad_token: str) -> Any:
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(Path(tmp), vocab=vocab, merges=merges, pad_token=pad_token)
        return CLIPTokenizer.from_pretrained(tmp, local_files_only=True)


def _text_config(vocab: dict[str, int], *, hidden: int, act: str, pad_token: str) -> Any:
    """A 2-layer CLIP text config; `act` "quick_gelu" is OpenAI CLIP (SD 1, SDXL's first), "gelu" OpenCLIP."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=37,
        projection_dim=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=act,
        layer_norm_eps=1e-5,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[pad_token],
    )


def _vae(*, scaling_factor: float, blocks: int = 4, sample_size: int = 64, **extra: Any) -> Any:
    """The SD / SDXL VAE layout: 4 blocks, so latents are 1/8 of the image (the x4 upscaler's: 3, 1/4)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=(8, 16, 32, 32)[:blocks],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
        **extra,
    )


def _sd2_unet(*, in_channels: int, upcast_attention: bool) -> Any:
    """SD 2.x UNet layout: 4 blocks (3 with attention), linear projections, heads per block (SD 2: 5/10/20/20)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,  # 64 px by default (SD 2.1 768-v: 96 -> 768 px; SD 2 depth: 64 -> 512 px)
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(16, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32,
        attention_head_dim=(2, 4, 8, 8),
        use_linear_projection=True,
        upcast_attention=upcast_attention,
        norm_num_groups=8,
    )


def _build_family_components() -> dict[str, Any]:
    """Every module of the SD 2.x, SDXL and depth models, made in a fixed order after one fixed seed."""
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, DPTConfig, DPTForDepthEstimation

    vocab, merges = _vocab_and_merges()
    c: dict[str, Any] = {
        "vocab": vocab,
        "merges": merges,
        "clip_tokenizer": _tokenizer(vocab, merges, pad_token=EOS),
        "openclip_tokenizer": _tokenizer(vocab, merges, pad_token=OPENCLIP_PAD),
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        # SD 2.x: OpenCLIP ViT-H text encoder (gelu), the SD VAE; sd2-v and depth share both, as the real ones do.
        c["sd2_text_encoder"] = CLIPTextModel(_text_config(vocab, hidden=32, act="gelu", pad_token=OPENCLIP_PAD))
        c["sd2_vae"] = _vae(scaling_factor=0.18215)
        c["sd2_unet"] = _sd2_unet(in_channels=4, upcast_attention=True)  # 2.1 sets upcast_attention
        c["depth_unet"] = _sd2_unet(in_channels=5, upcast_attention=False)  # 4 latent channels + depth
        c["depth_estimator"] = DPTForDepthEstimation(
            DPTConfig(
                image_size=32,
                patch_size=8,
                num_channels=3,
                hidden_size=32,
                num_hidden_layers=4,
                num_attention_heads=4,
                intermediate_size=37,
                backbone_out_indices=(0, 1, 2, 3),
                neck_hidden_sizes=(8, 16, 32, 32),
                fusion_hidden_size=16,
                use_auxiliary_head=False,
            )
        )
        # SDXL: CLIP ViT-L (quick_gelu) + OpenCLIP bigG with projection (gelu). The UNet attends to both
        # encoders' penultimate hidden states side by side (32 + 48 = 80; real 768 + 1280 = 2048) and
        # conditions on the pooled projection plus 6 size/crop numbers (6 * 8 + 48 = 96; real 6 * 256 + 1280).
        c["sdxl_text_encoder"] = CLIPTextModel(_text_config(vocab, hidden=32, act="quick_gelu", pad_token=EOS))
        c["sdxl_text_encoder_2"] = CLIPTextModelWithProjection(
            _text_config(vocab, hidden=48, act="gelu", pad_token=OPENCLIP_PAD)
        )
        c["sdxl_unet"] = _sdxl_unet(cross_attention_dim=32 + 48, time_numbers=6, transformer_layers=(1, 2, 2))
        c["sdxl_vae"] = _vae(scaling_factor=0.13025, force_upcast=True)
        # The refiner: the second encoder alone (48), pooled projection plus 5 numbers (sizes, crop and the
        # aesthetic score: 5 * 8 + 48 = 88; real 5 * 256 + 1280 = 2560).
        c["sdxl_refiner_unet"] = _sdxl_unet(cross_attention_dim=48, time_numbers=5, transformer_layers=(1, 1, 1))
    return c


def _sdxl_unet(
    *, cross_attention_dim: int, time_numbers: int, transformer_layers: tuple[int, ...], in_channels: int = 4
) -> Any:
    """A tiny SDXL UNet: 64 px by default (real: 128 latents, 1024 px), conditioned on the text encoders'
    hidden states (`cross_attention_dim`) and on the second one's pooled projection (48) plus
    `time_numbers` sizes, crops (and the refiner's aesthetic score), 8 dimensions each."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(16, 32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 8),
        transformer_layers_per_block=transformer_layers,
        use_linear_projection=True,
        cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=time_numbers * 8 + 48,
        norm_num_groups=8,
    )


def _save_with_tokenizers(pipe: Any, folder: Path, c: dict[str, Any], pads: dict[str, str]) -> None:
    """`save_pretrained`, then each tokenizer folder written over with the files real SD folders ship."""
    pipe.save_pretrained(folder, safe_serialization=True)
    for name, pad_token in pads.items():
        write_clip_tokenizer(folder / name, vocab=c["vocab"], merges=c["merges"], pad_token=pad_token)


def _save_sd2_v(c: dict[str, Any], folder: Path) -> None:
    """SD 2.1 (768-v) layout: v-prediction DDIM, as stabilityai/stable-diffusion-2-1 ships; no safety checker."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(
        **_SD_BETAS,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
    )
    pipe = StableDiffusionPipeline(
        vae=c["sd2_vae"],
        text_encoder=c["sd2_text_encoder"],
        tokenizer=c["openclip_tokenizer"],
        unet=c["sd2_unet"],
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    _save_with_tokenizers(pipe, folder, c, {"tokenizer": OPENCLIP_PAD})


def _sdxl_scheduler() -> Any:
    """Euler as SDXL base 1.0 and its refiner ship it."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        **_SD_BETAS,
        interpolation_type="linear",
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
        use_karras_sigmas=False,
    )


def _save_sdxl(c: dict[str, Any], folder: Path) -> None:
    """SDXL base layout: Euler, `force_zeros_for_empty_prompt`, no image encoder (IP-Adapter) parts."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=c["sdxl_vae"],
        text_encoder=c["sdxl_text_encoder"],
        text_encoder_2=c["sdxl_text_encoder_2"],
        tokenizer=c["clip_tokenizer"],
        tokenizer_2=c["openclip_tokenizer"],
        unet=c["sdxl_unet"],
        scheduler=_sdxl_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,  # not saved; only skips building an encoder here
    )
    _save_with_tokenizers(pipe, folder, c, {"tokenizer": EOS, "tokenizer_2": OPENCLIP_PAD})


def _build_sdxl_inpaint_components() -> dict[str, Any]:
    """`_build_family_components`'s modules (`sdxl-inpaint` shares the `sdxl` encoders and VAE) and a 9-channel UNet."""
    import torch

    c = _build_family_components()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        c["sdxl_inpaint_unet"] = _sdxl_unet(
            cross_attention_dim=32 + 48, time_numbers=6, transformer_layers=(1, 2, 2), in_channels=9
        )
    return c


def _save_sdxl_inpaint(c: dict[str, Any], folder: Path) -> None:
    """SDXL inpainting layout: the base's parts and Euler, the 9-channel UNet, no aesthetic score."""
    from diffusers import StableDiffusionXLInpaintPipeline

    pipe = StableDiffusionXLInpaintPipeline(
        vae=c["sdxl_vae"],
        text_encoder=c["sdxl_text_encoder"],
        text_encoder_2=c["sdxl_text_encoder_2"],
        tokenizer=c["clip_tokenizer"],
        tokenizer_2=c["openclip_tokenizer"],
        unet=c["sdxl_inpaint_unet"],
        scheduler=_sdxl_scheduler(),
        requires_aesthetics_score=False,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    _save_with_tokenizers(pipe, folder, c, {"tokenizer": EOS, "tokenizer_2": OPENCLIP_PAD})


def _save_sdxl_refiner(c: dict[str, Any], folder: Path) -> None:
    """SDXL refiner layout: no first text encoder, `requires_aesthetics_score`, the base's VAE and Euler."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=c["sdxl_vae"],
        text_encoder=None,
        text_encoder_2=c["sdxl_text_encoder_2"],
        tokenizer=None,
        tokenizer_2=c["openclip_tokenizer"],
        unet=c["sdxl_refiner_unet"],
        scheduler=_sdxl_scheduler(),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    _save_with_tokenizers(pipe, folder, c, {"tokenizer_2": OPENCLIP_PAD})


def _save_depth2img(c: dict[str, Any], folder: Path) -> None:
    """SD 2 depth layout: PNDM (epsilon), 5-channel UNet, DPT depth estimator and its image processor."""
    from diffusers import PNDMScheduler, StableDiffusionDepth2ImgPipeline
    from transformers import DPTImageProcessorPil

    scheduler = PNDMScheduler(
        **_SD_BETAS,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    feature_extractor = DPTImageProcessorPil(size={"height": 32, "width": 32})
    pipe = StableDiffusionDepth2ImgPipeline(
        vae=c["sd2_vae"],
        text_encoder=c["sd2_text_encoder"],
        tokenizer=c["openclip_tokenizer"],
        unet=c["depth_unet"],
        scheduler=scheduler,
        depth_estimator=c["depth_estimator"],
        feature_extractor=feature_extractor,
    )
    _save_with_tokenizers(pipe, folder, c, {"tokenizer": OPENCLIP_PAD})
