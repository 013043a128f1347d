"""LoRAs on a warm pipeline: each file loaded once per model (a peft adapter), weighted per call, off without.

diffusers' `load_lora_weights` reads Kohya/A1111 `.safetensors` files and diffusers-format ones
alike (it converts the key names), into the UNet and the text encoders through peft. An adapter
stays loaded on its model between jobs (at most `MAX_ADAPTERS`, the least recently used removed
first); a call uses exactly the job's LoRAs at their weights, and a call without any turns the
adapters off, which gives the model's own images back unchanged (the tests compare pixels).
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from diffusiond.pipeline.errors import Code, JobFailed
from diffusiond.pipeline.hashing import file_sha256, lora_hash
from diffusiond.pipeline.job import LoraUse

MAX_ADAPTERS = 8
"""LoRAs kept loaded on one model: more are unloaded, least recently used first."""


def apply(
    pipe: Any, uses: Sequence[LoraUse], files: Mapping[str, Path], adapters: OrderedDict[str, str]
) -> list[dict[str, Any]]:
    """Set the pipeline's LoRAs to `uses` (loading the missing ones); what the manifest lists of each.

    `adapters` is the model's own record of what is loaded (adapter name -> LoRA name), shared by all
    pipelines of the model (they share its UNet and text encoders, where the adapters live).
    """
    if not uses:
        if adapters:
            pipe.disable_lora()
        return []
    files = dict(files)  # a configured folder is listed here once per call, not once per lookup
    names = []
    for use in uses:
        adapter = _adapter(use.name)
        if adapter not in adapters:
            path = files.get(use.name)
            if path is None:  # the config was reloaded without it since the job was validated
                raise JobFailed(
                    f"LoRA {use.name!r} is no longer in the config's loras",
                    code=Code.MODEL_FAILED,
                    field="loras",
                    value=use.name,
                    fix="put the file back in the loras folder, or drop the job again without it",
                )
            try:
                with warnings.catch_warnings():  # peft's note that a model holds several adapters: it does
                    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                    pipe.load_lora_weights(str(path), adapter_name=adapter)
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                raise JobFailed(
                    f"LoRA {use.name!r} ({path}) could not be loaded: {type(exc).__name__}: {exc}",
                    code=Code.MODEL_FAILED,
                    field="loras",
                    value=use.name,
                    fix="check that the file is a LoRA for this model's family (SD 1.x, 2.x or SDXL)",
                ) from exc
            adapters[adapter] = use.name
        adapters.move_to_end(adapter)
        names.append(adapter)
    for old in [a for a in adapters if a not in names][: max(0, len(adapters) - MAX_ADAPTERS)]:
        pipe.delete_adapters([old])
        del adapters[old]
    pipe.enable_lora()
    pipe.set_adapters(names, [use.weight for use in uses])
    return [_record(use, files[use.name]) for use in uses]


def _adapter(name: str) -> str:
    """A peft adapter name for a LoRA name (peft names modules after it: no dots or slashes)."""
    return "lora_" + re.sub(r"[^0-9A-Za-z_]", "_", name)


def _record(use: LoraUse, path: Path) -> dict[str, Any]:
    stat = os.stat(path)
    sha256, short = _hashes(path, (stat.st_ino, stat.st_size, stat.st_mtime_ns))
    return {"name": use.name, "weight": use.weight, "file": str(path), "sha256": sha256, "hash": short}


@functools.lru_cache(maxsize=64)
def _hashes(path: Path, stamp: tuple[int, int, int]) -> tuple[str, str]:
    """(sha256 of the file, A1111's short hash), once per file version."""
    return file_sha256(path), lora_hash(path)
