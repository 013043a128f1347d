"""Schedulers by the names people know from other tools.

Each name maps to a diffusers scheduler class plus the options that make it that
sampler (e.g. `dpmpp_2m_karras` is DPMSolverMultistep with Karras sigmas). The
scheduler is rebuilt per job from the model's own scheduler config, so the
model's training settings (betas, prediction type) always carry over.
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.configuration_utils import ConfigMixin

# name → (class, extra config). `pndm` and `plms` are the same sampler under two names.
SCHEDULERS: dict[str, tuple[type[ConfigMixin], dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),  # PLMS alone, as Stable Diffusion and A1111 run it
    "plms": (PNDMScheduler, {"skip_prk_steps": True}),
    "lms": (LMSDiscreteScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "dpmpp_sde": (DPMSolverSDEScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}


def make_scheduler(name: str | None, base_config: Any) -> Any:
    """A fresh scheduler for one job; `None` means the model's own scheduler."""
    if name is None:
        cls_name = base_config["_class_name"]
        import diffusers

        return getattr(diffusers, cls_name).from_config(base_config)
    cls, extra = SCHEDULERS[name]
    return cls.from_config(base_config, **extra)
