"""Provenance on the daemon's real outputs: what other tools read, and marks that survive re-saving."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import CEILING_S, Spool, start_daemon_thread, wait_for, write_config

TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"


def run_jobs(spool: Spool, jobs: dict[str, str], count: int) -> list[dict]:
    for name, text in jobs.items():
        spool.drop(name, text)
    with start_daemon_thread(spool):
        return wait_for(
            lambda: len(spool.manifests()) >= count and spool.manifests(), timeout_s=CEILING_S, what="manifests"
        )


def test_invisible_mark_verifies_and_survives_jpeg_75_per_inspect(spool: Spool, tmp_path: Path) -> None:
    [manifest] = run_jobs(spool, {"big.yaml": "prompt: a marked image\nsize: 512x512\nsteps: 2\nseed: 5\n"}, 1)
    mark = manifest["outputs"][0]["watermark"]["invisible"]
    assert mark["payload"] == "diffusiond" and mark["embedded"] and mark["verified"] and mark["reason"] is None
    # The random test model paints noise in the tiled mark's own band, which drowns it: the image says so
    # and carries dwtDctSvd instead (a picture with real structure keeps the tiled mark: the next tests).
    assert (mark["method"], mark["mark_id"]) == ("dwtDctSvd", None) or mark["method"] == "tiled"
    assert mark["method"] == "tiled" or "did not hold against this image's texture" in mark["fallback"]
    resaved = tmp_path / "resaved.jpg"
    Image.open(spool.outbox / manifest["outputs"][0]["file"]).convert("RGB").save(resaved, quality=75)
    result = subprocess.run(
        [sys.executable, "-m", "diffusiond.daemon.cli", "inspect", "--json", str(resaved)],
        capture_output=True,
        text=True,
        timeout=CEILING_S,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "diffusiond" in json.dumps(json.loads(result.stdout))


def test_small_images_are_recorded_as_not_marked_with_the_reason(spool: Spool) -> None:
    [manifest] = run_jobs(spool, {"small.yaml": "prompt: too small for a mark\n"}, 1)
    mark = manifest["outputs"][0]["watermark"]["invisible"]
    assert mark["embedded"] is False and mark["verified"] is False
    assert "at least 256 px" in mark["reason"]


def test_a_required_mark_fails_an_image_too_small_to_carry_it(spool: Spool, test_models) -> None:
    write_config(spool.root, test_models, watermark={"required": True}, profiles={})
    spool.drop("small.yaml", "prompt: too small\n")  # refused before it runs: its size is known
    spool.drop("up.yaml", "task: upscale\nmethod: lanczos\nscale: 2\nimage: up.png\n")  # known only after
    Image.new("RGB", (64, 64), (90, 120, 30)).save(spool.inbox / ".up.png.part", format="PNG")
    (spool.inbox / ".up.png.part").rename(spool.inbox / "up.png")
    with start_daemon_thread(spool):
        reports = wait_for(lambda: len(spool.reports()) == 2 and spool.reports(), what="two error reports")
    by_file = {r["file"]: r for r in reports}
    assert by_file["small.yaml"]["code"] == "invalid_field" and by_file["small.yaml"]["field"] == "size"
    assert by_file["up.yaml"]["code"] == "watermark_failed" and "256" in by_file["up.yaml"]["fix"]
    assert spool.visible_outputs() == [], "a failed job leaves no image behind"


def test_the_visible_label_lands_in_its_corner(spool: Spool) -> None:
    plain = "prompt: same\nseed: 8\nsize: 256x256\nsteps: 2\nwatermark: {invisible: false}\n"
    labelled = plain.replace("{invisible: false}", "{invisible: false, visible: {text: AI, position: top-left}}")
    manifests = run_jobs(spool, {"plain.yaml": plain, "labelled.yaml": labelled}, 2)
    by_source = {m["source"]: m for m in manifests}
    images = {
        k: np.asarray(Image.open(spool.outbox / m["outputs"][0]["file"]), dtype=int) for k, m in by_source.items()
    }
    changed = np.abs(images["plain.yaml"] - images["labelled.yaml"]).sum(axis=2) > 0
    assert changed[:64, :128].any(), "the label is in the top-left corner"
    assert not changed[128:, 128:].any(), "and nowhere near the opposite corner"
    assert by_source["labelled.yaml"]["outputs"][0]["watermark"]["visible"]["text"] == "AI"


def test_prompt_readers_and_exiftool_read_the_daemons_files(spool: Spool) -> None:
    from sd_parsers import ParserManager

    jobs = {
        "png.yaml": "prompt: a red fox\nnegative_prompt: blurry\nseed: 11\nsteps: 3\nscheduler: euler_a\n",
        "jpg.yaml": "prompt: a blue fox\nseed: 12\nsteps: 3\noutput: {format: jpeg}\n",
    }
    manifests = {m["source"]: m for m in run_jobs(spool, jobs, 2)}
    png = spool.outbox / manifests["png.yaml"]["outputs"][0]["file"]
    info = ParserManager().parse(Image.open(png))
    assert info.full_prompt == "a red fox" and info.full_negative_prompt == "blurry"
    sampler = next(iter(info.samplers))
    assert sampler.name == "Euler a" and sampler.parameters["seed"] == "11" and sampler.parameters["steps"] == "3"
    if shutil.which("exiftool") is None:
        pytest.skip("exiftool is not installed (apt-get install libimage-exiftool-perl); .ci/run installs it")
    for manifest in manifests.values():
        path = spool.outbox / manifest["outputs"][0]["file"]
        tags = json.loads(subprocess.run(["exiftool", "-j", "-a", str(path)], capture_output=True, text=True).stdout)[0]
        assert tags["DigitalSourceType"] == TRAINED
        assert tags["CreatorTool"].startswith("diffusiond")


def test_image_bytes_differ_only_by_what_was_asked(spool: Spool, test_models) -> None:
    """Turning the metadata parts off leaves a plain image that carries none of them."""
    write_config(spool.root, test_models, metadata={"parameters": False, "record": False, "xmp": False, "exif": False})
    [manifest] = run_jobs(spool, {"bare.yaml": "prompt: nothing embedded\n"}, 1)
    with Image.open(spool.outbox / manifest["outputs"][0]["file"]) as image:
        assert not {"parameters", "diffusiond", "XML:com.adobe.xmp"} & set(image.info)


def test_the_schema_knows_the_marks_limits() -> None:
    """job.py owns the limits that validation checks (watermark.py imports them): they are the mark's real ones."""
    from diffusiond.pipeline import job, watermark, watermark_tiled

    # The tiled mark is made on a frame of 256 px on the shorter side: a smaller image would only blur it
    # (invisible-watermark 0.2.0 refused images under 256 x 256 for its methods too).
    assert job.WATERMARK_MIN_SIDE_PX == watermark_tiled.GRID_PX == watermark.MIN_SIDE_PX
    assert len(watermark.frame_bits("x" * job.WATERMARK_PAYLOAD_MAX_BYTES)) == watermark.FRAME_BITS
    with pytest.raises(ValueError, match="at most 10"):
        watermark.frame_bits("x" * (job.WATERMARK_PAYLOAD_MAX_BYTES + 1))


