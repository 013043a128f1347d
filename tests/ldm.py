"""Tiny SD 1.x / 2.x checkpoints in the original (LDM) single-file layout, written by the tests themselves.

Real single files (`v1-5-pruned-emaonly.safetensors`, ...) name their tensors as the original
CompVis code did (`model.diffusion_model.input_blocks.1.0.in_layers.0.weight`), not as diffusers
does (`down_blocks.0.resnets.0.norm1.weight`). To test loading them without downloading
gigabytes, `make_tiny` builds a random pipeline in the real block structure (4 UNet levels with
2 resnets each, 4 VAE levels, tiny channels) and `to_ldm` renames its weights the original way:
the inverse of diffusers' own single-file conversion, written out independently. SD 2 differs
where the real models do: an OpenCLIP text encoder (fused q/k/v, one layer more than is used,
pad token "!"), linear attention projections, a v-prediction DDIM scheduler.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from diffusiond.pipeline.clip_tokenizer import EOS, OPENCLIP_PAD, write_clip_tokenizer

SEED = 1234

# --- the tiny model ----------------------------------------------------------------------------


def make_tiny(folder: Path, family: str = "sd1") -> Any:
    """A random SD 1.x (`sd1`) or 2.x 768-v style (`sd2`) pipeline saved as a diffusers folder (`folder`).

    The tokenizer is the real CLIP one (pad "!" for SD 2), so the text encoder has the real
    49,408-token vocabulary; everything else is tiny.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sd2 = family == "sd2"
    folder = Path(folder)
    write_clip_tokenizer(folder / "tokenizer", pad_token=OPENCLIP_PAD if sd2 else EOS)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        unet = UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=32,
            attention_head_dim=(2, 4, 8, 8) if sd2 else 8,
            use_linear_projection=sd2,
            upcast_attention=sd2,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 32, 32),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=64,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=37,
                projection_dim=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                hidden_act="gelu" if sd2 else "quick_gelu",
                bos_token_id=0,  # the values of the real SD text encoder configs
                eos_token_id=2,
                pad_token_id=1,
            )
        )
    schedule = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
    if sd2:
        scheduler = DDIMScheduler(**schedule, clip_sample=False, set_alpha_to_one=False, prediction_type="v_prediction")
    else:
        scheduler = PNDMScheduler(**schedule, skip_prk_steps=True, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    # The plain files real SD folders have, over transformers' own.
    write_clip_tokenizer(folder / "tokenizer", pad_token=OPENCLIP_PAD if sd2 else EOS)
    return pipe


# --- diffusers -> original (LDM) names --------------------------------------------------------


def _unet_prefixes(levels: int = 4, layers: int = 2) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, LDM prefix, is a resnet) for the SD 1.x UNet block structure."""
    out: list[tuple[str, str, bool]] = []
    for i in range(levels):
        for j in range(layers):
            block = (layers + 1) * i + j + 1
            out.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{block}.0.", True))
            out.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{block}.1.", False))
        for j in range(layers + 1):
            block = (layers + 1) * i + j
            out.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{block}.0.", True))
            out.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{block}.1.", False))
        if i < levels - 1:
            out.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(layers + 1) * (i + 1)}.0.op.", False))
            # After the resnet (and the attention, when the level has one).
            position = 1 if i == 0 else 2
            out.append(
                (f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(layers + 1) * i + layers}.{position}.", False)
            )
    out.append(("mid_block.attentions.0.", "middle_block.1.", False))
    for j in range(2):
        out.append((f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.", True))
    return out


_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_UNET_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "time_emb_proj.": "emb_layers.1.",
    "conv_shortcut.": "skip_connection.",
}


def unet_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel (SD 1.x layout) weights under `model.diffusion_model.*` original names."""
    prefixes = _unet_prefixes()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = _rename_prefix(key, _UNET_TOP)
        if new is None:
            for hf, ldm, resnet in prefixes:
                if key.startswith(hf):
                    rest = key[len(hf) :]
                    new = ldm + ((_rename_prefix(rest, _UNET_RESNET) or rest) if resnet else rest)
                    break
        if new is None:
            raise KeyError(f"no original name for UNet weight {key}")
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """AutoencoderKL weights under `first_stage_model.*` original names (attention as 1x1 convs)."""
    out: dict[str, torch.Tensor] = {}
    levels = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    for key, value in state.items():
        new = key
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.resnets\.",
            lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.block.",
            new,
        )
        new = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
            lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.upsample.",
            new,
        )
        new = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", new)
        new = new.replace(".mid_block.attentions.0.", ".mid.attn_1.")
        new = new.replace(".conv_shortcut.", ".nin_shortcut.").replace(".conv_norm_out.", ".norm_out.")
        if ".mid.attn_1." in new:
            for hf, ldm in (
                ("group_norm.", "norm."),
                ("to_q.", "q."),
                ("to_k.", "k."),
                ("to_v.", "v."),
                ("to_out.0.", "proj_out."),
            ):
                new = new.replace(".attn_1." + hf, ".attn_1." + ldm)
            if new.endswith(".weight") and value.ndim == 2:  # Linear in diffusers, 1x1 Conv2d in LDM
                value = value.reshape(*value.shape, 1, 1)
        out["first_stage_model." + new] = value
    return out


