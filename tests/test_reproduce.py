"""The `reproduce:` folder: an image runs again with the parameters it carries (ours, or AUTOMATIC1111's)."""

from __future__ import annotations

import io
import shutil

from PIL import Image, PngImagePlugin

from diffusiond.pipeline.standin import StandInGenerator
from tests.conftest import Spool, start_daemon_thread, wait_for, write_config


def a1111_png(parameters: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 90, 200)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def test_an_image_dropped_in_reproduce_is_made_again_the_same(spool: Spool, test_models) -> None:
    """Through real diffusers: our own image back in, the same pixels out."""
    write_config(spool.root, test_models, reproduce="reproduce")
    with start_daemon_thread(spool):
        spool.drop("lamp.yaml", "prompt: a lamp by the sea\nnegative_prompt: blurry\nseed: 7\ncount: 2\nsteps: 3\n")
        [first] = wait_for(spool.manifests, what="the original")
        second_image = spool.outbox / first["outputs"][1]["file"]  # seed 8
        (spool.inbox / "reproduce").mkdir()
        shutil.copy(second_image, spool.inbox / "reproduce" / ".again.part")
        (spool.inbox / "reproduce" / ".again.part").rename(spool.inbox / "reproduce" / "again.png")
        manifests = wait_for(lambda: len(spool.manifests()) == 2 and spool.manifests(), what="the reproduction")
    [again] = [m for m in manifests if m["source"] == "reproduce/again.png"]
    assert again["job"]["prompt"] == "a lamp by the sea" and again["job"]["negative_prompt"] == "blurry"
    assert again["seeds"] == [8] and again["job"]["steps"] == 3 and again["job"]["count"] == 1
    with Image.open(second_image) as original, Image.open(spool.outbox / again["outputs"][0]["file"]) as made:
        assert made.tobytes() == original.tobytes(), "same model, seed and steps: the same image"
    assert (spool.archive / "again.png").exists()


def test_automatic1111_parameters_map_to_a_job_and_the_model_is_found_by_its_hash(spool: Spool, test_models) -> None:
    from diffusiond.pipeline.hashing import model_hash

    write_config(spool.root, test_models, reproduce="reproduce")
    config = spool.config
    digest = model_hash(config.model_entries()["test"], config.state)
    with start_daemon_thread(spool, StandInGenerator()):
        _drop_and_check(spool, digest)


def _drop_and_check(spool: Spool, digest: str) -> None:
    spool.drop(
        "reproduce/fox.png",
        a1111_png(
            "a red fox, snow\nNegative prompt: blurry, lowres\nSteps: 3, Sampler: Euler a, Schedule type: Uniform, "
            f'CFG scale: 6.5, Seed: 42, Size: 64x64, Model hash: {digest}, Model: "renamed: v1", Version: v1.10.1'
        ),
    )
    spool.drop(
        "reproduce/other.png", a1111_png("x\nSteps: 2, Seed: 1, Size: 64x64, Model hash: 0123456789, Model: sdxl")
    )
    spool.drop("reproduce/plain.png", _plain_png())
    [manifest] = wait_for(spool.manifests, what="the fox")
    job = manifest["job"]
    assert (job["prompt"], job["negative_prompt"]) == ("a red fox, snow", "blurry, lowres")
    assert (job["steps"], job["guidance"], job["seed"], job["size"], job["scheduler"]) == (
        3,
        6.5,
        42,
        [64, 64],
        "euler_a",
    )
    assert job["model"] == "test", "mapped by the model hash"
    reports = wait_for(lambda: len(spool.reports()) == 2 and spool.reports(), what="two refusals")
    by_file = {r["file"]: r for r in reports}
    assert (
        "no configured model matches the image's model (name 'sdxl' or hash 0123456789)"
        in by_file["reproduce/other.png"]["error"]
    )
    assert "carries no diffusiond record and no AUTOMATIC1111 parameters" in by_file["reproduce/plain.png"]["error"]


def _plain_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_reproduce_folder_cannot_be_a_profile_or_a_path(spool: Spool, test_models) -> None:
    from diffusiond.daemon.config import load_config
    from diffusiond.pipeline.errors import ConfigError

    for value in ("sketches", "../elsewhere", ".hidden"):
        write_config(spool.root, test_models, reproduce=value)
        try:
            load_config(spool.config_path)
        except ConfigError as exc:
            assert exc.field == "reproduce" and "a folder name of its own" in str(exc)
        else:
            raise AssertionError(f"reproduce: {value} was taken")


def test_a1111_clip_skip_and_eta_come_back(tmp_path) -> None:
    from diffusiond.pipeline.reproduce import job_from_image

    path = tmp_path / "a.png"
    path.write_bytes(
        a1111_png("x\nSteps: 2, Sampler: DDIM, Seed: 1, Size: 64x64, Model: test, Clip skip: 2, Eta DDIM: 0.5")
    )
    job = job_from_image(path, label="reproduce/a.png", models={"test": None}, model_hashes=dict)
    assert (job["clip_skip"], job["eta"], job["scheduler"]) == (2, 0.5, "ddim")