def test_c2pa_signed_outputs_carry_a_valid_created_action(spool: Spool, test_models, tmp_path: Path) -> None:
    pytest.importorskip("c2pa", reason="c2pa-python is not installed (the optional `c2pa` extra)")
    from tests.test_c2pa import make_chain

    chain, key, _root = make_chain(tmp_path / "c2pa")
    write_config(spool.root, test_models, metadata={"c2pa": {"cert_chain": str(chain), "private_key": str(key)}})
    [manifest] = run_jobs(spool, {"signed.yaml": "prompt: signed\nseed: 3\n"}, 1)
    path = spool.outbox / manifest["outputs"][0]["file"]
    result = subprocess.run(
        [sys.executable, "-m", "diffusiond.daemon.cli", "inspect", "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=CEILING_S,
    )
    [report] = json.loads(result.stdout)
    assert report["c2pa"]["state"] == "Valid" and report["c2pa"]["failures"] == ["signingCredential.untrusted"]
    assert report["c2pa"]["action"] == "c2pa.created"
    assert report["c2pa"]["digital_source_type"] == TRAINED
    assert report["parsed"]["settings"]["Seed"] == "3", "metadata written before signing is still there"


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_a_mark_lost_by_lossy_encoding_is_reported_not_claimed(spool: Spool, fmt: str) -> None:
    """dwtDctSvd does not survive quality 20; the manifest and the record inside the file both say so."""
    from diffusiond.pipeline.metadata import read_record

    job = (
        "prompt: crushed\nsize: 512x512\nsteps: 2\nseed: 5\n"
        f"output: {{format: {fmt}, quality: 20}}\nwatermark: {{invisible: {{method: dwtDctSvd}}}}\n"
    )
    [manifest] = run_jobs(spool, {"crushed.yaml": job}, 1)
    mark = manifest["outputs"][0]["watermark"]["invisible"]
    assert mark["method"] == "dwtDctSvd" and mark["embedded"] is True and mark["verified"] is False, mark
    assert f"did not survive encoding as {fmt}" in mark["reason"]
    with Image.open(spool.outbox / manifest["outputs"][0]["file"]) as image:
        embedded = read_record(image)
    assert embedded is not None and embedded["watermark"]["invisible"] == mark


def test_a_stripped_resized_copy_is_tied_to_its_credentials_by_the_mark(
    spool: Spool, test_models, tmp_path: Path
) -> None:
    """What a social site does (half size, JPEG 75, every metadata chunk gone): inspect still finds the job
    and the C2PA credentials through the tiled mark, whose id the credentials' soft binding records."""
    pytest.importorskip("c2pa", reason="c2pa-python is not installed (the optional `c2pa` extra)")
    from diffusiond.pipeline.c2pa_sign import SOFT_BINDING_ALG, read_manifest, soft_binding_value, soft_bindings
    from tests.test_c2pa import make_chain
    from tests.test_watermark import detailed_image

    chain, key, _root = make_chain(tmp_path / "c2pa")
    write_config(spool.root, test_models, metadata={"c2pa": {"cert_chain": str(chain), "private_key": str(key)}})
    picture = tmp_path / "up.png"
    detailed_image(256, seed=11).save(picture)  # a picture with structure (the test model paints noise)
    (spool.inbox / ".up.png.part").write_bytes(picture.read_bytes())
    (spool.inbox / ".up.png.part").rename(spool.inbox / "up.png")
    [manifest] = run_jobs(spool, {"up.yaml": "task: upscale\nmethod: lanczos\nscale: 2\nimage: up.png\n"}, 1)
    output = manifest["outputs"][0]
    mark = output["watermark"]["invisible"]
    assert (mark["method"], mark["embedded"], mark["verified"]) == ("tiled", True, True), mark
    original = spool.outbox / output["file"]
    credentials = read_manifest(original.read_bytes(), "png")
    assert credentials is not None and credentials["validation_state"] == "Valid"
    [binding] = soft_bindings(credentials)
    assert binding["alg"] == SOFT_BINDING_ALG.format(method="tiled") and binding["value"] == soft_binding_value(mark)

    stripped = tmp_path / "posted.jpg"
    with Image.open(original) as image:
        image.convert("RGB").resize((256, 256), Image.Resampling.LANCZOS).save(stripped, quality=75)
    with Image.open(stripped) as posted:
        assert not set(posted.info) & {"exif", "xmp", "parameters", "diffusiond"}
    inspect = [sys.executable, "-m", "diffusiond.daemon.cli", "inspect", str(stripped), "--credentials"]
    result = subprocess.run([*inspect, str(spool.outbox), "--json"], capture_output=True, text=True, timeout=CEILING_S)
    assert result.returncode == 0, result.stdout + result.stderr
    [report] = json.loads(result.stdout)
    assert report["metadata"] is False and report["c2pa"] is None
    assert report["watermark"]["tiled"]["mark_id"] == mark["mark_id"]
    [match] = report["credentials"]
    assert match["job_id"] == manifest["job_id"] and match["present"] is True
    assert match["c2pa"]["state"] == "Valid" and match["c2pa"]["soft_binding"] is True
    assert match["c2pa"]["signer"] == "diffusiond test signer"
    text = subprocess.run([*inspect, str(spool.outbox)], capture_output=True, text=True, timeout=CEILING_S).stdout
    assert f"made by diffusiond: job {manifest['job_id']}" in text
    assert "credentials: C2PA Valid, signed by diffusiond test signer; their soft binding names this mark" in text
