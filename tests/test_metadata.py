"""Metadata in real files: the A1111 infotext, the JSON record, XMP and EXIF, read back by other tools.

Each image is encoded by the real encoders (Pillow), written to disk and read by
independent readers: sd-parsers (AUTOMATIC1111 parameters) and exiftool (XMP,
EXIF). No model is needed.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image

from diffusiond import __version__
from diffusiond.daemon.cli import main
from diffusiond.pipeline import inspect as inspect_module
from diffusiond.pipeline.inspect import inspect_image
from diffusiond.pipeline.job import Img2ImgJob, OutputSpec, Spec, Txt2ImgJob, UpscaleJob
from diffusiond.pipeline.metadata import (
    COMPOSITE,
    ENHANCED,
    TRAINED,
    MetadataOptions,
    a1111_sampler,
    encode,
    infotext,
    parse_infotext,
    read_parameters,
    read_record,
    read_xmp,
    sidecar_files,
)
from tests.conftest import CEILING_S

FORMATS = ("png", "jpeg", "webp")
SUFFIX = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
XMP_NS = {
    "x": "adobe:ns:meta/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "dc": "http://purl.org/dc/elements/1.1/",
    "xmp": "http://ns.adobe.com/xap/1.0/",
    "Iptc4xmpExt": "http://iptc.org/std/Iptc4xmpExt/2008-02-29/",
}
needs_exiftool = pytest.mark.skipif(
    shutil.which("exiftool") is None,
    reason="exiftool is not installed (Debian: apt-get install -y libimage-exiftool-perl)",
)


def hamster(**fields: Any) -> Txt2ImgJob:
    values: dict[str, Any] = {
        "prompt": "a hamster painting with a brush",
        "negative_prompt": "blurry, extra legs",
        "model": "sd15",
        "size": "64x64",
        "steps": 30,
        "guidance": 7.5,
        "scheduler": "dpmpp_2m_karras",
        "seed": 1234,
    }
    return Txt2ImgJob(**(values | fields))


def sketch() -> Img2ImgJob:
    return Img2ImgJob(
        task="img2img", prompt="a bird on a branch", model="sd15", steps=20, strength=0.8, seed=7, image="bird.png"
    )


def text_for(spec: Spec, seed: int = 1234, sampler: str | None = None) -> str:
    return infotext(
        spec,
        seed=seed,
        size=(64, 64),
        model_name=spec.model,
        sampler=sampler or spec.scheduler or "PNDMScheduler",
        model_hash="0123abcd",
    )


def record_for(spec: Spec, seed: int = 1234) -> dict[str, Any]:
    return {"job_id": "hamster-1", "source": "hamster.yaml", "index": 1, "job": spec.model_dump(mode="json")} | {
        "seed": seed
    }


def write(
    tmp_path: Path,
    fmt: str,
    spec: Spec | None = None,
    *,
    options: MetadataOptions | None = None,
    pass_spec: bool = True,
    record: dict[str, Any] | None = None,
    name: str = "out",
) -> tuple[Path, str, dict[str, Any]]:
    spec = spec or hamster()
    text = text_for(spec)
    record = record if record is not None else record_for(spec)
    image = Image.new("RGB", (64, 64), (200, 90, 20))
    data = encode(
        image,
        OutputSpec(format=fmt),
        parameters=text,
        record=record,
        spec=spec if pass_spec else None,
        options=options,
    )
    path = tmp_path / f"{name}{SUFFIX[fmt]}"
    path.write_bytes(data)
    return path, text, record


def xmp_of(path: Path) -> bytes | None:
    with Image.open(path) as image:
        image.load()
        xmp = image.info.get("xmp")
    return xmp.encode() if isinstance(xmp, str) else xmp


def exiftool(path: Path) -> dict[str, Any]:
    result = subprocess.run(
        ["exiftool", "-json", "-G1", "-a", "-all", "-validate", "-warning", str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=CEILING_S,
    )
    return json.loads(result.stdout)[0]


# --- The infotext ------------------------------------------------------------------------


def test_infotext_has_the_automatic1111_layout() -> None:
    assert text_for(hamster()) == (
        "a hamster painting with a brush\n"
        "Negative prompt: blurry, extra legs\n"
        "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1234, Size: 64x64, "
        f"Model hash: 0123abcd, Model: sd15, Version: diffusiond {__version__}"
    )


def test_infotext_leaves_out_an_empty_negative_prompt_and_adds_img2img_strength() -> None:
    text = text_for(sketch(), seed=7)
    assert "Negative prompt" not in text
    assert text.splitlines()[0] == "a bird on a branch"
    settings = parse_infotext(text)["settings"]
    assert settings["Denoising strength"] == "0.8"
    assert settings["Sampler"] == "PLMS"  # the model's own PNDMScheduler


def test_infotext_quotes_values_the_way_automatic1111_does() -> None:
    spec = hamster(model='my "best", model: v2\nfinal')
    text = text_for(spec)
    last = text.splitlines()[-1]
    assert 'Model: "my \\"best\\", model: v2\\nfinal"' in last
    assert "Size: 64x64," in last  # plain values stay bare
    parsed = parse_infotext(text)
    assert parsed["settings"]["Model"] == 'my "best", model: v2\nfinal'
    assert parsed["prompt"] == spec.prompt and parsed["negative_prompt"] == spec.negative_prompt


def test_a_multi_line_prompt_reads_back() -> None:
    spec = hamster(prompt="line one,\nline two: more", negative_prompt="bad\nworse")
    parsed = parse_infotext(text_for(spec))
    assert parsed["prompt"] == "line one,\nline two: more"
    assert parsed["negative_prompt"] == "bad\nworse"
    assert parsed["settings"]["Seed"] == "1234"


@pytest.mark.parametrize(
    ("name", "sampler", "schedule"),
    [
        ("euler_a", "Euler a", "Uniform"),
        ("euler", "Euler", "Uniform"),
        ("dpmpp_2m", "DPM++ 2M", "Uniform"),
        ("dpmpp_2m_karras", "DPM++ 2M", "Karras"),
        ("dpmpp_sde", "DPM++ SDE", "Uniform"),
        ("ddim", "DDIM", "Automatic"),
        ("pndm", "PLMS", "Automatic"),
        ("plms", "PLMS", "Automatic"),
        ("lms", "LMS", "Uniform"),
        ("heun", "Heun", "Uniform"),
        ("unipc", "UniPC", "Automatic"),
        ("PNDMScheduler", "PLMS", "Automatic"),
        ("EulerDiscreteScheduler", "Euler", "Uniform"),
        ("DDPMScheduler", "DDPM", "Automatic"),
        ("SomeNewScheduler", "SomeNewScheduler", None),
    ],
)
def test_scheduler_names_map_to_automatic1111_samplers(name: str, sampler: str, schedule: str | None) -> None:
    assert a1111_sampler(name) == (sampler, schedule)


def test_every_scheduler_the_job_schema_allows_has_an_automatic1111_name() -> None:
    from diffusiond.pipeline.job import SCHEDULER_NAMES

    assert all(a1111_sampler(name)[1] is not None for name in SCHEDULER_NAMES)


def test_a_lanczos_upscale_has_no_sampling_settings() -> None:
    spec = UpscaleJob(task="upscale", method="lanczos", scale=2, image="a.png")
    settings = parse_infotext(text_for(spec, sampler="lanczos"))["settings"]
    assert "Sampler" not in settings and "Steps" not in settings
    assert settings["Postprocess upscaler"] == "Lanczos" and settings["Postprocess upscale by"] == "2"


# --- Round trips through real files ------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_parameters_record_and_xmp(tmp_path: Path, fmt: str) -> None:
    path, text, record = write(tmp_path, fmt)
    assert read_parameters(path) == text
    with Image.open(path) as image:
        assert image.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt]
        assert read_record(image) == record

    root = ET.fromstring(xmp_of(path).decode("utf-8").strip("\x00"))  # well-formed, or this raises
    assert root.tag == f"{{{XMP_NS['x']}}}xmpmeta"
    description = root.find("rdf:RDF/rdf:Description", XMP_NS)
    assert description is not None
    source = description.find("Iptc4xmpExt:DigitalSourceType", XMP_NS)
    assert source is not None and source.text == TRAINED
    assert description.findtext("xmp:CreatorTool", namespaces=XMP_NS) == f"diffusiond {__version__}"
    alt = description.find("dc:description/rdf:Alt/rdf:li", XMP_NS)
    assert alt is not None and alt.text == "a hamster painting with a brush"
    assert alt.get("{http://www.w3.org/XML/1998/namespace}lang") == "x-default"


@pytest.mark.parametrize("fmt", FORMATS)
def test_sd_parsers_reads_prompt_seed_steps_cfg_and_sampler(tmp_path: Path, fmt: str) -> None:
    from sd_parsers import ParserManager

    path, _, _ = write(tmp_path, fmt)
    info = ParserManager().parse(str(path))
    assert info is not None, f"sd-parsers found no parameters in the {fmt}"
    assert info.generator.name == "AUTOMATIC1111"
    sampler = info.samplers[0]
    assert sampler.name == "DPM++ 2M"
    assert [p.value for p in sampler.prompts] == ["a hamster painting with a brush"]
    assert [p.value for p in sampler.negative_prompts] == ["blurry, extra legs"]
    assert sampler.parameters["seed"] == "1234"
    assert sampler.parameters["steps"] == "30"
    assert sampler.parameters["cfg_scale"] == "7.5"
    assert sampler.parameters["scheduler"] == "Karras"
    assert sampler.model is not None and sampler.model.name == "sd15" and sampler.model.hash == "0123abcd"


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_input_image_makes_it_a_composite(tmp_path: Path, fmt: str) -> None:
    path, _, _ = write(tmp_path, fmt, sketch())
    assert read_xmp(xmp_of(path))["digital_source_type"] == COMPOSITE


def test_the_source_type_comes_from_the_record_when_the_caller_passes_no_spec(tmp_path: Path) -> None:
    path, _, _ = write(tmp_path, "png", sketch(), pass_spec=False)  # daemon/outbox.py's call
    fields = read_xmp(xmp_of(path))
    assert fields["digital_source_type"] == COMPOSITE
    assert fields["description"] == "a bird on a branch"
    lanczos = UpscaleJob(task="upscale", method="lanczos", scale=2, image="a.png")
    path, _, _ = write(tmp_path, "png", lanczos, name="lanczos")
    assert read_xmp(xmp_of(path))["digital_source_type"] == ENHANCED


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_latin_prompts_and_xml_specials_survive(tmp_path: Path, fmt: str) -> None:
    spec = hamster(prompt='ハムスター <b>&amp; "quotes"\x07 bell', negative_prompt="ぼやけ")
    path, text, _ = write(tmp_path, fmt, spec)
    assert read_parameters(path) == text
    assert read_xmp(xmp_of(path))["description"] == 'ハムスター <b>&amp; "quotes" bell'  # BEL is not XML


# --- exiftool ----------------------------------------------------------------------------


@needs_exiftool
@pytest.mark.parametrize("fmt", FORMATS)
def test_exiftool_shows_the_digital_source_type_and_finds_nothing_invalid(tmp_path: Path, fmt: str) -> None:
    path, text, _ = write(tmp_path, fmt)
    tags = exiftool(path)
    assert tags["XMP-iptcExt:DigitalSourceType"] == TRAINED
    assert tags["XMP-xmp:CreatorTool"] == f"diffusiond {__version__}"
    assert tags["XMP-dc:Description"] == "a hamster painting with a brush"
    assert tags["ExifTool:Validate"] == "OK", tags
    if fmt == "png":
        assert tags["PNG:Parameters"] == text
    else:
        assert tags["ExifIFD:UserComment"] == text
        assert tags["IFD0:Software"] == f"diffusiond {__version__}"
        assert tags["IFD0:ImageDescription"] == "a hamster painting with a brush"
        assert tags["IFD0:Orientation"] == "Horizontal (normal)"


@needs_exiftool
def test_exiftool_shows_composite_for_img2img(tmp_path: Path) -> None:
    path, _, _ = write(tmp_path, "jpeg", sketch())
    assert exiftool(path)["XMP-iptcExt:DigitalSourceType"] == COMPOSITE


# --- Options and sidecars ----------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_part_can_be_turned_off(tmp_path: Path, fmt: str) -> None:
    path, _, _ = write(tmp_path, fmt, options=MetadataOptions(parameters=False), name="no-parameters")
    assert read_parameters(path) is None
    with Image.open(path) as image:
        assert read_record(image) is not None

    path, text, _ = write(tmp_path, fmt, options=MetadataOptions(record=False), name="no-record")
    assert read_parameters(path) == text
    with Image.open(path) as image:
        assert read_record(image) is None
        assert image.getexif().get(0x0131) == (f"diffusiond {__version__}" if fmt != "png" else None)

    path, text, record = write(tmp_path, fmt, options=MetadataOptions(xmp=False), name="no-xmp")
    assert read_parameters(path) == text
    xmp = xmp_of(path)
    if fmt == "png":
        assert xmp is None
    else:  # JPEG and WebP keep the record in XMP: a packet with the record only
        assert read_xmp(xmp)["digital_source_type"] is None
        with Image.open(path) as image:
            assert read_record(image) == record

    path, text, _ = write(tmp_path, fmt, options=MetadataOptions(exif=False), name="no-exif")
    assert read_parameters(path) == text
    with Image.open(path) as image:
        image.load()
        assert 0x0131 not in image.getexif() and "Software" not in image.info

    path, _, _ = write(
        tmp_path, fmt, options=MetadataOptions(parameters=False, record=False, xmp=False, exif=False), name="bare"
    )
    with Image.open(path) as image:
        image.load()
        assert not {"parameters", "diffusiond", "xmp", "exif", "Software"} & set(image.info)
    assert inspect_image(path)["metadata"] is False


def test_a_jpeg_leaves_out_a_record_too_big_for_its_segment(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    big = record_for(hamster()) | {"notes": "x" * 70_000}
    with caplog.at_level(logging.WARNING, logger="diffusiond.pipeline.metadata"):
        path, text, _ = write(tmp_path, "jpeg", record=big)
    assert "record_json is left out" in caplog.text
    assert read_parameters(path) == text
    with Image.open(path) as image:
        assert read_record(image) is None
    assert read_xmp(xmp_of(path))["digital_source_type"] == TRAINED
    path, _, _ = write(tmp_path, "webp", record=big)  # WebP has room
    with Image.open(path) as image:
        assert read_record(image) == big


def test_sidecars() -> None:
    spec = hamster()
    text, record = text_for(spec), record_for(spec)
    assert sidecar_files("hamster-1.png", parameters=text, record=record, options=MetadataOptions()) == []
    txt = sidecar_files("hamster-1.png", parameters=text, record=record, options=MetadataOptions(sidecar="txt"))
    assert txt == [("hamster-1.txt", text.encode("utf-8"))]
    ((name, data),) = sidecar_files(
        "hamster-1.webp", parameters=text, record=record, options=MetadataOptions(sidecar="json")
    )
    assert name == "hamster-1.json"
    loaded = json.loads(data)
    assert loaded["parameters"] == text and loaded["record"] == record


# --- inspect -----------------------------------------------------------------------------


def foreign_png(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 120, 30)).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    return path


def test_inspect_a_foreign_png_says_no_metadata_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", str(foreign_png(tmp_path))]) == 1
    out = capsys.readouterr().out
    assert "PNG 64x48" in out and "no metadata" in out and "watermark:" in out


def test_inspect_json_is_valid_json_and_reads_our_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ours, text, record = write(tmp_path, "jpeg")
    assert main(["inspect", "--json", str(ours), str(foreign_png(tmp_path))]) == 1
    reports = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in reports] == [str(ours), str(tmp_path / "photo.png")]
    first, second = reports
    assert first["parameters"] == text and first["record"] == record
    assert first["parsed"]["prompt"] == "a hamster painting with a brush"
    assert first["parsed"]["settings"]["Seed"] == "1234"
    assert first["xmp"]["digital_source_type"] == TRAINED
    assert first["xmp"]["creator_tool"] == f"diffusiond {__version__}"
    assert second["metadata"] is False and second["parameters"] is None
    assert {r["watermark"]["status"] for r in reports} <= {"found", "not found", "unavailable", "error"}


def test_inspect_exit_code_follows_the_watermark(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    marked = tmp_path / "marked.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(marked)
    plain, _, _ = write(tmp_path, "png", name="plain")

    def decode_marks(image: Image.Image, known_payloads: list[str]) -> tuple[dict[str, str | None], None]:
        return {"dwtDctSvd": "diffusiond" if image.getpixel((0, 0)) == (1, 2, 3) else None, "dwtDct": None}, None

    stand_in = SimpleNamespace(decode_marks=decode_marks)  # for pipeline/watermark.py
    monkeypatch.setattr(inspect_module, "_watermark_module", lambda: stand_in)
    assert main(["inspect", str(marked)]) == 0
    assert "watermark: found (dwtDctSvd: 'diffusiond', dwtDct: none)" in capsys.readouterr().out
    assert main(["inspect", str(marked), str(plain)]) == 1
    assert main(["inspect", str(marked), str(tmp_path / "missing.png")]) == 2
    (tmp_path / "junk.png").write_bytes(b"not an image")
    capsys.readouterr()
    assert main(["inspect", "--json", str(tmp_path / "junk.png")]) == 2
    (report,) = json.loads(capsys.readouterr().out)
    assert "cannot read as an image" in report["error"]


def test_inspect_reports_a_missing_or_failing_decoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _, _ = write(tmp_path, "png")
    monkeypatch.setattr(inspect_module, "_watermark_module", lambda: None)
    assert inspect_image(path)["watermark"]["status"] == "unavailable"

    def broken(image: Image.Image, known_payloads: list[str]) -> tuple[dict[str, str | None], None]:
        raise ValueError("image too small")

    monkeypatch.setattr(inspect_module, "_watermark_module", lambda: SimpleNamespace(decode_marks=broken))
    mark = inspect_image(path)["watermark"]
    assert mark["status"] == "error" and "image too small" in mark["detail"]


def test_inspect_reads_an_automatic1111_jpeg_and_survives_broken_xmp(tmp_path: Path) -> None:
    import piexif
    import piexif.helper

    text = "a cat\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512"
    exif = piexif.dump({"Exif": {piexif.ExifIFD.UserComment: piexif.helper.UserComment.dump(text, "unicode")}})
    path = tmp_path / "webui.jpg"
    Image.new("RGB", (32, 32)).save(path, exif=exif, xmp=b"<x:xmpmeta broken")  # as the webui saves, plus junk
    report = inspect_image(path)
    assert report["parameters"] == text and report["metadata"] is True
    assert report["parsed"]["prompt"] == "a cat" and report["parsed"]["settings"]["Sampler"] == "Euler a"
    assert report["record"] is None and report["xmp"] is None
    assert len(report["problems"]) == 1 and "XMP is not well-formed" in report["problems"][0]


def test_inspect_survives_a_hostile_credentials_folder(tmp_path: Path) -> None:
    """Damaged or foreign JSON, a link loop, a FIFO and a manifest naming a path outside its folder:
    each is passed over (no traceback, no file read outside the folder); the real match is still found."""
    import hashlib
    import os

    from diffusiond.pipeline.inspect import find_credentials

    folder = tmp_path / "outbox"
    folder.mkdir()
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"not yours")
    mark = {"method": "tiled", "payload": "diffusiond", "mark_id": "0000abcd"}

    def manifest(name: str, outputs: object) -> None:
        (folder / name).write_text(json.dumps({"status": "done", "job_id": name, "outputs": outputs}))

    (folder / "deep.json").write_text("[" * 200_000)
    (folder / "list.json").write_text("[1, 2]")
    manifest("dict-outputs.json", {"a": 1})
    manifest("str-outputs.json", "abc")
    manifest("number-outputs.json", 5)
    manifest("str-watermark.json", [{"watermark": "x"}])
    manifest("list-invisible.json", [{"watermark": {"invisible": [1]}}])
    digest = hashlib.sha256(outside.read_bytes()).hexdigest()
    manifest("escape.json", [{"file": str(outside), "sha256": digest, "watermark": {"invisible": mark}}])
    manifest("dotdot.json", [{"file": "../secret.png", "sha256": digest, "watermark": {"invisible": mark}}])
    os.symlink("loop.json", folder / "loop.json")
    os.mkfifo(folder / "fifo.json")
    image = folder / "real-1.png"
    image.write_bytes(b"\x89PNG real bytes")
    real = hashlib.sha256(image.read_bytes()).hexdigest()
    manifest("real.json", [{"file": "real-1.png", "sha256": real, "watermark": {"invisible": mark}}])

    [match] = find_credentials("0000abcd", "diffusiond", [folder, folder])  # given twice: listed once
    assert match["job_id"] == "real.json" and match["present"] is True and match["image"] == str(image)
