"""SD 1.5-architecture sections of the bench: the real network sizes with random weights, no download.

    .venv/bin/python bench/sd15.py [--folder DIR] [--jobs N] [--size PX] [--compile]

1. A random SD 1.5-architecture checkpoint, written once as ONE original-layout (LDM) fp16
   `.safetensors` file (~2.1 GB), and loaded by the daemon's own single-file loader with no
   `config:` (the shipped `pipeline/configs/sd1` are used).
2. CPU precision: one classifier-free-guided UNet step (batch 2), fp32 vs fp32 + channels_last
   vs bf16 vs bf16 + channels_last, side by side.
3. Warm vs cold: N one-shot `python -c` processes (import, `from_single_file`, generate, save)
   against a running `diffusiond run` with the model preloaded; the daemon's startup apart.
4. GPU (only with CUDA): plain diffusers against diffusiond's best settings at 512², fp16,
   30 and 50 steps, the fraction of the device's peak FLOP rate, and daemon batching on/off.

The weights are random, so images are noise; the speed is that of the real architecture.
Every ratio compares two things measured in the same run; both sides' absolute times are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PY, ROOT, DaemonProc, OtherLoad, batch_sizes, machine, median

if TYPE_CHECKING:
    import torch

__all__ = [
    "check_sd15_file",
    "cpu_precision",
    "file_section",
    "gpu_section",
    "make_sd15_file",
    "warm_cold_sd15",
]

SEED = 1505
FILE_NAME = f"sd15-random-{SEED}-fp16.safetensors"
FILE_MARK = f"diffusiond bench: random SD 1.5 architecture, seed {SEED}, init v1"
"""Stored in the file's metadata: a cached file from another init recipe is rebuilt, not reused."""

PROMPT = "a hamster painting with a brush"
UNET_TFLOP_PER_IMAGE_STEP = 1.6
"""About 1.6 TFLOP for one CFG-guided SD 1.5 UNet step (batch 2) at 512², i.e. per image and step."""

PEAK_FP16_TFLOPS = [  # dense (no sparsity) fp16 tensor-core peaks; the first pattern found in the device name wins
    (r"\bH200\b", 989.0),
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100 NVL\b", 835.0),
    (r"\bH100\b", 989.0),  # SXM: "NVIDIA H100 80GB HBM3"
    (r"\bA100\b", 312.0),
    (r"\bL4\b", 121.0),  # not L40/L40S
    (r"\bRTX 4090\b", 165.0),
]

_RESIDUAL_OUT = (
    "conv2.weight",
    "to_out.0.weight",
    "proj_out.weight",
    "ff.net.2.weight",
    "fc2.weight",
    "out_proj.weight",
)
"""Layers that write into a residual stream: a smaller init keeps ~30 stacked residual adds within fp16."""


# --------------------------------------------------------------------------- 1. the file


def make_sd15_file(folder: Path) -> Path:
    """The random SD 1.5-architecture checkpoint in `folder`, built once (a finished file is reused).

    Tensors are drawn straight from the shapes of meta-device models: no default init, no fp32
    copy, so building takes seconds plus the 2 GB write. Written to a `.part` name and renamed:
    an interrupted build leaves no file that looks finished.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILE_NAME
    if _is_finished(path):
        return path
    state = _random_ldm_state(SEED)
    part = path.with_name(f".{path.name}.part")
    save_file(state, str(part), metadata={"diffusiond_bench": FILE_MARK})
    os.replace(part, path)
    return path


def _is_finished(path: Path) -> bool:
    """Our mark in the header, and the file as long as the header says: cheap, no tensor is read."""
    import struct

    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        end = max(meta["data_offsets"][1] for key, meta in header.items() if key != "__metadata__")
        marked = header.get("__metadata__", {}).get("diffusiond_bench") == FILE_MARK
        return marked and path.stat().st_size == 8 + length + end
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return False


def _sd1_models() -> tuple[Any, Any, Any]:
    """UNet, VAE and text encoder of the shipped SD 1.x configs, on the meta device (shapes only)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffusiond.pipeline.single_file import CONFIGS_DIR

    configs = CONFIGS_DIR / "sd1"
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder"))
    return unet, vae, text_encoder