def text_encoder_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel weights under `cond_stage_model.transformer.text_model.*` (transformers 5 drops `text_model.`)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        rest = key.removeprefix("text_model.")
        out["cond_stage_model.transformer.text_model." + rest] = value
    return out


def open_clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel weights as SD 2's OpenCLIP text tower (`cond_stage_model.model.*`).

    OpenCLIP fuses q/k/v into one `in_proj`, and SD 2 checkpoints carry one transformer block
    more than SD 2 uses (it takes the penultimate layer's output) and a text projection; both
    are added here, random, as the real files have them.
    """
    state = {key.removeprefix("text_model."): value for key, value in state.items()}
    prefix = "cond_stage_model.model."
    out = {
        prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        prefix + "ln_final.weight": state.pop("final_layer_norm.weight"),
        prefix + "ln_final.bias": state.pop("final_layer_norm.bias"),
    }
    state.pop("embeddings.position_ids", None)
    hidden = out[prefix + "ln_final.weight"].shape[0]
    layers = 1 + max(int(m.group(1)) for key in state if (m := re.match(r"encoder\.layers\.(\d+)\.", key)))
    for i in range(layers + 1):
        block = f"{prefix}transformer.resblocks.{i}."
        if i == layers:  # the unused last block
            generator = torch.Generator().manual_seed(i)
            for key, value in list(out.items()):
                if key.startswith(f"{prefix}transformer.resblocks.0."):
                    out[key.replace(".resblocks.0.", f".resblocks.{i}.")] = torch.randn(
                        value.shape, generator=generator
                    )
            continue
        layer = f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[block + f"attn.in_proj_{kind}"] = torch.cat(
                [state.pop(f"{layer}self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
            )
            for hf, ldm in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2")):
                out[block + f"{ldm}.{kind}"] = state.pop(f"{layer}{hf}.{kind}")
            out[block + f"mlp.c_fc.{kind}"] = state.pop(f"{layer}mlp.fc1.{kind}")
            out[block + f"mlp.c_proj.{kind}"] = state.pop(f"{layer}mlp.fc2.{kind}")
    out[prefix + "text_projection"] = torch.randn(hidden, hidden, generator=torch.Generator().manual_seed(0))
    if state:
        raise KeyError(f"no original name for text encoder weights {sorted(state)}")
    return out


def to_ldm(pipe: Any, family: str = "sd1") -> dict[str, torch.Tensor]:
    """The whole pipeline's weights as one original-layout state dict (contiguous copies, ready to save)."""
    text = pipe.text_encoder.state_dict()
    state = {
        **unet_to_ldm(pipe.unet.state_dict()),
        **vae_to_ldm(pipe.vae.state_dict()),
        **(open_clip_to_ldm(text) if family == "sd2" else text_encoder_to_ldm(text)),
    }
    return {key: value.detach().contiguous().clone() for key, value in state.items()}


def _rename_prefix(key: str, mapping: dict[str, str]) -> str | None:
    for old, new in mapping.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return None


# --- files -----------------------------------------------------------------------------------


def save_safetensors(state: dict[str, torch.Tensor], path: Path) -> Path:
    save_file(state, str(path))
    return path


def save_ckpt(state: dict[str, torch.Tensor], path: Path) -> Path:
    """As the original training code saved them: the weights under "state_dict", beside plain metadata."""
    torch.save({"state_dict": state, "global_step": 0, "epoch": 0}, path)
    return path


def fake_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    """A .safetensors file with only these (zero) tensors: enough for telling families apart."""
    save_file({key: torch.zeros(shape) for key, shape in shapes.items()}, str(path))
    return path
