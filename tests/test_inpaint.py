"""Inpainting: a sketch with its mask (`<stem>.mask.png`, or `mask:`), on a normal model (masked img2img)
and on an inpainting model (9-channel UNet), through the daemon; what is not masked keeps its pixels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from diffusiond.daemon.pairing import Pairing
from diffusiond.pipeline.job import Rules
from diffusiond.pipeline.testmodel import make_test_inpaint
from tests.conftest import Spool, run_in_turn, start_daemon_thread, wait_for, write_config

BOX = (16, 16, 48, 48)
"""The masked square of the 64 px test images."""


@pytest.fixture(scope="module")
def inpaint_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_inpaint(tmp_path_factory.mktemp("inpaint"))


def _photo() -> Image.Image:
    """A 64 px picture with detail everywhere: the kept part is compared pixel by pixel."""
    rng = np.random.default_rng(5)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


def _mask(size: tuple[int, int] = (64, 64)) -> Image.Image:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle(BOX, fill=255)
    return mask


def _png(image: Image.Image, path: Path) -> bytes:
    image.save(path.with_suffix(".tmp.png"))
    data = path.with_suffix(".tmp.png").read_bytes()
    path.with_suffix(".tmp.png").unlink()
    return data


def _pixels(spool: Spool, manifest: dict[str, Any]) -> np.ndarray:
    with Image.open(spool.outbox / manifest["outputs"][0]["file"]) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def _inside(array: np.ndarray) -> np.ndarray:
    left, top, right, bottom = BOX
    return array[top : bottom + 1, left : right + 1]


def _outside_mask() -> np.ndarray:
    keep = np.ones((64, 64), dtype=bool)
    left, top, right, bottom = BOX
    keep[top : bottom + 1, left : right + 1] = False
    return keep


def test_a_sketch_with_its_mask_is_redrawn_inside_the_mask_only(spool: Spool, tmp_path: Path) -> None:
    photo, kept = _photo(), _outside_mask()
    spool.drop("room.png", _png(photo, tmp_path / "a.png"))
    spool.drop("room.mask.png", _png(_mask(), tmp_path / "b.png"))
    spool.drop("plain.png", _png(photo, tmp_path / "c.png"))
    jobs = [
        ("room", "task: img2img\nprompt: a red sofa\nstrength: 0.9\nmask_blur: 0\nseed: 4\n"),
        ("plain", "task: img2img\nprompt: a red sofa\nstrength: 0.9\nseed: 4\n"),  # no mask: everything redrawn
    ]
    archived = ["plain.png", "plain.yaml", "room.mask.png", "room.png", "room.yaml"]
    with start_daemon_thread(spool):
        made = run_in_turn(spool, jobs)
        wait_for(lambda: sorted(p.name for p in spool.archive.iterdir()) == archived, what="the archive")
    room, plain = made["room"], made["plain"]
    out, source = _pixels(spool, room), np.asarray(photo, dtype=np.int16)
    assert np.abs(out - source)[kept].max() <= 1  # the input's own pixels, not the VAE's copy of them
    assert np.abs(_inside(out) - _inside(source)).mean() > 10  # the masked square was redrawn
    assert np.abs(_pixels(spool, plain) - source)[kept].mean() > 10  # without a mask it all changes
    assert room["mask"]["file"] == "room.mask.png"
    assert room["job"]["mask"] == "room.mask.png"  # the same-stem mask, named in the job as run
    assert room["model"]["pipeline"] == "StableDiffusionInpaintPipeline"
    assert plain["mask"] is None
    with Image.open(spool.outbox / room["outputs"][0]["file"]) as png:
        assert "Mask blur" not in png.text["parameters"]  # A1111 writes it when there is a blur


def test_an_inpainting_model_with_invert_mask_and_only_masked(
    spool: Spool, test_models: Any, inpaint_model: Path, tmp_path: Path
) -> None:
    """A 9-channel UNet; `invert_mask` keeps the square and redraws the rest; `inpaint_full_res` redraws
    only the mask's box (at the job's size) and pastes it back."""
    write_config(spool.root, test_models, models={"test": str(test_models.sd), "inpaint": str(inpaint_model)})
    photo, kept = _photo(), _outside_mask()
    for name in ("inverted", "detail"):  # each job's inputs are archived with it
        spool.drop(f"photos/{name}.png", _png(photo, tmp_path / "a.png"))
        spool.drop(f"holes/{name}.png", _png(_mask(), tmp_path / "b.png"))
    common = "task: img2img\nmodel: inpaint\nmask_blur: 0\nstrength: 1\nseed: 2\n"
    jobs = [
        ("inverted", common + "image: photos/inverted.png\nmask: holes/inverted.png\ninvert_mask: true\n"),
        (
            "detail",
            common + "image: photos/detail.png\nmask: holes/detail.png\ninpaint_full_res: true\n"
            "inpaint_full_res_padding: 4\n",
        ),
    ]
    with start_daemon_thread(spool):
        made = run_in_turn(spool, jobs)
    source = np.asarray(photo, dtype=np.int16)
    inverted, detail = _pixels(spool, made["inverted"]), _pixels(spool, made["detail"])
    assert np.abs(_inside(inverted) - _inside(source)).max() <= 1  # inverted: the square is what is kept
    assert np.abs(inverted - source)[kept].mean() > 10
    assert np.abs(detail - source)[kept].max() <= 1
    assert np.abs(_inside(detail) - _inside(source)).mean() > 10
    assert made["detail"]["model"]["family"] == "sd1_inpaint"
    with Image.open(spool.outbox / made["detail"]["outputs"][0]["file"]) as png:
        parameters = png.text["parameters"]
    assert "Inpaint area: Only masked" in parameters and "Masked area padding: 4" in parameters
    with Image.open(spool.outbox / made["inverted"]["outputs"][0]["file"]) as png:
        assert "Mask mode: Inpaint not masked" in png.text["parameters"]


def test_a_bare_sketch_and_its_mask_in_a_hot_folder_are_one_job(spool: Spool, tmp_path: Path) -> None:
    photo = _photo()
    spool.drop("sketches/cat.mask.png", _png(_mask(), tmp_path / "b.png"))
    spool.drop("sketches/cat.png", _png(photo, tmp_path / "a.png"))
    with start_daemon_thread(spool):
        [manifest] = wait_for(spool.manifests, what="the manifest")
    assert manifest["source"] == "sketches/cat.png"
    assert manifest["mask"]["file"] == "sketches/cat.mask.png"
    with Image.open(spool.outbox / manifest["outputs"][0]["file"]) as png:
        assert "Mask blur: 4" in png.text["parameters"]
    out = _pixels(spool, manifest)
    blurred_edge = 3 * 4  # the default mask_blur of 4 px blends a band around the square
    left, top, right, bottom = BOX
    far = np.ones((64, 64), dtype=bool)
    far[top - blurred_edge : bottom + blurred_edge + 1, left - blurred_edge : right + blurred_edge + 1] = False
    assert np.abs(out - np.asarray(photo, dtype=np.int16))[far].max() <= 1
    assert spool.failures() == []


def test_a_mask_alone_or_of_the_wrong_size_fails_with_its_reason(spool: Spool, tmp_path: Path) -> None:
    spool.drop("orphan.mask.png", _png(_mask(), tmp_path / "a.png"))
    spool.drop("small.png", _png(_photo(), tmp_path / "b.png"))
    spool.drop("small.mask.png", _png(_mask((32, 32)), tmp_path / "c.png"))
    spool.drop("small.yaml", "task: img2img\nprompt: a cat\n")
    with start_daemon_thread(spool):
        reports = wait_for(lambda: len(spool.reports()) == 2 and spool.reports(), what="two reports")
    by_field = {r.get("field"): r for r in reports}
    assert "a mask with no image" in by_field[None]["error"]
    assert by_field[None]["code"] == "no_job_for_image"
    assert "32x32 but its image 'small.png' is 64x64" in by_field["mask"]["error"]
    assert sorted(p.name for p in spool.failed.glob("*.png")) == ["orphan.mask.png", "small.mask.png", "small.png"]


def test_pairing_keeps_a_mask_with_its_image_and_waits_for_one_being_written() -> None:
    pairing = Pairing(
        parse=lambda _p: [], profiles={"sketches": {"task": "img2img"}}, has_sketch_job=False, pair_wait_s=1.0
    )
    present = {"sketches/a.png", "sketches/a.mask.png"}
    stamp = lambda _p: None  # noqa: E731
    assert pairing.decide(["sketches/a.png"], present, 0.0, stamp) == []  # the mask is not stable yet
    assert pairing.decide(["sketches/a.png"], present, 1.5, stamp) == []  # still waited for
    [intent] = pairing.decide(["sketches/a.png", "sketches/a.mask.png"], present, 1.6, stamp)
    assert intent.files == ("sketches/a.png", "sketches/a.mask.png") and intent.problem is None
    assert Rules is not None


def test_submit_carries_a_sketch_and_its_mask_under_the_new_stem(spool: Spool, tmp_path: Path) -> None:
    """`submit` renames a same-stem sketch when the inbox has its name: its mask follows it; a mask beside a
    named image keeps its image's name."""
    from tests.test_cli import cli

    outside = tmp_path / "outside"
    outside.mkdir()
    _photo().save(outside / "room.png")
    _mask().save(outside / "room.mask.png")
    (outside / "room.yaml").write_text("task: img2img\nprompt: a sofa\n")
    _photo().save(outside / "garden-photo.png")
    _mask().save(outside / "garden-photo.mask.png")
    (outside / "garden.yaml").write_text("task: img2img\nprompt: a pond\nimage: garden-photo.png\n")
    spool.drop("room.yaml", "prompt: already here\n")  # takes the name: the submitted one gets a stem of its own
    for job in ("room.yaml", "garden.yaml"):
        assert cli("submit", str(outside / job), "--config", str(spool.config_path)).returncode == 0
    names = sorted(p.name for p in spool.inbox.iterdir())
    [renamed] = [n for n in names if n.startswith("room-") and n.endswith(".yaml")]
    stem = renamed.removesuffix(".yaml")
    assert f"{stem}.png" in names and f"{stem}.mask.png" in names
    assert "garden-photo.png" in names and "garden-photo.mask.png" in names


