"""LoRAs: Kohya and diffusers files from the config's folder, by job field or A1111 prompt tag, unloaded cleanly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from diffusiond.pipeline.hashing import file_sha256, lora_hash
from diffusiond.pipeline.testmodel import make_test_lora
from tests.conftest import Spool, first_image_pixels, run_in_turn, start_daemon_thread, wait_for, write_config


def test_a_lora_changes_the_image_at_weight_1_not_at_0_and_leaves_no_trace(
    spool: Spool, test_models: Any, tmp_path: Path
) -> None:
    folder = tmp_path / "loras"
    kohya = make_test_lora(test_models.sd, folder / "film-grain.safetensors")
    diffusers_style = make_test_lora(test_models.sd, folder / "style" / "ink.safetensors", seed=8, kohya=False)
    write_config(spool.root, test_models, loras=str(folder))
    jobs = [
        ("before", "prompt: a fox\nseed: 3\n"),
        ("zero", "prompt: a fox\nseed: 3\nloras: [{name: film-grain, weight: 0}]\n"),
        ("tag", "prompt: a fox <lora:film-grain:1>\nseed: 3\n"),
        ("two", "prompt: a fox <lora:style/ink:0.8>\nseed: 3\nloras: [{name: film-grain, weight: 1}]\n"),
        ("after", "prompt: a fox\nseed: 3\n"),
    ]
    with start_daemon_thread(spool):
        made = run_in_turn(spool, jobs)  # one at a time: "after" runs once the LoRAs were loaded
    image = {name: first_image_pixels(spool, m) for name, m in made.items()}
    assert image["zero"] == image["before"] == image["after"]  # weight 0 is no LoRA; none is left behind
    assert len({image["before"], image["tag"], image["two"]}) == 3
    tag, two = made["tag"], made["two"]
    assert [(lora["name"], lora["weight"]) for lora in tag["loras"]] == [("film-grain", 1.0)]
    assert tag["loras"][0]["sha256"] == file_sha256(kohya)
    assert [lora["name"] for lora in two["loras"]] == ["film-grain", "style/ink"]
    with Image.open(spool.outbox / two["outputs"][0]["file"]) as png:
        parameters = png.text["parameters"]
    hashes = f"film-grain: {lora_hash(kohya)}, style/ink: {lora_hash(diffusers_style)}"
    assert f'Lora hashes: "{hashes}"' in parameters
    assert parameters.startswith("a fox <lora:style/ink:0.8>\n")  # the prompt as written
    assert made["before"]["loras"] == []


def test_a_missing_lora_fails_with_the_names_there_are(spool: Spool, test_models: Any, tmp_path: Path) -> None:
    make_test_lora(test_models.sd, tmp_path / "loras" / "film-grain.safetensors")
    write_config(spool.root, test_models, loras=str(tmp_path / "loras"))
    with start_daemon_thread(spool):
        spool.drop("missing.yaml", "prompt: a fox <lora:missing:1>\n")
        [report] = wait_for(spool.reports, what="the report")
    assert (report["code"], report["field"], report["value"]) == ("invalid_field", "loras", "missing")
    assert "known: film-grain" in report["error"]


def test_a_lora_of_the_text_encoder_reaches_both_prompt_paths(spool: Spool, test_models: Any, tmp_path: Path) -> None:
    """Kohya's `lora_te_` half changes the conditioning: as text (the pipeline encodes) and through compel."""
    from safetensors.torch import load_file, save_file

    both = make_test_lora(test_models.sd, tmp_path / "both.safetensors", kohya=True, text_encoder=True)
    text_only = {k: v for k, v in load_file(str(both)).items() if k.startswith("lora_te_")}
    (tmp_path / "loras").mkdir()
    save_file(text_only, str(tmp_path / "loras" / "te.safetensors"))  # no UNet part: only the encoder can change
    write_config(spool.root, test_models, loras=str(tmp_path / "loras"))
    jobs = [
        ("plain", "prompt: a fox\nseed: 3\nloras: [{name: te, weight: 1}]\n"),
        ("plain-zero", "prompt: a fox\nseed: 3\nloras: [{name: te, weight: 0}]\n"),
        ("weighted", "prompt: a (fox:1.0)\nseed: 3\nloras: [{name: te, weight: 1}]\n"),
    ]
    with start_daemon_thread(spool):
        made = run_in_turn(spool, jobs)
    image = {name: first_image_pixels(spool, m) for name, m in made.items()}
    assert image["plain"] != image["plain-zero"]
    assert made["weighted"]["prompt_encoding"]["method"] == "compel"
    assert image["weighted"] == image["plain"]  # `(fox:1.0)` through compel, with the LoRA in its encoder