def _random_ldm_state(seed: int) -> dict[str, torch.Tensor]:
    """Seeded fp16 weights for every tensor of the three models, under the original (LDM) names.

    Norm scales 1, biases 0, embeddings N(0, 0.02); every other weight N(0, gain²/fan_in), with
    gain 0.3 for layers that feed a residual add: activations stay O(1) through the whole net,
    so fp16 neither overflows nor yields NaN.
    """
    import torch

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # tests/ldm.py: the diffusers -> LDM renaming the loader tests use
    from tests.ldm import text_encoder_to_ldm, unet_to_ldm, vae_to_ldm

    generator = torch.Generator().manual_seed(seed)

    def draw(meta_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, meta in meta_state.items():
            shape = tuple(meta.shape)
            if key.endswith("bias"):
                out[key] = torch.zeros(shape, dtype=torch.float16)
            elif len(shape) == 1:
                out[key] = torch.ones(shape, dtype=torch.float16)
            else:
                fan_in = meta.numel() // shape[0]
                if key.endswith(("token_embedding.weight", "position_embedding.weight")):
                    std = 0.02
                else:
                    std = (0.3 if key.endswith(_RESIDUAL_OUT) else 1.0) / fan_in**0.5
                out[key] = torch.randn(shape, generator=generator, dtype=torch.float16).mul_(std)
        return out

    unet, vae, text_encoder = _sd1_models()
    return {
        **unet_to_ldm(draw(unet.state_dict())),
        **vae_to_ldm(draw(vae.state_dict())),
        **text_encoder_to_ldm(draw(text_encoder.state_dict())),
    }


def _daemon_cache(path: Path, dtype: torch.dtype, cache_dir: Path, device: str = "cpu") -> tuple[Any, float]:
    """The daemon's ModelCache with the file loaded as `sd15` (single file, no `config:`), and the seconds."""
    from diffusiond.pipeline.families import ModelEntry, kind_of_path
    from diffusiond.pipeline.job import Task
    from diffusiond.pipeline.models import ModelCache

    started = time.perf_counter()
    cache = ModelCache(
        {"sd15": ModelEntry("sd15", Path(path), kind_of_path(Path(path)))},
        device=device,
        dtype=dtype,
        state_dir=Path(cache_dir),
    )
    cache.pipeline("sd15", Task.TXT2IMG)
    return cache, time.perf_counter() - started


def _daemon_load(path: Path, dtype: torch.dtype, cache_dir: Path, device: str = "cpu") -> tuple[Any, float]:
    """The txt2img pipeline as the daemon loads it, and the seconds."""
    from diffusiond.pipeline.job import Task

    cache, seconds = _daemon_cache(path, dtype, cache_dir, device)
    return cache.pipeline("sd15", Task.TXT2IMG).pipe, seconds


def check_sd15_file(path: Path, *, size: int = 64, steps: int = 5) -> list[str]:
    """Load the file with the daemon's loader and run it: the kind it reports, finite images, activation range.

    The largest activation of any module in fp32 is the fp16 headroom the GPU section needs
    (fp16 overflows past 65,504).
    """
    import numpy as np
    import torch

    from diffusiond.pipeline.single_file import inspect_checkpoint

    info = inspect_checkpoint(Path(path))
    with tempfile.TemporaryDirectory(prefix="diffusiond-sd15-check-") as tmp:
        pipe, load_s = _daemon_load(path, torch.float32, Path(tmp))
        peaks: dict[str, float] = {}

        def hook(name: str) -> Callable[..., None]:
            def record(module: Any, args: Any, output: Any) -> None:
                tensor = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
                if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                    peaks[name] = max(peaks.get(name, 0.0), float(tensor.detach().abs().max()))

            return record

        handles = [
            module.register_forward_hook(hook(part))
            for part in ("unet", "vae", "text_encoder")
            for module in getattr(pipe, part).modules()
        ]
        started = time.perf_counter()
        with torch.inference_mode():
            images = pipe(
                PROMPT,
                height=size,
                width=size,
                num_inference_steps=steps,
                generator=torch.Generator("cpu").manual_seed(SEED),
                output_type="np",
            ).images
        generate_s = time.perf_counter() - started
        for handle in handles:
            handle.remove()
        kind = f"{type(pipe).__name__}, {type(pipe.scheduler).__name__}, {pipe.unet.dtype}"
        del pipe
    finite = bool(np.isfinite(images).all())
    if not finite:
        raise SystemExit(f"{path}: the daemon's loader produced NaN/inf images with these weights")
    worst = max(peaks.values())
    if worst > 10_000:
        raise SystemExit(f"{path}: activations reach {worst:.0f} in fp32, too close to fp16's 65504")
    return [
        f"daemon loader (ModelCache, no `config:`): {info.kind} / {info.variant}, {kind}, loaded in {load_s:.1f} s",
        f"check run ({size}x{size}, {steps} steps, fp32 CPU) {generate_s:.1f} s: images finite; largest activation "
        + ", ".join(f"{part} {value:.1f}" for part, value in sorted(peaks.items()))
        + " (fp16 max 65504)",
    ]


def file_section(folder: Path) -> tuple[Path, list[str]]:
    """Section 1: build (or reuse) the file, then check it with the daemon's loader; both times reported."""
    other = OtherLoad()
    started = time.perf_counter()
    reused = _is_finished(Path(folder) / FILE_NAME)
    path = make_sd15_file(folder)
    build_s = time.perf_counter() - started
    lines = [
        f"1. SD 1.5-architecture checkpoint (random weights, seed {SEED}, one LDM-layout fp16 .safetensors)",
        f"file {path} ({path.stat().st_size / 1e9:.2f} GB): "
        + ("reused from an earlier run" if reused else "built")
        + f" in {build_s:.1f} s",
    ]
    lines += check_sd15_file(path)
    return path, [*lines, other.note()]


# --------------------------------------------------------------------------- 2. CPU precision


def cpu_flags() -> dict[str, bool]:
    """What /proc/cpuinfo says about bf16 support (avx512_bf16, AMX)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    return {name: name in flags for name in ("avx512_bf16", "amx_bf16", "amx_tile")}


def onednn_isa() -> str:
    """The oneDNN ISA and kernel a bf16 convolution actually runs with (flags can be listed but unusable)."""
    script = (
        "import torch\n"
        "x = torch.randn(2, 64, 16, 16).bfloat16()\n"
        "with torch.inference_mode(): torch.nn.Conv2d(64, 64, 3, padding=1).bfloat16()(x)\n"
    )
    try:
        done = subprocess.run(
            [PY, "-c", script], capture_output=True, text=True, timeout=120, env=os.environ | {"ONEDNN_VERBOSE": "1"}
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    isa = re.search(r"cpu,isa:([^\n]+)", done.stdout)
    conv = re.search(r"exec,cpu,convolution,([^,]+),", done.stdout)
    return f"{isa.group(1).strip() if isa else '?'}; bf16 conv kernel {conv.group(1) if conv else '?'}"


def cpu_precision(
    path: Path, size: int = 128, steps: int = 5, *, warmup: int = 2, fp32_channels_last: bool = True
) -> list[str]:
    """Section 2: one UNet step of the SD 1.5 architecture on CPU at `size`, by precision and memory format.

    Batch 2 (classifier-free guidance) with the text embeddings the pipeline would pass; the
    UNet as the daemon loads it (fp32) plus converted copies (~10 GB in all). The variants run
    round-robin, one step each per round, so drift (another process, frequency, a slow process:
    fp32 alone measured 0.66-1.25 s per step in different processes here) hits all of them
    alike. `warmup` rounds are dropped: oneDNN packs kernels, fp32 needs more than one call.
    """
    import copy

    import torch

    other = OtherLoad()
    with tempfile.TemporaryDirectory(prefix="diffusiond-sd15-cpu-") as tmp:
        pipe, load_s = _daemon_load(path, torch.float32, Path(tmp))
    with torch.inference_mode():
        positive, negative = pipe.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt="")
    embeddings = torch.cat([negative, positive])
    latent = size // 8
    sample = torch.randn(2, 4, latent, latent, generator=torch.Generator().manual_seed(SEED))
    unet = pipe.unet
    del pipe  # only the UNet stays

    # 1. The variants, each its own copy of the weights.
    variants: dict[str, Any] = {"fp32": unet}
    if fp32_channels_last:
        variants["fp32 + channels_last"] = copy.deepcopy(unet).to(memory_format=torch.channels_last)
    variants["bf16 + channels_last"] = copy.deepcopy(unet).to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    variants["bf16"] = copy.deepcopy(unet).to(dtype=torch.bfloat16)

    # 2. Round-robin steps; the first round's outputs (same timestep for all) are compared to fp32's.
    times: dict[str, list[float]] = {name: [] for name in variants}
    outputs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for round_ in range(warmup + steps):
            t = torch.tensor(999 - 100 * round_)
            for name, model in variants.items():
                dtype = next(model.parameters()).dtype
                x, c = sample.to(dtype), embeddings.to(dtype)
                started = time.perf_counter()
                out = model(x, t, encoder_hidden_states=c).sample
                if round_ >= warmup:
                    times[name].append(time.perf_counter() - started)
                if round_ == 0:
                    outputs[name] = out.float()
    del variants, unet

    base = median(times["fp32"])
    reference = outputs["fp32"]
    scale = float(reference.abs().max())
    flags = cpu_flags()
    lines = [
        f"2. CPU precision: one CFG-guided SD 1.5 UNet step (batch 2) at {size}x{size} ({latent}x{latent} latent), "
        f"{torch.get_num_threads()} threads; variants round-robin, {warmup} warm-up rounds, then {steps} timed",
        "cpu flags: "
        + ", ".join(f"{name} {'yes' if on else 'no'}" for name, on in flags.items())
        + f"; torch capability {torch.backends.cpu.get_cpu_capability()}; oneDNN: {onednn_isa()}",
        "| variant | median ms/step | min ms/step | max ms/step | vs fp32 | max abs diff to fp32 / max abs fp32 |",
        "|---|---|---|---|---|---|",
    ]
    for name, xs in times.items():
        diff = float((outputs[name] - reference).abs().max()) / scale
        lines.append(
            f"| {name} | {median(xs) * 1e3:.0f} | {min(xs) * 1e3:.0f} | {max(xs) * 1e3:.0f} | "
            f"{base / median(xs):.2f}x | {diff:.4f} |"
        )
    best = min((name for name in times if name != "fp32"), key=lambda name: median(times[name]))
    lines.append(
        f"fastest {best} {median(times[best]) * 1e3:.0f} ms vs fp32 {base * 1e3:.0f} ms per step = "
        f"{base / median(times[best]):.2f}x faster; the daemon's `dtype: auto` is fp32 on CPU (`dtype: bf16` "
        f"is accepted); model load {load_s:.1f} s (not in the steps)"
    )
    return [*lines, other.note()]


# --------------------------------------------------------------------------- 3. warm vs cold

COLD_SCRIPT = """
import json, sys, time
t0 = time.perf_counter()
import torch
from diffusers import StableDiffusionPipeline
t1 = time.perf_counter()
path, config, out, seed, prompt, size, steps = sys.argv[1:8]
# The reference-script way, offline: a local diffusers config folder for the single file. The components the
# file lacks are passed as None (the SD 1.5 model_index.json names CLIPFeatureExtractor, gone in transformers 5).
pipe = StableDiffusionPipeline.from_single_file(path, config=config, local_files_only=True, torch_dtype=torch.float32,
                                                safety_checker=None, feature_extractor=None, image_encoder=None,
                                                requires_safety_checker=False)
pipe.set_progress_bar_config(disable=True)
t2 = time.perf_counter()
g = torch.Generator("cpu").manual_seed(int(seed))
image = pipe(prompt, height=int(size), width=int(size), num_inference_steps=int(steps), guidance_scale=7.5,
             generator=g).images[0]
t3 = time.perf_counter()
image.save(out)
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "generate": t3 - t2, "save": time.perf_counter() - t3}))
"""


def cold_sd15(path: Path, config: Path, out: Path, n: int, size: int, steps: int) -> list[tuple[float, dict]]:
    """N one-shot processes, one after another: (wall seconds, the script's own phase seconds) each."""
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    args = [str(size), str(steps)]
    for i in range(n):
        k = hash(f"job{i:03d}") % 10000  # the prompt and seed of the daemon's job i (DaemonProc.run_one)
        seed, prompt = 1000 + k, f"a hamster number {k}"
        started = time.monotonic()
        done = subprocess.run(
            [PY, "-c", COLD_SCRIPT, str(path), str(config), str(out / f"cold-{i}.png"), str(seed), prompt, *args],
            capture_output=True,
            text=True,
            env=os.environ | {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"},
        )
        wall = time.monotonic() - started
        if done.returncode:
            raise SystemExit(f"cold process {i} failed:\n{done.stderr[-3000:]}")
        runs.append((wall, json.loads(done.stdout.strip().splitlines()[-1])))
    return runs


def warm_cold_sd15(path: Path, tmp: Path, n: int = 3, size: int = 128, steps: int = 2) -> list[str]:
    """Section 3: the same N txt2img jobs (SD 1.5 architecture, fp32 CPU) cold, then through a warm daemon.

    Cold: `python -c` per job, `StableDiffusionPipeline.from_single_file(path, config=<local
    diffusers folder>, local_files_only=True, torch_dtype=float32)` (the shipped sd1 configs,
    assembled once beforehand as a user would have the folder on disk), generate, save.
    Warm: `diffusiond run` with the model preloaded (`dtype: auto` = fp32 on CPU), one
    untimed warm-up job, then the N jobs one at a time (drop -> manifest). They never overlap.
    """
    from diffusiond.pipeline.single_file import assemble_shipped_config

    other = OtherLoad()
    tmp = Path(tmp)
    config = assemble_shipped_config("sd1", cache_dir=tmp / "configs")
    extra = {
        "models": {"sd15": str(path)},
        "defaults": {"all": {"model": "sd15", "size": f"{size}x{size}", "steps": steps}},
        "preload": ["sd15"],
    }
    # write_config reads `models.sd` before `extra` replaces the models: any object with `.sd` will do
    daemon = DaemonProc(tmp / "spool-sd15", SimpleNamespace(sd=path), extra=extra)
    try:
        warmup = daemon.run_one("warmup", timeout=600)
        warm = [daemon.run_one(f"job{i:03d}", timeout=600) for i in range(n)]
        startup_s = daemon.startup_s
        overhead = _overhead_sd15(daemon, path, tmp, n + 1, size, steps)
    finally:
        daemon.stop()
    cold = cold_sd15(path, config, tmp / "cold-sd15", n, size, steps)

    cold_total = sum(wall for wall, _ in cold)
    warm_total = sum(r["total"] for r in warm)
    phases = {k: median([p[k] for _, p in cold]) for k in ("import", "load", "generate", "save")}
    generate = [r["m_generate_s"] for r in warm if "m_generate_s" in r]
    lines = [
        f"3. Warm vs cold, SD 1.5 architecture: {n} txt2img jobs, {size}x{size}, {steps} steps, fp32 CPU, "
        "one at a time",
        "| | total s | median per job s |",
        "|---|---|---|",
        f"| cold one-shot python -c (import, from_single_file, generate, save) | {cold_total:.1f} | "
        f"{median([wall for wall, _ in cold]):.2f} |",
        f"| warm daemon (drop -> manifest) | {warm_total:.1f} | {median([r['total'] for r in warm]):.2f} |",
        f"cold/warm = {cold_total / warm_total:.1f}x ({cold_total:.1f} s vs {warm_total:.1f} s); "
        f"daemon startup to ready (loads the model; not in the warm total) {startup_s:.1f} s; "
        f"warm-up job {warmup['total']:.2f} s",
        "cold process phases, median s: "
        + "; ".join(f"{k} {v:.2f}" for k, v in phases.items())
        + (f"; daemon generate_s (manifest) median {median(generate):.2f}" if generate else ""),
        f"with startup counted once: cold/(startup + warm) = {cold_total / (startup_s + warm_total):.2f}x",
        *overhead,
        other.note(),
    ]
    return lines


def _overhead_sd15(daemon: DaemonProc, path: Path, tmp: Path, n: int, size: int, steps: int) -> list[str]:
    """Goal 1 at a real model size: N jobs dropped at once into the warm daemon against the same N
    `generate()` calls in this process (the model loaded here the daemon's way), one after the other."""
    import torch

    from diffusiond.pipeline.generate import DiffusersGenerator
    from diffusiond.pipeline.job import Job, Txt2ImgJob

    cache, load_s = _daemon_cache(path, torch.float32, tmp / "direct-cache")
    generator = DiffusersGenerator(cache)
    warmup = Txt2ImgJob(model="sd15", prompt="warm-up", size=(size, size), steps=steps, seed=1)
    generator.generate([Job("direct-warmup", "direct-warmup.yaml", 1, warmup)])  # as the daemon had one
    direct = []
    for i in range(n):  # the prompt and seed of the daemon's stream job i (common.job_text)
        spec = Txt2ImgJob(model="sd15", prompt=f"a hamster number {i}", size=(size, size), steps=steps, seed=1000 + i)
        started = time.perf_counter()
        generator.generate([Job(f"direct-{i}", f"direct-{i}.yaml", 1, spec)])
        direct.append(time.perf_counter() - started)
    del cache, generator
    stream_s, manifests = daemon.run_stream([f"stream{i:03d}" for i in range(n)], timeout=900)
    inside = sum(json.loads(m.read_text())["timings"]["generate_s"] for m in manifests)
    ratio = stream_s / sum(direct)
    return [
        f"overhead at this size: {n} jobs dropped at once into the daemon {stream_s:.1f} s against the same "
        f"{n} generate() calls in this process {sum(direct):.1f} s (model loaded here in {load_s:.1f} s, not "
        f"counted): daemon/direct = {ratio:.3f}. One daemon process against this one: fp32 speed differs by up "
        "to +-15 % between processes on this machine, so this ratio is only good to about +-0.15",
        f"inside the daemon (same process, no such noise): drop of the first -> last manifest {stream_s:.1f} s "
        f"against the sum of its jobs' pipeline calls (timings.generate_s) {inside:.1f} s = {stream_s / inside:.3f} "
        f"({(stream_s / inside - 1) * 100:+.1f} % around generation)",
    ]


# --------------------------------------------------------------------------- 4. GPU


def peak_fp16_tflops(name: str) -> float | None:
    """Dense fp16 tensor-core peak of a device, by its name; None when it is not in the table."""
    return next((peak for pattern, peak in PEAK_FP16_TFLOPS if re.search(pattern, name)), None)


def _seconds(device: str, fn: Callable[[], Any]) -> float:
    """Wall seconds of `fn`, with the GPU's queue drained on both sides (kernels run asynchronously)."""
    import torch

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started


def _unet_step_s(pipe: Any, batch: int, size: int, device: str, iterations: int = 10) -> tuple[float, float]:
    """One CFG-guided UNet step for `batch` images (UNet batch 2 x batch): (first call, median) seconds.

    The first call holds the warm-up: cuDNN autotuning, and all of torch.compile's work.
    """
    import torch

    unet = pipe.unet
    dtype = next(unet.parameters()).dtype
    x = torch.randn(2 * batch, 4, size // 8, size // 8, device=device, dtype=dtype)
    c = torch.randn(2 * batch, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    t = torch.tensor(500, device=device)

    def step() -> None:
        unet(x, t, encoder_hidden_states=c)

    with torch.inference_mode():
        first = _seconds(device, step)
        for _ in range(2):
            step()
        return first, median([_seconds(device, step) for _ in range(iterations)])


def _images_per_s(pipe: Any, steps: int, batch: int, images: int, size: int, device: str) -> tuple[float, float]:
    """(images per second end to end, PIL out; seconds per call) over images // batch calls after a warm-up call."""
    import torch

    def call() -> None:
        generators = [torch.Generator("cpu").manual_seed(SEED + i) for i in range(batch)]
        pipe([PROMPT] * batch, height=size, width=size, num_inference_steps=steps, generator=generators)

    with torch.inference_mode():
        call()
        calls = max(1, images // batch)
        seconds = [_seconds(device, call) for _ in range(calls)]
    return calls * batch / sum(seconds), median(seconds)


def _apply_best(pipe: Any, compile_unet: bool) -> str:
    """diffusiond's best GPU settings on a loaded pipeline; says what was applied."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe.unet.set_attn_processor(AttnProcessor2_0())  # SDPA (also diffusers' default with torch 2)
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    pipe.fuse_qkv_projections()  # one q/k/v matmul per attention (FusedAttnProcessor2_0)
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    applied = "SDPA, fused QKV, channels_last (UNet, VAE)"
    if compile_unet:
        pipe.unet = torch.compile(pipe.unet, fullgraph=True)
        applied += ", torch.compile(unet, fullgraph=True)"
    return applied


def _daemon_batching(
    path: Path, tmp: Path, *, batch: int, images: int, size: int, steps: int, device: str
) -> list[str]:
    """The daemon itself, batch_size 1 against `batch`: `images` jobs dropped at once, after one warm-up job."""
    results: dict[int, tuple[float, list[int], float]] = {}
    for batch_size in (1, batch):
        extra = {
            "device": device,
            "models": {"sd15": str(path)},
            "defaults": {"all": {"model": "sd15", "size": f"{size}x{size}", "steps": steps}},
            "preload": ["sd15"],
            "batch_size": batch_size,
            "batch_wait_s": 1.0 if batch_size > 1 else 0.0,
        }
        daemon = DaemonProc(tmp / f"spool-batch{batch_size}", SimpleNamespace(sd=path), extra=extra)
        try:
            daemon.run_one("warmup", timeout=600)
            elapsed, manifests = daemon.run_stream([f"job{i:03d}" for i in range(images)], timeout=600)
            sizes = list(batch_sizes(manifests).elements())
            results[batch_size] = (elapsed, sizes, daemon.startup_s)
        finally:
            daemon.stop()
    (off_s, off_sizes, off_start), (on_s, on_sizes, on_start) = results[1], results[batch]
    return [
        f"daemon (`diffusiond run`, dtype auto), {images} jobs dropped at once, {size}x{size}, {steps} steps "
        "(first drop -> last manifest, after one warm-up job):",
        "| batch_size | total s | images/s | batch sizes seen | startup s |",
        "|---|---|---|---|---|",
        f"| 1 | {off_s:.1f} | {images / off_s:.2f} | {sorted(set(off_sizes))} | {off_start:.1f} |",
        f"| {batch} (batch_wait_s 1.0) | {on_s:.1f} | {images / on_s:.2f} | {sorted(set(on_sizes))} | {on_start:.1f} |",
        f"batching on/off = {off_s / on_s:.2f}x faster ({on_s:.1f} s vs {off_s:.1f} s); the daemon itself applies "
        "channels_last on CUDA, not fused QKV or compile",
    ]


def gpu_section(
    path: Path,
    tmp: Path | None = None,
    *,
    steps: tuple[int, ...] = (30, 50),
    batch: int = 4,
    images: int = 8,
    size: int = 512,
    compile_unet: bool = False,
    daemon_batching: bool = True,
    device: str = "cuda",
) -> list[str]:
    """Section 4 (CUDA only): plain diffusers vs diffusiond's best settings, SD 1.5 architecture, 512², fp16.

    Plain: `StableDiffusionPipeline.from_single_file(...)` with its defaults, batch 1. Best: the
    daemon's loader (ModelCache, fp16), then SDPA, fused QKV, channels_last, batch `batch`, and
    `torch.compile` of the UNet with `compile_unet` (its warm-up reported). FLOP fractions count
    the UNet only (1.6 TFLOP per image-step at 512²), so the end-to-end one is a lower bound.
    Then the daemon itself with `batch_size` 1 and `batch`, `images` jobs dropped at once.
    `device="cpu"` is a dry run of the code paths (fp32, for a tiny model), not a benchmark.
    """
    import torch

    on_cuda = device.startswith("cuda")
    if on_cuda and not torch.cuda.is_available():
        return [
            f"4. GPU section skipped: torch.cuda.is_available() is False (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda or 'none'})"
        ]
    from diffusers import StableDiffusionPipeline

    from diffusiond.pipeline.families import ModelEntry, kind_of_path
    from diffusiond.pipeline.single_file import resolve_config

    other = OtherLoad()

    own_tmp = tmp is None
    tmp = Path(tempfile.mkdtemp(prefix="diffusiond-sd15-gpu-")) if tmp is None else Path(tmp)
    dtype = torch.float16 if on_cuda else torch.float32
    name = torch.cuda.get_device_name(device) if on_cuda else "CPU (dry run)"
    peak = peak_fp16_tflops(name) if on_cuda else None
    flop = UNET_TFLOP_PER_IMAGE_STEP * (size / 512) ** 2  # convolutions scale with pixels; attention a bit more
    # The configs the daemon would pick (the shipped sd1 ones for the random SD 1.5 file), for both sides.
    entry = ModelEntry("sd15", Path(path), kind_of_path(Path(path)))
    config = resolve_config(entry, entry.kind, cache_dir=tmp / "configs")

    def fraction(tflops: float) -> str:
        return f"{tflops / peak * 100:.1f} %" if peak else "unknown peak"

    # 1. Plain diffusers: from_single_file, its defaults, batch 1.
    pipe = StableDiffusionPipeline.from_single_file(
        str(path),
        config=str(config),
        local_files_only=True,
        torch_dtype=dtype,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    _, plain_step = _unet_step_s(pipe, 1, size, device)
    plain = {s: _images_per_s(pipe, s, 1, images, size, device) for s in steps}
    del pipe
    _free(device)

    # 2. diffusiond's loader, then the best settings.
    pipe, load_s = _daemon_load(path, dtype, tmp / "state", device=device)
    applied = _apply_best(pipe, compile_unet)
    first_s, best_step = _unet_step_s(pipe, batch, size, device)  # before any pipeline call: holds the compile
    best = {s: _images_per_s(pipe, s, batch, images, size, device) for s in steps}
    del pipe
    _free(device)

    lines = [
        f"4. GPU: {name}, SD 1.5 architecture, {size}x{size}, {str(dtype).removeprefix('torch.')}; peak dense fp16 "
        + (f"{peak:.0f} TFLOPS" if peak else "unknown (not in the table)"),
        f"best = {applied}, batch {batch}; daemon loader load {load_s:.1f} s; "
        + (
            f"torch.compile warm-up (first UNet call) {first_s:.1f} s"
            if compile_unet
            else f"first UNet call {first_s:.2f} s"
        ),
        "| steps | plain images/s | best images/s | best/plain | plain s/call | best s/call | "
        "plain UNet TFLOP/s (peak %) | best UNet TFLOP/s (peak %) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in steps:
        (p_ips, p_call), (b_ips, b_call) = plain[s], best[s]
        p_tf, b_tf = p_ips * s * flop, b_ips * s * flop
        lines.append(
            f"| {s} | {p_ips:.2f} | {b_ips:.2f} | {b_ips / p_ips:.2f}x | {p_call:.2f} | {b_call:.2f} | "
            f"{p_tf:.0f} ({fraction(p_tf)}) | {b_tf:.0f} ({fraction(b_tf)}) |"
        )
    p_tf, b_tf = flop / plain_step, batch * flop / best_step
    lines.append(
        f"UNet alone, one CFG step: plain batch 1 {plain_step * 1e3:.1f} ms ({p_tf:.0f} TFLOP/s, {fraction(p_tf)}) "
        f"vs best batch {batch} {best_step * 1e3:.1f} ms ({b_tf:.0f} TFLOP/s, {fraction(b_tf)}); per image "
        f"{plain_step / (best_step / batch):.2f}x faster (images/s columns count the UNet FLOPs only: a lower bound)"
    )
    if daemon_batching:
        lines += _daemon_batching(path, tmp, batch=batch, images=images, size=size, steps=steps[0], device=device)
    lines.append(other.note())
    if own_tmp:
        lines.append(f"(GPU spool and logs in {tmp})")
    return lines


def _free(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--folder",
        type=Path,
        default=Path(tempfile.gettempdir()) / "diffusiond-bench-sd15",
        help="where the 2.1 GB random checkpoint is kept between runs (default: %(default)s)",
    )
    ap.add_argument("--jobs", type=int, default=3, help="N jobs for warm vs cold (default 3)")
    ap.add_argument("--size", type=int, default=128, help="image side on CPU (default 128)")
    ap.add_argument("--compile", action="store_true", help="GPU: torch.compile the UNet in the best settings")
    args = ap.parse_args()

    print(f"diffusiond bench, SD 1.5 architecture (random weights), {time.strftime('%Y-%m-%dT%H:%M:%S%z')}")
    print(f"machine: {machine()}")
    print()
    tmp = Path(tempfile.mkdtemp(prefix="diffusiond-bench-sd15-"))
    clock = time.monotonic()
    path, lines = file_section(args.folder)
    print("\n".join(lines))
    print(f"(section 1: {time.monotonic() - clock:.0f} s)\n")
    sections: list[tuple[str, Callable[[], list[str]]]] = [
        ("2", lambda: cpu_precision(path, args.size)),
        ("3", lambda: warm_cold_sd15(path, tmp, args.jobs, args.size)),
        ("4", lambda: gpu_section(path, tmp, compile_unet=args.compile)),
    ]
    for number, section in sections:
        started = time.monotonic()
        print("\n".join(section()))
        print(f"(section {number}: {time.monotonic() - started:.0f} s)\n")
    print(f"sd15 bench wall time {time.monotonic() - clock:.0f} s; spool and logs in {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
