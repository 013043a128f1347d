"""Jobs through a real running daemon: inbox → claim → pipeline → outbox, archive and failed."""

from __future__ import annotations

import hashlib
import io
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from diffusiond.pipeline.metadata import read_parameters
from diffusiond.pipeline.standin import Gate, StandInGenerator
from tests.conftest import CEILING_S, Spool, start_daemon_thread, wait_for


def sketch_png(color: tuple[int, int, int] = (200, 60, 40), size: tuple[int, int] = (64, 64)) -> bytes:
    image = Image.new("RGB", size, (240, 240, 230))
    image.paste(color, (16, 16, 48, 48))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def done(spool: Spool, jobs: int) -> list[dict]:
    return wait_for(lambda: len(spool.manifests()) >= jobs and spool.manifests(), what=f"{jobs} manifests")


def test_txt2img_writes_images_with_metadata_and_a_manifest_then_archives(spool: Spool, daemon) -> None:
    spool.drop("hamster.yaml", "prompt: a hamster painting\nnegative_prompt: blurry\nseed: 42\ncount: 2\n")
    [manifest] = done(spool, 1)
    assert manifest["source"] == "hamster.yaml"
    assert manifest["seeds"] == [42, 43]
    assert [o["seed"] for o in manifest["outputs"]] == [42, 43]
    for output in manifest["outputs"]:
        path = spool.outbox / output["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == output["sha256"]
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (64, 64)
        parameters = read_parameters(str(path))
        assert parameters.splitlines()[0] == "a hamster painting"
        assert parameters.splitlines()[1] == "Negative prompt: blurry"
        assert f"Seed: {output['seed']}" in parameters and "Steps: 4" in parameters
    wait_for(lambda: (spool.archive / "hamster.yaml").exists(), what="archived job file")
    assert not (spool.inbox / "hamster.yaml").exists()
    wait_for(lambda: spool.claims() == [], what="the claim folder removed")


def test_same_seed_gives_the_same_image(spool: Spool, daemon) -> None:
    spool.drop("a.yaml", "prompt: same\nseed: 7\n")
    spool.drop("b.yaml", "prompt: same\nseed: 7\n")
    manifests = done(spool, 2)
    for manifest in manifests:  # the manifest's hash is the file's (the bytes differ: each names its own job)
        output = manifest["outputs"][0]
        assert output["sha256"] == hashlib.sha256((spool.outbox / output["file"]).read_bytes()).hexdigest()
    pixels = [Image.open(spool.outbox / m["outputs"][0]["file"]).tobytes() for m in manifests]
    assert pixels[0] == pixels[1]


def test_missing_seed_is_chosen_and_recorded(spool: Spool, daemon) -> None:
    spool.drop("noseed.yaml", "prompt: anything\n")
    [manifest] = done(spool, 1)
    assert isinstance(manifest["job"]["seed"], int)
    assert manifest["seeds"] == [manifest["job"]["seed"]]


def test_several_jobs_in_one_file_img2img_and_both_upscalers(spool: Spool, daemon) -> None:
    spool.drop("bird.png", sketch_png())
    spool.drop(
        "bird.yaml",
        "task: img2img\nimage: bird.png\nprompt: a bird\nstrength: 0.8\n---\n"
        "task: upscale\nimage: bird.png\nmethod: sd-x4\nprompt: sharp\nsteps: 3\n---\n"
        "task: upscale\nimage: bird.png\nmethod: lanczos\nscale: 2\noutput: {format: jpeg, quality: 90}\n",
    )
    manifests = sorted(done(spool, 3), key=lambda m: m["index"])
    assert [m["task"] for m in manifests] == ["img2img", "upscale", "upscale"]
    sizes = [Image.open(spool.outbox / m["outputs"][0]["file"]).size for m in manifests]
    assert sizes == [(64, 64), (256, 256), (128, 128)]
    assert Image.open(spool.outbox / manifests[2]["outputs"][0]["file"]).format == "JPEG"
    assert manifests[0]["input_image"]["sha256"] == hashlib.sha256(sketch_png()).hexdigest()
    assert len({m["job_id"] for m in manifests}) == 3
    wait_for(lambda: sorted(p.name for p in spool.archive.iterdir()) == ["bird.png", "bird.yaml"], what="archive")


@pytest.mark.parametrize("image_first", [True, False], ids=["image-first", "yaml-first"])
def test_sketch_pairs_with_its_same_stem_yaml_in_either_order(spool: Spool, daemon, image_first: bool) -> None:
    drops = [
        ("fox.png", sketch_png((20, 90, 200))),
        ("fox.yaml", "task: img2img\nprompt: a fox\noutput: {format: webp}\n"),
    ]
    for name, data in drops if image_first else drops[::-1]:
        spool.drop(name, data)
        time.sleep(0.5)  # longer than settle_s: the first file is stable before the second comes
    [manifest] = done(spool, 1)
    assert manifest["input_image"]["file"] == "fox.png"
    assert manifest["outputs"][0]["file"].endswith(".webp")
    assert "Denoising strength: 0.75" in read_parameters(str(spool.outbox / manifest["outputs"][0]["file"]))
    assert spool.reports() == []


def test_bare_image_in_a_profile_folder_runs_the_profile_job(spool: Spool, daemon) -> None:
    spool.drop("sketches/cat.png", sketch_png())
    [manifest] = done(spool, 1)
    assert manifest["task"] == "img2img" and manifest["job"]["prompt"] == "a watercolor"
    assert manifest["source"] == "sketches/cat.png"
    wait_for(lambda: (spool.archive / "cat.png").exists(), what="archived sketch")


def test_file_written_slowly_in_place_is_read_only_when_complete(spool: Spool, daemon) -> None:
    text = "prompt: written slowly, one piece at a time\nseed: 5\ncount: 2\n"
    path = spool.inbox / "slow.yaml"
    with open(path, "w") as handle:
        for start in range(0, len(text), 8):
            handle.write(text[start : start + 8])
            handle.flush()
            time.sleep(0.1)  # pauses shorter than settle_s (0.3 s)
    [manifest] = done(spool, 1)
    assert manifest["job"]["prompt"] == "written slowly, one piece at a time"
    assert manifest["seeds"] == [5, 6]
    assert spool.reports() == []


def test_temp_and_os_files_are_left_alone(spool: Spool, daemon) -> None:
    ignored = [".hidden.yaml", "job.yaml.part", "job.yaml.tmp", ".DS_Store", "~syncthing~x.yaml.tmp", "notes.txt"]
    for name in ignored:
        (spool.inbox / name).write_text("prompt: never run\n")
    spool.drop("real.yaml", "prompt: run me\n")
    done(spool, 1)
    time.sleep(2.5)  # past settle and pair wait: nothing else may have been claimed
    assert sorted(p.name for p in spool.inbox.iterdir() if p.is_file()) == sorted(ignored)
    assert len(spool.manifests()) == 1 and spool.reports() == []


BAD_INPUTS = {
    "bad-yaml": ("prompt: [unclosed\n", "yaml_syntax", None, "not valid YAML at line 2"),
    "unknown-field": ("promt: typo\n", "invalid_field", "promt", "did you mean 'prompt'"),
    "bad-value": ("prompt: x\nsize: 63x64\n", "invalid_field", "size", "multiples of 8"),
    "unknown-model": ("prompt: x\nmodel: sdxl\n", "invalid_field", "model", "known: test, test-x4"),
    "escapes": ("task: img2img\nimage: ../../etc/passwd.png\nprompt: x\n", "path_escapes", "image", "leaves the inbox"),
    "missing-image": ("task: img2img\nimage: nothere.png\nprompt: x\n", "missing_input", "image", "did not arrive"),
    "over-limit": ("prompt: x\nsteps: 1000\n", "over_limit", "steps", "limit of 150"),
    "second-job-bad": ("prompt: fine\n---\nprompt: x\nguidance: lots\n", "invalid_field", "guidance", "valid number"),
    # PyYAML raises a bare ValueError for these: it stopped the daemon, at every start, before.
    "no-such-date": ("prompt: x\nseed: 2001-02-30\n", "yaml_syntax", None, "day is out of range for month"),
    "huge-number": ("prompt: x\nseed: 0x" + "f" * 6000 + "\n", "invalid_field", "seed", "an integer of 24000 bits"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_job_file_lands_in_failed_with_a_report_and_the_daemon_goes_on(spool: Spool, daemon, case: str) -> None:
    text, code, field, says = BAD_INPUTS[case]
    spool.drop(f"{case}.yaml", text)
    [report] = wait_for(spool.reports, what="error report")
    assert report["code"] == code
    assert report["file"] == f"{case}.yaml"
    assert report.get("field") == field
    assert says in report["error"]
    assert report["fix"]
    assert (spool.failed / f"{case}.yaml").read_text() == text
    assert not (spool.inbox / f"{case}.yaml").exists()
    if case == "second-job-bad":
        assert report["job"] == 2
    assert spool.manifests() == []  # a file with one wrong job runs none of its jobs
    spool.drop("after.yaml", "prompt: the daemon still runs\n")
    done(spool, 1)


def test_a_wrong_file_fails_at_once_while_a_long_job_runs(spool: Spool, test_models) -> None:
    gate = Gate(prompt="slow")  # the stand-in holds the slow job at its first step until released
    with start_daemon_thread(spool, StandInGenerator(gate=gate)) as daemon:
        spool.drop("slow.yaml", "prompt: slow\nsize: 128x128\nsteps: 60\nseed: 9\n")
        assert gate.held.wait(CEILING_S), "the slow job started"
        spool.drop("bad.yaml", "prompt: x\nsteps: 0\n")
        [report] = wait_for(spool.reports, what="the bad file's report")
        assert report["file"] == "bad.yaml" and report["field"] == "steps"
        assert spool.manifests() == [], "the bad file was rejected while the slow job still ran, not after it"
        assert daemon.board.snapshot()["running"][0]["source"] == "slow.yaml"
        gate.release()
        [manifest] = wait_for(spool.manifests, what="the slow job's manifest")
    assert manifest["source"] == "slow.yaml"


def test_a_flood_of_files_is_worked_through_in_windows(spool: Spool, standin_daemon) -> None:
    count = 600  # more than the claim window (64) many times over: wrong files, so they fail at once
    staging = spool.root / "staging"
    staging.mkdir()
    for i in range(count):
        (staging / f"bad{i:03d}.yaml").write_text(f"prompt: number {i}\nsteps: 0\n")
    for i in range(count):
        os.rename(staging / f"bad{i:03d}.yaml", spool.inbox / f"bad{i:03d}.yaml")
    spool.drop("good.yaml", "prompt: the last one\n")
    wait_for(
        lambda: len(list(spool.failed.glob("*.error.yaml"))) == count, timeout_s=CEILING_S, what=f"{count} reports"
    )
    [manifest] = done(spool, 1)
    assert manifest["source"] == "good.yaml"
    assert sorted(p.name for p in spool.failed.glob("*.yaml") if not p.name.endswith(".error.yaml")) == [
        f"bad{i:03d}.yaml" for i in range(count)
    ]
    wait_for(lambda: list(spool.inbox.iterdir()) == [], what="an empty inbox")


def test_non_image_with_an_image_extension_fails_cleanly(spool: Spool, daemon) -> None:
    spool.drop("fake.png", b"this is not a PNG at all")
    spool.drop("fake.yaml", "task: img2img\nprompt: x\n")
    [report] = wait_for(spool.reports, what="error report")
    assert report["code"] == "bad_image" and report["field"] == "image"
    assert (report["file"], report["value"]) == ("fake.yaml", "fake.png") and "'fake.png'" in report["error"]
    assert sorted(report["inputs"]) == ["fake.png", "fake.yaml"]
    assert (spool.failed / "fake.png").exists() and (spool.failed / "fake.yaml").exists()


def test_bare_image_without_job_or_profile_fails_with_a_reason(spool: Spool, daemon) -> None:
    spool.drop("lonely.png", sketch_png())
    [report] = wait_for(spool.reports, what="error report")
    assert report["code"] == "no_job_for_image"
    assert "lonely.yaml" in report["fix"]
    assert (spool.failed / "lonely.png").exists()
    assert (spool.failed / "lonely.error.yaml").exists()


def test_a_job_file_deleted_while_it_waits_is_forgotten(spool: Spool, daemon) -> None:
    """The watcher asks for no deletion events; the daemon still notices a file taken back."""
    job = spool.drop("cat.yaml", "task: img2img\nprompt: a cat\n")  # waits up to pair_wait_s for cat.png
    time.sleep(0.5)  # seen, and waiting for its image
    job.unlink()
    spool.drop("cat.png", sketch_png())  # now a bare image: no job file came with it
    [report] = wait_for(spool.reports, what="error report")
    assert report["code"] == "no_job_for_image"
    assert sorted(p.name for p in spool.failed.iterdir()) == ["cat.error.yaml", "cat.png"]
    assert spool.manifests() == []


def test_symlink_in_the_inbox_is_not_followed(spool: Spool, daemon, tmp_path: Path) -> None:
    secret = tmp_path / "secret.png"
    secret.write_bytes(sketch_png())
    os.symlink(secret, spool.inbox / "link.png")
    spool.drop("link.yaml", "task: img2img\nprompt: x\n")
    [report] = wait_for(spool.reports, what="error report")
    assert report["code"] in ("missing_input", "bad_image")
    assert secret.exists() and spool.manifests() == []


def test_same_name_dropped_twice_keeps_both_results_and_both_inputs(spool: Spool, daemon) -> None:
    spool.drop("again.yaml", "prompt: first\n")
    done(spool, 1)
    wait_for(lambda: (spool.archive / "again.yaml").exists(), what="first archived")
    spool.drop("again.yaml", "prompt: second\n")
    manifests = done(spool, 2)
    assert sorted(m["job"]["prompt"] for m in manifests) == ["first", "second"]
    wait_for(lambda: (spool.archive / "again-2.yaml").exists(), what="second archived beside the first")


def test_same_stem_image_travels_with_a_job_that_does_not_use_it(spool: Spool, daemon) -> None:
    spool.drop("poster.png", sketch_png())
    spool.drop("poster.yaml", "prompt: text only\n")
    [manifest] = done(spool, 1)
    assert manifest["input_image"] is None
    wait_for(lambda: sorted(p.name for p in spool.archive.iterdir()) == ["poster.png", "poster.yaml"], what="archive")
    time.sleep(2.5)  # past pair_wait_s: the image was not left behind as a bare image
    assert spool.reports() == []
