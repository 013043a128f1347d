"""The pipeline on the tiny test models: schedulers, seeds, shared weights, load errors, metadata."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from diffusiond import __version__
from diffusiond.pipeline.backend import Generated
from diffusiond.pipeline.errors import ConfigError, JobFailed, JobRejected
from diffusiond.pipeline.families import ModelEntry, ModelKind
from diffusiond.pipeline.generate import DiffusersGenerator
from diffusiond.pipeline.inputs import probe_image
from diffusiond.pipeline.job import (
    SCHEDULER_NAMES,
    Depth2ImgJob,
    Img2ImgJob,
    Job,
    OutputSpec,
    Task,
    Txt2ImgJob,
    UpscaleJob,
)
from diffusiond.pipeline.metadata import encode, infotext, read_parameters
from diffusiond.pipeline.models import ModelCache, resolve_device, resolve_dtype
from diffusiond.pipeline.schedulers import SCHEDULERS
from diffusiond.pipeline.standin import StandInGenerator
from diffusiond.pipeline.testmodel import FamilyModelPaths, TestModelPaths, is_test_model, make_test_model
from tests.conftest import CEILING_S


def run_one(cache: ModelCache, job: Job, image: Path | None) -> Generated:
    """One job alone, as the daemon runs it when nothing else can share its call (its image probed as at pre-check)."""
    if image is not None:
        job = replace(job, image=probe_image(image, label=image.name, max_file_bytes=1 << 30))
    [generated] = DiffusersGenerator(cache).generate([job])
    return generated


@pytest.fixture(scope="module")
def cache(test_models: TestModelPaths) -> ModelCache:
    entries = {
        "test": ModelEntry("test", test_models.sd, ModelKind.SD1),
        "test-x4": ModelEntry("test-x4", test_models.upscaler, ModelKind.UPSCALER_X4),
    }
    return ModelCache(entries, device="cpu", dtype=torch.float32)


def txt2img_job(**fields) -> Job:
    spec = Txt2ImgJob(**({"model": "test", "prompt": "a cat", "size": (64, 64), "steps": 2, "seed": 1} | fields))
    return Job("job-1", "cat.yaml", 1, spec)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture
def sketch(tmp_path: Path) -> Path:
    image = Image.new("RGB", (60, 44), (240, 240, 230))
    image.paste((200, 60, 40), (16, 8, 44, 36))
    path = tmp_path / "sketch.png"
    image.save(path)
    return path


# --- schedulers and seeds ----------------------------------------------------------------------


def test_the_validator_knows_exactly_the_schedulers_the_pipeline_has() -> None:
    assert set(SCHEDULER_NAMES) == set(SCHEDULERS)


# Each name's diffusers class and the options that make it that sampler (A1111's names in metadata.py).
SAMPLERS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "plms": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "dpmpp_sde": ("DPMSolverSDEScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_every_scheduler_name_makes_an_image(cache: ModelCache, name: str) -> None:
    generated = run_one(cache, txt2img_job(scheduler=name), None)
    assert [image.size for image in generated.images] == [(64, 64)]
    assert generated.seeds == [1]
    assert generated.scheduler == name
    used = cache.pipeline("test", Task.TXT2IMG).pipe.scheduler  # what the call just ran with
    class_name, options = SAMPLERS[name]
    assert type(used).__name__ == class_name
    assert {key: used.config[key] for key in options} == options
    # Built from the model's own scheduler config: its training noise schedule carries over.
    assert (used.config["beta_start"], used.config["beta_schedule"]) == (0.00085, "scaled_linear")


def test_without_a_scheduler_the_models_own_is_used(cache: ModelCache) -> None:
    generated = run_one(cache, txt2img_job(), None)
    assert generated.scheduler == "PNDMScheduler"  # what the test model was saved with


def test_the_scheduler_name_changes_the_sampler(cache: ModelCache) -> None:
    ddim, euler, pndm, plms = (
        pixels(run_one(cache, txt2img_job(scheduler=name), None).images[0])
        for name in ("ddim", "euler", "pndm", "plms")
    )
    assert np.abs(ddim - euler).mean() > 1
    assert np.array_equal(pndm, plms)  # two names for one sampler


def test_the_same_seed_gives_the_same_pixels_and_another_seed_others(cache: ModelCache) -> None:
    first = pixels(run_one(cache, txt2img_job(seed=7, scheduler="euler_a"), None).images[0])
    again = pixels(run_one(cache, txt2img_job(seed=7, scheduler="euler_a"), None).images[0])
    other = pixels(run_one(cache, txt2img_job(seed=8, scheduler="euler_a"), None).images[0])
    assert np.array_equal(first, again)
    assert np.abs(first - other).mean() > 5


def test_each_image_of_a_batch_is_reproduced_by_its_own_seed(cache: ModelCache) -> None:
    generated = run_one(cache, txt2img_job(seed=40, count=2), None)
    assert generated.seeds == [40, 41]
    alone = pixels(run_one(cache, txt2img_job(seed=41), None).images[0])
    # Batched and single runs differ only by float rounding: a level here and there.
    difference = np.abs(pixels(generated.images[1]) - alone)
    assert difference.max() <= 3 and difference.mean() < 0.05
    assert np.abs(pixels(generated.images[0]) - alone).mean() > 5


def test_the_size_is_width_by_height(cache: ModelCache) -> None:
    [image] = run_one(cache, txt2img_job(size=(64, 32)), None).images
    assert image.size == (64, 32)


# --- img2img and upscale -----------------------------------------------------------------------


def test_img2img_reuses_the_txt2img_weights(cache: ModelCache) -> None:
    txt = cache.pipeline("test", "txt2img")
    img = cache.pipeline("test", "img2img")
    assert img.pipe is not txt.pipe
    assert img.pipe.unet is txt.pipe.unet
    assert img.pipe.vae is txt.pipe.vae
    assert img.pipe.text_encoder is txt.pipe.text_encoder
    assert cache.pipeline("test", "txt2img").pipe is txt.pipe  # kept warm, not loaded again


def test_img2img_redraws_the_sketch_cropped_to_multiples_of_8(cache: ModelCache, sketch: Path) -> None:
    spec = Img2ImgJob(task="img2img", model="test", image="sketch.png", steps=2, strength=0.5, seed=3)
    generated = run_one(cache, Job("job-1", "sketch.yaml", 1, spec), sketch)
    assert [image.size for image in generated.images] == [(56, 40)]


def test_img2img_at_the_jobs_size(cache: ModelCache, sketch: Path) -> None:
    spec = Img2ImgJob(task="img2img", model="test", image="sketch.png", steps=2, strength=0.5, seed=3, size=(32, 32))
    generated = run_one(cache, Job("job-1", "sketch.yaml", 1, spec), sketch)
    assert [image.size for image in generated.images] == [(32, 32)]


def test_sd_x4_upscale_makes_four_times_the_size(cache: ModelCache, tmp_path: Path) -> None:
    small = tmp_path / "small.png"
    Image.new("RGB", (16, 12), (30, 120, 200)).save(small)
    spec = UpscaleJob(task="upscale", model="test-x4", image="small.png", steps=2, seed=5)
    generated = run_one(cache, Job("job-1", "up.yaml", 1, spec), small)
    assert [image.size for image in generated.images] == [(64, 48)]
    assert generated.seeds == [5]


def test_lanczos_upscale_loads_no_model(test_models: TestModelPaths, sketch: Path) -> None:
    empty = ModelCache({}, device="cpu", dtype=torch.float32)
    spec = UpscaleJob(task="upscale", model="test-x4", method="lanczos", scale=2, image="sketch.png")
    generated = run_one(empty, Job("job-1", "up.yaml", 1, spec), sketch)
    assert [image.size for image in generated.images] == [(120, 88)]
    assert empty.loaded() == []


# --- what the images are: pinned, and what the stand-in copies -------------------------------

GOLDEN_VERSIONS = ("2.13.0+cpu", "0.42.1", "5.24.0")
"""torch, diffusers, transformers the slices were recorded with (2026-12-01): other versions may round otherwise."""
GOLDEN = {  # the 3x3 bottom-right pixels (RGB) of each task's first image on the tiny models
    "txt2img": [
        [[134, 142, 115], [130, 134, 108], [119, 147, 110]],
        [[133, 148, 120], [131, 133, 112], [121, 137, 109]],
        [[129, 145, 118], [132, 137, 117], [125, 140, 110]],
    ],
    "img2img": [
        [[148, 145, 108], [147, 133, 88], [127, 139, 91]],
        [[148, 146, 118], [152, 126, 101], [126, 119, 89]],
        [[129, 147, 117], [131, 132, 124], [123, 131, 104]],
    ],
    "upscale": [
        [[127, 135, 158], [141, 134, 142], [160, 135, 139]],
        [[136, 133, 143], [145, 144, 138], [162, 138, 129]],
        [[134, 138, 128], [137, 139, 133], [151, 137, 133]],
    ],
    "depth2img": [
        [[137, 144, 164], [125, 147, 149], [134, 146, 130]],
        [[116, 100, 145], [110, 114, 141], [131, 117, 127]],
        [[138, 126, 148], [137, 130, 147], [138, 124, 140]],
    ],
}


def golden_jobs(square_sketch: Path) -> dict[str, Job]:
    probe = probe_image(square_sketch, label="sketch.png", max_file_bytes=1 << 30)
    return {
        "txt2img": Job("j", "j.yaml", 1, Txt2ImgJob(model="test", prompt="a cat", size=(64, 64), steps=2, seed=1)),
        "img2img": Job(
            "j",
            "j.yaml",
            1,
            Img2ImgJob(task="img2img", model="test", prompt="a cat", steps=4, strength=0.5, seed=2),
            probe,
        ),
        "upscale": Job(
            "j", "j.yaml", 1, UpscaleJob(task="upscale", model="test-x4", prompt="sharp", steps=2, seed=3), probe
        ),
        "depth2img": Job(
            "j",
            "j.yaml",
            1,
            Depth2ImgJob(task="depth2img", model="depth", prompt="a cat", steps=4, strength=0.5, seed=4),
            probe,
        ),
    }


@pytest.fixture
def square_sketch(tmp_path: Path) -> Path:
    image = Image.new("RGB", (64, 64), (240, 240, 230))
    image.paste((200, 60, 40), (16, 16, 48, 48))
    path = tmp_path / "sketch.png"
    image.save(path)
    return path


@pytest.mark.parametrize("task", sorted(GOLDEN))
def test_each_task_makes_the_pixels_it_made_when_recorded(
    test_models: TestModelPaths, family_models: FamilyModelPaths, square_sketch: Path, task: str
) -> None:
    versions = (torch.__version__, diffusers.__version__, transformers.__version__)
    if versions != GOLDEN_VERSIONS:
        pytest.skip(f"slices recorded with torch/diffusers/transformers {GOLDEN_VERSIONS}, running {versions}")
    entries = {
        "test": ModelEntry("test", test_models.sd, ModelKind.SD1),
        "test-x4": ModelEntry("test-x4", test_models.upscaler, ModelKind.UPSCALER_X4),
        "depth": ModelEntry("depth", family_models.depth2img, ModelKind.DEPTH2IMG),
    }
    generator = DiffusersGenerator(ModelCache(entries, device="cpu", dtype=torch.float32))
    [generated] = generator.generate([golden_jobs(square_sketch)[task]])
    corner = np.asarray(generated.images[0], dtype=np.int16)[-3:, -3:, :]
    assert np.abs(corner - np.array(GOLDEN[task])).max() <= 8  # another CPU's kernels may round a few levels apart


def test_a_reload_during_a_job_keeps_what_the_job_ran_with(cache: ModelCache, test_models: TestModelPaths) -> None:
    """SIGHUP updates the cache from the main thread while the worker generates: the manifest keeps the model."""
    entries, memory, max_loaded = dict(cache.entries), cache.memory, cache.max_loaded

    def reload_at_step(step: int, _total: int) -> None:
        if step == 1:
            cache.update({}, memory=memory, max_loaded=max_loaded)  # a config without the model

    try:
        [generated] = DiffusersGenerator(cache).generate([txt2img_job()], on_step=reload_at_step)
    finally:
        cache.update(entries, memory=memory, max_loaded=max_loaded)
    assert generated.model is not None and generated.model.path == str(test_models.sd)


def test_a_bad_image_in_a_batch_names_its_own_job(cache: ModelCache, tmp_path: Path) -> None:
    jobs = []
    for index in (1, 2):
        path = tmp_path / f"in{index}.png"
        Image.new("RGB", (32, 32), (index * 90, 40, 40)).save(path)
        probe = probe_image(path, label=path.name, max_file_bytes=1 << 30)
        spec = Img2ImgJob(task="img2img", model="test", steps=2, strength=0.5, seed=index)
        jobs.append(Job(f"j{index}", "two.yaml", index, spec, probe))
    assert jobs[0].spec.batch_key((32, 32)) == jobs[1].spec.batch_key((32, 32))
    (tmp_path / "in2.png").write_bytes(b"changed after the pre-check")
    with pytest.raises(JobRejected) as info:
        DiffusersGenerator(cache).generate(jobs)
    assert (info.value.path, info.value.job_index, info.value.field, info.value.value) == (
        "two.yaml",
        2,
        "image",
        "in2.png",
    )


def test_the_stand_in_makes_the_sizes_seeds_and_steps_the_pipeline_makes(cache: ModelCache, sketch: Path) -> None:
    """Lifecycle tests run on the stand-in: what they see of a job must be what the real pipeline gives.

    The stand-in counts `steps` (times strength) as a one-call-per-step sampler does, Euler here; the
    samplers that run more calls are tested below.
    """
    probe = probe_image(sketch, label="sketch.png", max_file_bytes=1 << 30)  # 60x44: img2img crops it to 56x40
    redraw = {"task": "img2img", "model": "test", "seed": 3, "scheduler": "euler"}
    jobs = [
        txt2img_job(size=(64, 32), count=2, scheduler="euler"),
        Job("j", "s.yaml", 1, Img2ImgJob(**redraw, steps=4, strength=0.5), probe),
        Job("j", "s.yaml", 1, Img2ImgJob(**redraw, steps=2, size=(32, 32)), probe),
        Job("j", "s.yaml", 1, UpscaleJob(task="upscale", model="test-x4", steps=2, seed=5, scheduler="euler"), probe),
        Job("j", "s.yaml", 1, UpscaleJob(task="upscale", method="lanczos", scale=2.5), probe),
    ]
    for job in jobs:
        real_totals: set[int] = set()
        stand_totals: set[int] = set()
        [real] = DiffusersGenerator(cache).generate([job], on_step=lambda _k, n, seen=real_totals: seen.add(n))
        [stand] = StandInGenerator().generate([job], on_step=lambda _k, n, seen=stand_totals: seen.add(n))
        assert [i.size for i in stand.images] == [i.size for i in real.images], job.spec
        assert stand.seeds == real.seeds and stand.batch_size == real.batch_size
        assert stand_totals == real_totals, job.spec  # the n of "step k of n"


@pytest.mark.parametrize("scheduler", [None, *SCHEDULERS])
@pytest.mark.parametrize("task", ["txt2img", "img2img", "upscale"])
def test_progress_counts_the_calls_the_sampler_makes_and_never_passes_its_total(
    cache: ModelCache, sketch: Path, scheduler: str | None, task: str
) -> None:
    """PNDM runs steps + 1 UNet calls and Heun about two a step: "step k of n" must count those, up to n."""
    probe = probe_image(sketch, label="sketch.png", max_file_bytes=1 << 30)
    specs = {
        "txt2img": Txt2ImgJob(model="test", prompt="a", size=(32, 32), steps=3, seed=1, scheduler=scheduler),
        "img2img": Img2ImgJob(
            task="img2img", model="test", size=(32, 32), steps=6, strength=0.5, seed=2, scheduler=scheduler
        ),
        "upscale": UpscaleJob(task="upscale", model="test-x4", steps=3, seed=5, scheduler=scheduler),
    }
    seen: list[tuple[int, int]] = []
    DiffusersGenerator(cache).generate(
        [Job("j", "s.yaml", 1, specs[task], probe)], on_step=lambda k, n: seen.append((k, n))
    )
    [total] = {n for _, n in seen}
    assert all(1 <= k <= total for k, _ in seen), seen
    assert [k for k, _ in seen] == sorted({k for k, _ in seen}) and seen[-1][0] == total, seen
    assert total >= specs[task].denoise_steps()


# --- devices and load errors -------------------------------------------------------------------

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@NO_CUDA
@pytest.mark.parametrize("device", ["cuda", "mps"])
@pytest.mark.parametrize("given", ["config", "command line"])
def test_a_device_this_machine_lacks_stops_the_start_with_the_fix(spool, test_models, device: str, given: str) -> None:
    """Refused at start, before the spool is touched: not every job sent to failed/ one by one.

    Exit 78, which the units do not restart; given on the command line (as diffusiond@N.service
    does), the fix is not the config's `device:`."""
    from tests.conftest import write_config

    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has an Apple GPU")
    command = [sys.executable, "-m", "diffusiond.daemon.cli", "run", "--config", str(spool.config_path)]
    if given == "config":
        write_config(spool.root, test_models, device=device)
    else:
        command += ["--device", device]
    result = subprocess.run(command, capture_output=True, text=True, timeout=CEILING_S)
    assert result.returncode == 78, result.stderr
    assert f"`device: {device}` but this machine has no" in result.stderr
    if given == "config":
        assert "Fix: set `device: cpu` or `auto`" in result.stderr
    else:
        assert f"(`--device {device}` on the command line). Fix: diffusiond@N.service passes" in result.stderr
        assert "run diffusiond.service instead" in result.stderr and "elsewhere: set `device: cpu`" in result.stderr
    first, *rest = result.stderr.strip().splitlines()
    assert " INFO diffusiond: diffusiond " in first and ", spool " in first, "which config and spool, first"
    assert len(rest) == 1, "then one line, no traceback"
    assert not (spool.root / "outbox").exists() and not (spool.root / "state" / "status.json").exists()