def test_pairing_finds_a_mask_whatever_the_case_of_its_name() -> None:
    pairing = Pairing(parse=lambda _p: [], profiles={"s": {"task": "img2img"}}, has_sketch_job=False, pair_wait_s=1.0)
    files = ["s/X.PNG", "s/X.MASK.PNG"]
    assert pairing.decide(files, set(files), 0.0, lambda _p: None) == []  # a bare image waits for a job file
    [intent] = pairing.decide(files, set(files), 1.5, lambda _p: None)
    assert intent.files == ("s/X.PNG", "s/X.MASK.PNG")


def test_an_all_black_mask_is_refused_not_run(spool: Spool, tmp_path: Path) -> None:
    spool.drop("dark.png", _png(_photo(), tmp_path / "a.png"))
    spool.drop("dark.mask.png", _png(Image.new("L", (64, 64), 0), tmp_path / "b.png"))
    spool.drop("dark.yaml", "task: img2img\nprompt: a cat\ninpaint_full_res: true\n")
    with start_daemon_thread(spool):
        [report] = wait_for(spool.reports, what="the report")
    assert report["field"] == "mask" and "all black" in report["error"]


def test_an_inpainting_model_keeps_each_input_of_a_shared_call_and_the_dtype_of_its_weights(
    test_models: Any, inpaint_model: Path, tmp_path: Path
) -> None:
    """Jobs without masks on an inpainting model share a call: each is redrawn from its own input, as alone.
    A bf16 model stays bf16 after a job on an inpaint pipeline built over its weights."""
    import torch

    from diffusiond.pipeline.families import ModelEntry, ModelKind
    from diffusiond.pipeline.generate import DiffusersGenerator
    from diffusiond.pipeline.inputs import probe_image
    from diffusiond.pipeline.job import Job, fill_seed, validate_job
    from diffusiond.pipeline.models import ModelCache

    entries = {
        "inpaint": ModelEntry("inpaint", inpaint_model, ModelKind.SD1_INPAINT),
        "test": ModelEntry("test", test_models.sd, ModelKind.SD1),
    }
    rules = Rules(models={n: e.kind for n, e in entries.items()}, defaults={})
    inputs = []
    for number, seed in enumerate((1, 2)):
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            tmp_path / f"{number}.png"
        )
        inputs.append(probe_image(tmp_path / f"{number}.png", label=f"{number}.png", max_file_bytes=1 << 20))
    document = {"task": "img2img", "model": "inpaint", "steps": 2, "strength": 0.5, "seed": 3, "prompt": "a cat"}
    spec = fill_seed(validate_job(document, path="j.yaml", index=1, rules=rules))
    jobs = [Job(f"j{n}", "j.yaml", 1, spec, image) for n, image in enumerate(inputs)]
    assert jobs[0].spec.batch_key((64, 64)) == jobs[1].spec.batch_key((64, 64))
    generator = DiffusersGenerator(ModelCache(entries, device="cpu", dtype=torch.float32))
    together = [made.images[0].tobytes() for made in generator.generate(jobs)]
    alone = [generator.generate([job])[0].images[0].tobytes() for job in jobs]
    assert together[0] != together[1]
    assert np.abs(np.frombuffer(together[0], np.uint8).astype(int) - np.frombuffer(alone[0], np.uint8)).max() <= 2

    cache = ModelCache(entries, device="cpu", dtype=torch.bfloat16)
    (tmp_path / "m.png").write_bytes(_png(_mask(), tmp_path / "m2.png"))
    mask = probe_image(tmp_path / "m.png", label="m.png", max_file_bytes=1 << 20, field="mask")
    masked = fill_seed(validate_job(document | {"model": "test", "mask": "m.png"}, path="j.yaml", index=1, rules=rules))
    DiffusersGenerator(cache).generate([Job("k", "j.yaml", 1, masked, inputs[0], mask)])
    plain = cache.pipeline("test", masked.task).pipe
    assert {plain.unet.dtype, plain.vae.dtype, plain.text_encoder.dtype} == {torch.bfloat16}
