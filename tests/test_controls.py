"""ControlNet for sketches: a scribble control from the job's sketch or a file of its own, several at
once, from a job or a hot folder's profile; built-in preprocessing; SD 1.x and SDXL models."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from diffusiond.pipeline.backend import ExtraNetworks
from diffusiond.pipeline.controls import old_a1111_hash, prepare
from diffusiond.pipeline.errors import JobFailed, JobRejected
from diffusiond.pipeline.families import ModelEntry, ModelKind
from diffusiond.pipeline.generate import DiffusersGenerator
from diffusiond.pipeline.inputs import probe_image
from diffusiond.pipeline.job import ControlUse, Job, Rules, fill_seed, validate_job
from diffusiond.pipeline.metadata import parse_infotext
from diffusiond.pipeline.models import ModelCache
from diffusiond.pipeline.testmodel import make_test_controlnet, make_test_lora, write_controlnet_file
from tests.conftest import Spool, first_image_pixels, run_in_turn, start_daemon_thread, wait_for, write_config


@pytest.fixture(scope="module")
def controlnets(tmp_path_factory: pytest.TempPathFactory, test_models: Any) -> Path:
    """A folder as the config's `controlnets:` names it: one diffusers ControlNet folder for the SD 1 test model."""
    folder = tmp_path_factory.mktemp("controlnets")
    make_test_controlnet(test_models.sd, folder / "scribble")
    return folder


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def sketch(size: tuple[int, int] = (64, 64)) -> bytes:
    """Dark lines on white paper, as a sketch is drawn."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.line((4, 4, size[0] - 4, size[1] - 4), fill=(20, 20, 20), width=3)
    draw.ellipse((16, 16, 40, 40), outline=(40, 40, 40), width=2)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_scribble_job_from_a_sketch_runs_through_the_daemon(
    spool: Spool, test_models: Any, controlnets: Path
) -> None:
    """The headline use: a sketch and a job with a scribble control; weight 0 gives the uncontrolled image."""
    write_config(spool.root, test_models, controlnets=str(controlnets))
    control = "control: {model: scribble, preprocess: scribble, weight: %s}\n"
    for stem in ("fox", "fox-zero"):
        spool.drop(f"{stem}.png", sketch())
    jobs = [
        ("plain", "prompt: a fox\nseed: 5\n"),
        ("fox", "prompt: a fox\nseed: 5\n" + control % 1),
        ("fox-zero", "prompt: a fox\nseed: 5\n" + control % 0),
    ]
    with start_daemon_thread(spool):
        made = run_in_turn(spool, jobs)
        wait_for(lambda: sorted(p.name for p in spool.archive.rglob("fox.*")) == ["fox.png", "fox.yaml"])
    pixels = {name: first_image_pixels(spool, m) for name, m in made.items()}
    assert pixels["fox-zero"] == pixels["plain"]  # weight 0 steers nothing
    assert pixels["fox"] != pixels["plain"]
    fox = made["fox"]
    [entry] = fox["controls"]
    weights = controlnets / "scribble" / "diffusion_pytorch_model.safetensors"
    assert entry["model"] == "scribble" and entry["preprocess"] == "scribble" and entry["weight"] == 1.0
    assert entry["image"]["file"] == "fox.png"
    assert entry["controlnet"]["hash"] == old_a1111_hash(weights)
    assert fox["input_image"]["file"] == "fox.png"
    assert fox["model"]["pipeline"] == "StableDiffusionControlNetPipeline"
    with Image.open(spool.outbox / fox["outputs"][0]["file"]) as png:
        parameters = png.text["parameters"]
    unit = parse_infotext(parameters)["settings"]["ControlNet 0"]
    assert unit.startswith(f"Module: scribble_threshold, Model: scribble [{old_a1111_hash(weights)}], Weight: 1.0, ")
    assert "Guidance Start: 0.0, Guidance End: 1.0" in unit

    from sd_parsers import ParserManager  # an independent reader: the prompt, seed and checkpoint survive

    with Image.open(spool.outbox / fox["outputs"][0]["file"]) as png:
        info = ParserManager().parse(png)
    assert info is not None
    assert [p.value for p in info.prompts] == ["a fox"]
    [sampler] = info.samplers
    assert sampler.parameters["seed"] == "5" and sampler.model is not None and sampler.model.name == "test"


def test_a_profile_folder_runs_each_bare_sketch_with_its_controls(
    spool: Spool, test_models: Any, controlnets: Path, tmp_path: Path
) -> None:
    """What an A1111 user does: a prompt with weights and a LoRA tag, and a hot folder whose profile has
    two controls (the sketch as a scribble and its Canny edges); a sketch dropped there is the job."""
    make_test_lora(test_models.sd, tmp_path / "loras" / "film-grain.safetensors")
    profile = {
        "task": "txt2img",
        "prompt": "a (castle:1.3) on a hill <lora:film-grain:0.7>",
        "control": [
            {"model": "scribble", "preprocess": "scribble"},
            {"model": "scribble", "preprocess": "canny", "weight": 0.5, "start": 0.2, "end": 0.8},
        ],
    }
    write_config(
        spool.root,
        test_models,
        controlnets=str(controlnets),
        loras=str(tmp_path / "loras"),
        profiles={"scribble": profile},
    )
    spool.drop("scribble/castle.png", sketch())
    with start_daemon_thread(spool):
        [manifest] = wait_for(spool.manifests, what="the manifest")
    assert [(c["preprocess"], c["weight"], c["image"]["file"]) for c in manifest["controls"]] == [
        ("scribble", 1.0, "scribble/castle.png"),
        ("canny", 0.5, "scribble/castle.png"),
    ]
    with Image.open(spool.outbox / manifest["outputs"][0]["file"]) as png:
        settings = parse_infotext(png.text["parameters"])["settings"]
    assert "Guidance Start: 0.2, Guidance End: 0.8" in settings["ControlNet 1"]
    assert [(lora["name"], lora["weight"]) for lora in manifest["loras"]] == [("film-grain", 0.7)]
    assert manifest["prompt_encoding"]["method"] == "compel" and manifest["prompt_encoding"]["weighted"]
    assert "Lora hashes" in settings
    assert (
        "Module: canny" in settings["ControlNet 1"]
        and "Threshold A: 100.0, Threshold B: 200.0" in settings["ControlNet 1"]
    )
    assert spool.failures() == []


def test_an_img2img_job_with_a_control_image_of_its_own(spool: Spool, test_models: Any, controlnets: Path) -> None:
    write_config(spool.root, test_models, controlnets=str(controlnets))
    spool.drop("photo.png", sketch())
    spool.drop("lines/edges.png", sketch((96, 64)))  # another shape: made the job's size by `resize`
    spool.drop(
        "photo.yaml",
        "task: img2img\nprompt: a barn\nstrength: 0.6\n"
        "control: {model: scribble, image: lines/edges.png, preprocess: invert, resize: fill}\n",
    )
    wanted = ["edges.png", "photo.png", "photo.yaml"]  # archived flat, as every input is
    with start_daemon_thread(spool):
        [manifest] = wait_for(spool.manifests, what="the manifest")
        wait_for(lambda: sorted(p.name for p in _files(spool.archive)) == wanted, what="the archive")
    [entry] = manifest["controls"]
    assert entry["image"]["file"] == "lines/edges.png" and manifest["input_image"]["file"] == "photo.png"
    assert manifest["model"]["pipeline"] == "StableDiffusionControlNetImg2ImgPipeline"


def test_a_missing_control_image_or_controlnet_is_a_clear_rejection(
    spool: Spool, test_models: Any, controlnets: Path
) -> None:
    write_config(spool.root, test_models, controlnets=str(controlnets), watch={"pair_wait_s": 0.2})
    spool.drop("nolines.yaml", "prompt: a fox\ncontrol: {model: scribble, image: gone.png}\n")
    spool.drop("unknown.yaml", "prompt: a fox\ncontrol: {model: lineart}\n")
    with start_daemon_thread(spool):
        reports = wait_for(lambda: len(spool.reports()) == 2 and spool.reports(), what="two reports")
    by_field = {r["field"]: r for r in reports}
    assert by_field["control.0.image"]["code"] == "missing_input"
    assert "'gone.png' did not arrive" in by_field["control.0.image"]["error"]
    assert "known: scribble" in by_field["control.0.model"]["error"]


RULES = Rules(
    models={"m": ModelKind.SD1, "x4": ModelKind.UPSCALER_X4}, defaults={"all": {"model": "m"}}, controlnets={}
)


@pytest.mark.parametrize(
    ("document", "field", "says"),
    [
        ({"task": "upscale", "model": "x4", "control": {"model": "c"}}, "control", "steer txt2img and img2img"),
        ({"image": "a.png"}, "image", "only the picture its ControlNets read"),
        ({"image": "a.png", "control": {"model": "c", "image": "b.png"}}, "image", "would not be read"),
        ({"control": {"model": "c", "start": 0.5, "end": 0.5}}, "control.0", "must be before end"),
        ({"control": [{"model": "c"}] * 5}, "control", "at most 4"),
        ({"control": {"model": "c", "image": "../out.png"}}, "control.0.image", "leaves the inbox"),
        ({"control": {"model": "c", "preprocess": "hed"}}, "control.0.preprocess", "'none', 'invert', 'scribble'"),
        ({"task": "img2img", "then": [{"task": "img2img", "control": {"model": "c"}}]}, "control", "first stage"),
        ({"task": "img2img", "then": [{"task": "img2img", "mask_blur": 8}]}, "mask_blur", "a stage has no mask"),
    ],
)
def test_control_fields_are_checked_before_anything_runs(document: dict[str, Any], field: str, says: str) -> None:
    models = {"m": ModelKind.SD1, "x4": ModelKind.UPSCALER_X4}
    rules = Rules(models=models, defaults={"all": {"model": "m"}}, controlnets={"c": Path("c")})
    with pytest.raises(JobRejected) as caught:
        validate_job(document, path="job.yaml", index=1, rules=rules)
    assert caught.value.field == field
    assert says in str(caught.value)


def test_preprocessing_turns_a_sketch_into_what_a_controlnet_was_trained_on() -> None:
    with Image.open(io.BytesIO(sketch())) as opened:
        drawn = opened.convert("RGB")
    gray = np.asarray(drawn.convert("L"))
    lines = gray < 128
    scribble = np.asarray(prepare(drawn, ControlUse(model="c", preprocess="scribble"), (64, 64)).convert("L"))
    assert set(np.unique(scribble)) == {0, 255}
    assert (scribble == 255).tolist() == lines.tolist()  # every stroke white, the paper black
    inverted = np.asarray(prepare(drawn, ControlUse(model="c", preprocess="invert"), (64, 64)))
    assert (inverted == 255 - np.asarray(drawn)).all()
    edges = np.asarray(prepare(drawn, ControlUse(model="c", preprocess="canny"), (64, 64)).convert("L"))
    assert edges[lines].size and 0 < (edges == 255).mean() < 0.5  # the strokes' outlines, not the paper
    wide = prepare(drawn, ControlUse(model="c", resize="crop"), (128, 64))
    assert wide.size == (128, 64)


@pytest.mark.parametrize(
    ("family", "kind", "pipeline"),
    [
        ("sdxl", ModelKind.SDXL, "StableDiffusionXLControlNetPipeline"),
        ("sd2_v", ModelKind.SD2, "StableDiffusionControlNetPipeline"),
    ],
)
def test_sdxl_and_sd2_take_their_own_controlnet_and_refuse_one_made_for_sd1(
    family_models: Any, test_models: Any, tmp_path: Path, family: str, kind: ModelKind, pipeline: str
) -> None:
    model = getattr(family_models, family)
    xl = make_test_controlnet(model, tmp_path / "xl-scribble")
    sd1 = make_test_controlnet(test_models.sd, tmp_path / "sd1-scribble")
    cache = ModelCache(
        {"xl": ModelEntry("xl", model, kind)},
        device="cpu",
        dtype=torch.float32,
        networks=ExtraNetworks(controlnets={"xl-scribble": xl, "sd1-scribble": sd1}),
    )
    (tmp_path / "s.png").write_bytes(sketch())
    image = probe_image(tmp_path / "s.png", label="s.png", max_file_bytes=1 << 20)
    generator = DiffusersGenerator(cache)
    rules = Rules(models={"xl": kind}, defaults={}, controlnets={"xl-scribble": xl, "sd1-scribble": sd1})

    def run(name: str, weight: float) -> Any:
        document = {"model": "xl", "size": "64x64", "steps": 2, "seed": 1, "prompt": "a fox"}
        spec = validate_job(
            document | {"control": {"model": name, "weight": weight}}, path="s.yaml", index=1, rules=rules
        )
        [made] = generator.generate([Job("j", "s.yaml", 1, fill_seed(spec), image, None, (image,))])
        return made

    steered, unsteered = run("xl-scribble", 1.0), run("xl-scribble", 0.0)
    assert steered.images[0].tobytes() != unsteered.images[0].tobytes()
    assert steered.model is not None and steered.model.pipeline == pipeline
    with pytest.raises(JobFailed, match="made for another model family"):
        run("sd1-scribble", 1.0)


def test_single_file_controlnets_load_in_either_layout_and_a_broken_one_fails_clearly(
    test_models: Any, controlnets: Path, tmp_path: Path
) -> None:
    """`control_v11p_sd15_scribble.safetensors` as published (original layout) and a diffusers-layout file,
    from a `controlnets:` folder; both steer like the folder they were made from."""
    from diffusiond.daemon.config import NamedFiles

    folder = tmp_path / "controlnets"
    write_controlnet_file(controlnets / "scribble", folder / "original.safetensors")
    folder.joinpath("diffusers.safetensors").write_bytes(
        (controlnets / "scribble" / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    folder.joinpath("broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    folder.joinpath("pickled.pth").write_bytes(b"not listed")
    shutil.copytree(controlnets / "scribble", folder / "sd15" / "scribble")  # a diffusers folder, in a subfolder
    files = NamedFiles(folder, (".safetensors",), folders_with="config.json")
    assert sorted(files) == ["broken", "diffusers", "original", "sd15/scribble"]
    cache = ModelCache(
        {"test": ModelEntry("test", test_models.sd, ModelKind.SD1)},
        device="cpu",
        dtype=torch.float32,
        networks=ExtraNetworks(controlnets=dict(files)),
    )
    (tmp_path / "s.png").write_bytes(sketch())
    image = probe_image(tmp_path / "s.png", label="s.png", max_file_bytes=1 << 20)
    generator = DiffusersGenerator(cache)
    rules = Rules(models={"test": ModelKind.SD1}, defaults={}, controlnets=dict(files))

    def pixels(name: str) -> bytes:
        document = {"model": "test", "size": "64x64", "steps": 2, "seed": 1, "control": {"model": name}}
        spec = validate_job(document, path="s.yaml", index=1, rules=rules)
        [made] = generator.generate([Job("j", "s.yaml", 1, fill_seed(spec), image, None, (image,))])
        return made.images[0].tobytes()

    assert pixels("original") == pixels("diffusers") == pixels("sd15/scribble")
    with pytest.raises(JobFailed, match=r"ControlNet 'broken' at .*broken\.safetensors") as caught:
        pixels("broken")
    assert caught.value.field == "control"


def test_reproduce_refuses_an_image_a_controlnet_steered(tmp_path: Path) -> None:
    """Its control image is not in it: made again without it would not be the same picture."""
    from PIL.PngImagePlugin import PngInfo

    from diffusiond.pipeline.reproduce import job_from_image

    info = PngInfo()
    unit = "Module: canny, Model: canny [d14c016b], Weight: 1.0, Guidance Start: 0.0, Guidance End: 1.0"
    info.add_text(
        "parameters", f'a fox\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64, ControlNet 0: "{unit}"'
    )
    Image.new("RGB", (64, 64)).save(tmp_path / "a1111.png", pnginfo=info)
    with pytest.raises(JobRejected, match="guided by a ControlNet"):
        job_from_image(tmp_path / "a1111.png", label="reproduce/a1111.png", models={}, model_hashes=dict)