def test_a_gpu_number_past_the_count_names_the_ones_there(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with two GPUs (there is none here)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == "cuda:1" and resolve_device("cuda") == "cuda"
    with pytest.raises(ConfigError) as info:
        resolve_device("cuda:2")
    assert (info.value.field, info.value.value) == ("device", "cuda:2")
    assert "has 2 CUDA devices (cuda:0 to cuda:1)" in info.value.message and "diffusiond@N" in info.value.fix


@NO_CUDA
def test_a_model_that_cannot_be_placed_on_the_device_is_a_model_error(test_models: TestModelPaths) -> None:
    """Not "lower size or count": placing the weights failed, whatever the job asked for."""
    on_cuda = ModelCache(
        {"test": ModelEntry("test", test_models.sd, ModelKind.SD1)}, device="cuda", dtype=torch.float32
    )
    with pytest.raises(JobFailed) as info:
        run_one(on_cuda, txt2img_job(), None)
    error = info.value
    assert (error.code, error.field, error.value, error.path) == ("model_failed", "model", "test", "cat.yaml")
    assert "could not be placed on cuda" in error.message and "device:" in error.fix
    assert "lower" not in error.fix


def test_fp16_on_cpu_is_a_config_error_that_says_what_to_use() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_dtype("fp16", "cpu")
    error = info.value
    assert (error.code, error.field, error.value) == ("config", "dtype", "fp16")
    assert "bf16" in error.fix and "auto" in error.fix


def test_dtype_auto_is_fp32_on_cpu() -> None:
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("bf16", "cpu") is torch.bfloat16
    assert resolve_dtype("fp32", "cpu") is torch.float32


@pytest.mark.parametrize("layout", ["empty folder", "missing", "a file", "index only", "no unet weights"])
def test_a_model_that_is_not_a_diffusers_folder_fails_with_model_failed(
    test_models: TestModelPaths, tmp_path: Path, layout: str
) -> None:
    path = tmp_path / "broken-model"
    if layout == "empty folder":
        path.mkdir()
    elif layout == "a file":
        path.write_bytes(b"not a model")
    elif layout == "index only":
        path.mkdir()
        shutil.copy(test_models.sd / "model_index.json", path)
    elif layout == "no unet weights":
        shutil.copytree(test_models.sd, path)
        for weights in (path / "unet").glob("*.safetensors"):
            weights.unlink()
    broken = ModelCache({"test": ModelEntry("test", path, ModelKind.SD1)}, device="cpu", dtype=torch.float32)
    with pytest.raises(JobFailed) as info:
        run_one(broken, txt2img_job(), None)
    error = info.value
    assert error.code == "model_failed"
    assert str(path) in error.message
    assert (error.path, error.job_index, error.field, error.value) == ("cat.yaml", 1, "model", "test")
    assert error.fix


# --- metadata ----------------------------------------------------------------------------------

# AUTOMATIC1111's own pattern for the `Key: value` line (modules/infotext_utils.py).
A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def a1111_params(line: str) -> dict[str, str]:
    return {k: json.loads(v) if v.startswith('"') else v for k, v in A1111_PARAM.findall(line)}


def test_infotext_layout_without_a_negative_prompt() -> None:
    spec = Txt2ImgJob(model="test", prompt="a hamster painting", steps=2, guidance=7.5, size=(64, 96), seed=42)
    text = infotext(spec, seed=42, size=(64, 96), model_name="test", sampler="euler_a")
    assert text.splitlines() == [
        "a hamster painting",
        "Steps: 2, Sampler: Euler a, Schedule type: Uniform, CFG scale: 7.5, Seed: 42, Size: 64x96, Model: test, "
        f"Version: diffusiond {__version__}",
    ]


def test_infotext_layout_with_a_negative_prompt() -> None:
    spec = Txt2ImgJob(prompt="a fox, in snow", negative_prompt="blurry, extra legs", steps=30, guidance=7, seed=1)
    lines = infotext(spec, seed=2, size=(512, 512), model_name="sd15", sampler="DDIM").splitlines()
    assert lines[0] == "a fox, in snow"
    assert lines[1] == "Negative prompt: blurry, extra legs"
    assert lines[2].startswith("Steps: 30, Sampler: DDIM, CFG scale: 7, Seed: 2, Size: 512x512, Model: sd15, ")
    assert len(lines) == 3


def test_infotext_values_with_separators_are_quoted_so_readers_split_them_right() -> None:
    spec = Img2ImgJob(task="img2img", prompt="a bird", steps=4, strength=0.5, image="bird.png")
    line = infotext(spec, seed=9, size=(64, 64), model_name='my, "best": model', sampler="euler").splitlines()[-1]
    assert 'Model: "my, \\"best\\": model"' in line
    params = a1111_params(line)
    assert params["Model"] == 'my, "best": model'
    assert params["Denoising strength"] == "0.5"
    assert params["Seed"] == "9" and params["Sampler"] == "Euler" and params["Size"] == "64x64"


def test_infotext_of_an_upscale_names_the_method_and_no_model_when_none() -> None:
    spec = UpscaleJob(task="upscale", method="lanczos", scale=2, image="a.png")
    line = infotext(spec, seed=0, size=(128, 128), model_name=None, sampler="none").splitlines()[-1]
    params = a1111_params(line)
    assert params["Postprocess upscaler"] == "Lanczos"
    assert "Model" not in params


@pytest.mark.parametrize(("fmt", "pil_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_encoded_metadata_reads_back(tmp_path: Path, fmt: str, pil_format: str) -> None:
    spec = Txt2ImgJob(prompt="café, 猫 «quoted»", negative_prompt="blurry", seed=3, size=(32, 16))
    parameters = infotext(spec, seed=3, size=(32, 16), model_name="test", sampler="euler")
    record = {"job": spec.model_dump(mode="json"), "seed": 3}
    data = encode(
        Image.new("RGB", (32, 16), (10, 200, 30)), OutputSpec(format=fmt), parameters=parameters, record=record
    )
    path = tmp_path / f"out.{fmt}"
    path.write_bytes(data)
    assert read_parameters(str(path)) == parameters
    with Image.open(path) as image:
        assert image.format == pil_format
        assert image.size == (32, 16)
        if fmt == "png":
            assert json.loads(image.info["diffusiond"]) == record


def test_an_image_without_metadata_has_no_parameters(tmp_path: Path) -> None:
    path = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(path)
    assert read_parameters(str(path)) is None


# --- the test model ----------------------------------------------------------------------------


def test_make_test_model_writes_byte_identical_weights(test_models: TestModelPaths, tmp_path: Path) -> None:
    again = make_test_model(tmp_path / "again")
    for first, second in ((test_models.sd, again.sd), (test_models.upscaler, again.upscaler)):
        assert is_test_model(first) and is_test_model(second)
        names = sorted(p.relative_to(first) for p in first.rglob("*.safetensors"))
        assert names == sorted(p.relative_to(second) for p in second.rglob("*.safetensors"))
        assert len(names) == 3  # text encoder, unet, vae
        for name in names:
            assert (first / name).read_bytes() == (second / name).read_bytes(), name
