"""Warm models on the tiny test models: LRU, preload, memory ladder, hashes, cancellation, batching."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusiond.pipeline.backend import Cancelled
from diffusiond.pipeline.errors import JobFailed
from diffusiond.pipeline.families import ModelEntry, ModelKind, native_size
from diffusiond.pipeline.generate import DiffusersGenerator
from diffusiond.pipeline.hashing import model_hash
from diffusiond.pipeline.job import Job, Txt2ImgJob
from diffusiond.pipeline.models import Memory, ModelCache
from diffusiond.pipeline.standin import StandInGenerator
from diffusiond.pipeline.testmodel import TestModelPaths
from tests.conftest import CEILING_S, Spool, wait_for


def entries(models: TestModelPaths) -> dict[str, ModelEntry]:
    return {
        "test": ModelEntry("test", models.sd, ModelKind.SD1),
        "test-x4": ModelEntry("test-x4", models.upscaler, ModelKind.UPSCALER_X4),
    }


def job(seed: int = 1, prompt: str = "a cat", **fields: object) -> Job:
    base = {"model": "test", "prompt": prompt, "size": (64, 64), "steps": 3, "seed": seed}
    spec = Txt2ImgJob.model_validate(base | fields)
    return Job(f"job-{seed}", "job.yaml", 1, spec)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def raise_oom_once(cache: ModelCache) -> list[int]:
    """Make the next UNet forward raise a real torch.OutOfMemoryError, as a full GPU would."""
    calls: list[int] = []
    unet = cache.pipeline("test", "txt2img").pipe.unet

    def hook(module: torch.nn.Module, args: object) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    unet.register_forward_pre_hook(hook)
    return calls


def test_out_of_memory_retries_one_level_lower_and_remembers_it(test_models: TestModelPaths) -> None:
    cache = ModelCache(entries(test_models), device="cpu", dtype=torch.float32, memory="auto")
    calls = raise_oom_once(cache)
    [generated] = DiffusersGenerator(cache).generate([job()])
    assert len(generated.images) == 1 and calls == [1], "the retry runs on a freshly placed pipeline"
    assert generated.memory == "low" and cache.level("test") is Memory.LOW
    pipe = cache.pipeline("test", "txt2img").pipe
    assert pipe.vae.use_slicing and pipe.vae.use_tiling, "low memory slices and tiles the VAE"
    [again] = DiffusersGenerator(cache).generate([job(seed=2)])
    assert again.memory == "low", "the level is remembered for the model"


def test_out_of_memory_with_a_fixed_level_fails_clearly(test_models: TestModelPaths) -> None:
    cache = ModelCache(entries(test_models), device="cpu", dtype=torch.float32, memory="normal")
    raise_oom_once(cache)
    with pytest.raises(JobFailed) as caught:
        DiffusersGenerator(cache).generate([job()])
    assert "ran out of device memory" in caught.value.message and "memory: auto" in caught.value.fix
    assert caught.value.path == "job.yaml"


def test_least_recently_used_model_is_unloaded(test_models: TestModelPaths) -> None:
    cache = ModelCache(entries(test_models), device="cpu", dtype=torch.float32, max_loaded=1)
    cache.pipeline("test", "txt2img")
    cache.pipeline("test", "img2img")
    assert cache.loaded() == ["test"]
    cache.pipeline("test-x4", "upscale")
    assert cache.loaded() == ["test-x4"]
    cache.preload(["test"])
    assert cache.loaded() == ["test"]


def test_cancel_stops_at_a_step_boundary(test_models: TestModelPaths) -> None:
    cache = ModelCache(entries(test_models), device="cpu", dtype=torch.float32)
    cancel = threading.Event()
    steps: list[tuple[int, int]] = []

    def on_step(step: int, total: int) -> None:
        steps.append((step, total))
        if step == 2:
            cancel.set()

    with pytest.raises(Cancelled):
        DiffusersGenerator(cache).generate([job(steps=5)], cancel=cancel, on_step=on_step)
    assert steps == [(1, 6), (2, 6)]  # the test model's PNDM makes 5 steps in 6 UNet calls


def test_a_batch_gives_each_job_the_images_it_gets_alone(test_models: TestModelPaths) -> None:
    cache = ModelCache(entries(test_models), device="cpu", dtype=torch.float32)
    jobs = [job(seed=10, prompt="a cat", count=2), job(seed=20, prompt="a dog", negative_prompt="blur")]
    batched = DiffusersGenerator(cache).generate(jobs)
    assert [g.batch_size for g in batched] == [2, 2] and [g.seeds for g in batched] == [[10, 11], [20]]
    for one, together in zip(jobs, batched, strict=True):
        [alone] = DiffusersGenerator(cache).generate([one])
        for a, b in zip(alone.images, together.images, strict=True):
            # Batched math may round differently in the last bit: allow 2 of 255 levels.
            assert np.abs(pixels(a) - pixels(b)).max() <= 2


def test_model_hash_of_a_file_is_automatic1111s(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(os.urandom(3_000_000))
    entry = ModelEntry("m", weights, ModelKind.UNKNOWN)
    assert model_hash(entry, tmp_path / "state") == hashlib.sha256(weights.read_bytes()).hexdigest()[:10]


def test_model_hash_of_a_folder_matches_the_documented_shell_line(test_models: TestModelPaths, tmp_path: Path) -> None:
    folder = shutil.copytree(test_models.sd, tmp_path / "sd")
    line = "find . -type f ! -name '.*' | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-10"
    expected = subprocess.run(["bash", "-c", line], cwd=folder, capture_output=True, text=True, check=True).stdout
    entry = ModelEntry("sd", folder, ModelKind.SD1)
    assert model_hash(entry, tmp_path / "state") == expected.strip()


def test_model_hash_is_cached_until_a_file_changes(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"version one")
    entry = ModelEntry("m", weights, ModelKind.UNKNOWN)
    first = model_hash(entry, tmp_path)
    cache_file = tmp_path / "model-hashes.json"
    cached = json.loads(cache_file.read_text())
    cached[str(weights)]["hash"] = "from-cache"
    cache_file.write_text(json.dumps(cached))
    assert model_hash(entry, tmp_path) == "from-cache", "unchanged file: not read again"
    weights.write_bytes(b"version two, longer")
    assert model_hash(entry, tmp_path) == hashlib.sha256(b"version two, longer").hexdigest()[:10] != first


def test_native_size_of_the_test_model(test_models: TestModelPaths) -> None:
    assert native_size(test_models.sd, ModelKind.SD1) == 64
    assert native_size(Path("/x/model.safetensors"), ModelKind.SDXL) == 1024
    assert native_size(Path("/x/model.safetensors"), ModelKind.SD2, "v_prediction") == 768


def test_preloaded_model_is_warm_before_ready_and_recorded(spool: Spool, test_models) -> None:
    from tests.conftest import start_daemon_thread, write_config

    write_config(spool.root, test_models, preload=["test"])
    with start_daemon_thread(spool) as daemon:
        assert daemon.generator is not None and daemon.generator.loaded() == ["test"]
        spool.drop("one.yaml", "prompt: warm\nseed: 3\n")
        [manifest] = wait_for(spool.manifests, what="a manifest")
    assert manifest["model"]["hash"] == model_hash(ModelEntry("test", test_models.sd, ModelKind.SD1), None)
    assert manifest["memory"] == "normal" and manifest["batch_size"] == 1


def test_preloading_runs_on_the_worker_thread(spool: Spool, test_models) -> None:
    """`top -H` shows the model load under `worker`: torch on a second thread slows CPU generation
    for good (bench/torch_threads.py), so the main thread must not load models."""
    from tests.conftest import start_daemon_process, write_config

    status = spool.root / "state" / "status.json"
    config = write_config(spool.root, test_models, preload=["test", "test-x4"])
    process = start_daemon_process(config)
    try:
        wait_for(lambda: status.exists() and json.loads(status.read_text())["state"] == "ready", timeout_s=CEILING_S)
        tasks = Path(f"/proc/{process.pid}/task")
        if not tasks.is_dir():
            pytest.skip("needs Linux /proc")
        cpu: dict[str, float] = {}
        for task in tasks.iterdir():
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rpartition(")")[2].split()
            cpu[name] = cpu.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    finally:
        process.terminate()
        process.wait(CEILING_S)
    assert spool.manifests() == []  # no job ran: what the worker used so far is the preloading
    assert cpu.get("worker", 0.0) >= 0.05, cpu


def test_a_preloaded_model_that_does_not_load_stops_the_start(spool: Spool, test_models) -> None:
    """Preloading runs on the worker thread; its failure still ends `diffusiond run` with the reason."""
    import sys

    from tests.conftest import write_config

    broken = spool.root / "broken.safetensors"
    broken.write_bytes(b"not a model at all")
    models = {"test": str(test_models.sd), "test-x4": str(test_models.upscaler), "broken": str(broken)}
    config = write_config(spool.root, test_models, models=models, preload=["test", "broken"])
    done = subprocess.run(
        [sys.executable, "-m", "diffusiond.daemon.cli", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=CEILING_S,
    )
    assert done.returncode != 0
    assert str(broken) in done.stderr and "Fix:" in done.stderr, done.stderr[-2000:]


def test_compatible_jobs_dropped_together_share_a_call(spool: Spool, test_models) -> None:
    """Batching order, on the stand-in: the worker waits (up to batch_wait_s) until a batch is full."""
    from tests.conftest import start_daemon_thread, write_config

    write_config(spool.root, test_models, batch_size=4, batch_wait_s=CEILING_S)
    for n in range(3):
        spool.drop(f"same-{n}.yaml", f"prompt: number {n}\nseed: {n}\n")
    spool.drop("other.yaml", "prompt: other size\nsize: 32x32\nseed: 9\n")
    standin = StandInGenerator()
    with start_daemon_thread(spool, standin):
        manifests = wait_for(lambda: len(spool.manifests()) == 4 and spool.manifests(), what="4 manifests")
    sizes = {m["source"]: m["batch_size"] for m in manifests}
    assert sizes == {"same-0.yaml": 3, "same-1.yaml": 3, "same-2.yaml": 3, "other.yaml": 1}
    job_ids = {m["source"]: m["job_id"] for m in manifests}
    assert sorted(map(sorted, standin.calls)) == sorted(
        [sorted(job_ids[f"same-{n}.yaml"] for n in range(3)), [job_ids["other.yaml"]]]
    )


def test_bf16_on_the_cpu_is_an_explicit_choice_that_works(test_models: TestModelPaths) -> None:
    cache = ModelCache(entries(test_models), device="cpu", dtype=torch.bfloat16)
    [generated] = DiffusersGenerator(cache).generate([job()])
    assert generated.images[0].size == (64, 64)
    assert cache.pipeline("test", "txt2img").pipe.unet.dtype is torch.bfloat16
