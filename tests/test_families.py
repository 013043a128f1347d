"""SD 2 (v-prediction), SDXL and SD 2 depth through a real daemon, each on its tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from PIL import Image

from diffusiond.pipeline.families import ModelEntry, ModelKind
from diffusiond.pipeline.models import ModelCache
from diffusiond.pipeline.testmodel import FamilyModelPaths
from tests.conftest import CEILING_S, Spool, start_daemon_thread, wait_for, write_config
from tests.test_end_to_end import sketch_png

JOBS = """\
model: sd2v
prompt: a lighthouse
negative_prompt: lowres
seed: 1
---
model: xl
prompt: a lighthouse at night
seed: 2
---
task: img2img
model: xl
image: harbor.png
prompt: the same harbor in winter
strength: 0.75
seed: 3
---
task: depth2img
model: depth
image: harbor.png
prompt: the harbor as a bronze relief
strength: 0.75
seed: 4
"""


def test_each_family_runs_with_the_pipeline_its_model_needs(
    spool: Spool, test_models, family_models: FamilyModelPaths
) -> None:
    models = {
        "test": str(test_models.sd),
        "sd2v": str(family_models.sd2_v),
        "xl": str(family_models.sdxl),
        "depth": str(family_models.depth2img),
    }
    write_config(spool.root, test_models, models=models, max_loaded_models=3)
    spool.drop("harbor.png", sketch_png((30, 60, 140)))
    spool.drop("families.yaml", JOBS)
    with start_daemon_thread(spool):
        manifests = wait_for(
            lambda: len(spool.manifests()) == 4 and spool.manifests(), timeout_s=CEILING_S, what="4 manifests"
        )
    by_index = {m["index"]: m for m in sorted(manifests, key=lambda m: m["index"])}
    assert spool.reports() == []
    assert [by_index[i]["model"]["family"] for i in (1, 2, 3, 4)] == ["sd2", "sdxl", "sdxl", "depth2img"]
    assert [by_index[i]["model"]["pipeline"] for i in (1, 2, 3, 4)] == [
        "StableDiffusionPipeline",
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionDepth2ImgPipeline",
    ]
    for manifest in manifests:
        with Image.open(spool.outbox / manifest["outputs"][0]["file"]) as image:
            assert image.size == (64, 64)
    assert by_index[1]["prediction"] == "v_prediction"


def test_a_models_prediction_setting_overrides_its_scheduler(family_models: FamilyModelPaths) -> None:
    entry = ModelEntry("v", family_models.sd2_v, ModelKind.SD2, prediction="epsilon")
    cache = ModelCache({"v": entry}, device="cpu", dtype=torch.float32)
    assert cache.pipeline("v", "txt2img").scheduler_config["prediction_type"] == "epsilon"


def test_the_real_depth_models_index_loads_on_current_transformers(
    family_models: FamilyModelPaths, tmp_path: Path
) -> None:
    """stabilityai/stable-diffusion-2-depth names DPTFeatureExtractor, a class transformers 5 removed."""
    folder = Path(shutil.copytree(family_models.depth2img, tmp_path / "depth"))
    index = json.loads((folder / "model_index.json").read_text())
    index["feature_extractor"] = ["transformers", "DPTFeatureExtractor"]
    (folder / "model_index.json").write_text(json.dumps(index))
    cache = ModelCache({"d": ModelEntry("d", folder, ModelKind.DEPTH2IMG)}, device="cpu", dtype=torch.float32)
    assert type(cache.pipeline("d", "depth2img").pipe).__name__ == "StableDiffusionDepth2ImgPipeline"
