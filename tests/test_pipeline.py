"""The pipeline on the tiny test models: schedulers, seeds, shared weights, load errors, metadata."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusiond import __version__
from diffusiond.pipeline.backend import Generated
from diffusiond.pipeline.errors import ConfigError, JobFailed
from diffusiond.pipeline.families import ModelEntry, ModelKind
from diffusiond.pipeline.generate import DiffusersGenerator
from diffusiond.pipeline.inputs import probe_image
from diffusiond.pipeline.job import SCHEDULER_NAMES, Img2ImgJob, Job, OutputSpec, Txt2ImgJob, UpscaleJob
from diffusiond.pipeline.metadata import encode, infotext, read_parameters
from diffusiond.pipeline.models import ModelCache, resolve_dtype
from diffusiond.pipeline.schedulers import SCHEDULERS
from diffusiond.pipeline.testmodel import TestModelPaths, is_test_model, make_test_model


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


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_every_scheduler_name_makes_an_image(cache: ModelCache, name: str) -> None:
    generated = run_one(cache, txt2img_job(scheduler=name), None)
    assert [image.size for image in generated.images] == [(64, 64)]
    assert generated.seeds == [1]
    assert generated.scheduler == name


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


# --- devices and load errors -------------------------------------------------------------------


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
