"""Textual-inversion embeddings: named in a prompt, loaded from the config's folder (A1111 .pt and safetensors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from diffusiond.pipeline.hashing import file_sha256
from diffusiond.pipeline.testmodel import make_test_embedding
from tests.conftest import Spool, first_image_pixels, run_in_turn, start_daemon_thread, write_config


def test_an_embedding_named_in_a_prompt_is_used_and_leaves_other_prompts_alone(
    spool: Spool, test_models: Any, tmp_path: Path
) -> None:
    folder = tmp_path / "embeddings"
    style = make_test_embedding(test_models.sd, folder / "test-style.pt")  # A1111's layout, two vectors
    make_test_embedding(test_models.sd, folder / "grain.safetensors", vectors=1, seed=3)
    write_config(spool.root, test_models, embeddings=str(folder))
    jobs = [
        ("before", "prompt: a fox\nseed: 3\n"),
        ("style", "prompt: a fox, test-style\nseed: 3\n"),
        ("weighted", "prompt: a (fox:1.3), test-style\nnegative_prompt: grain\nseed: 3\n"),
        ("after", "prompt: a fox\nseed: 3\n"),
    ]
    with start_daemon_thread(spool):
        made = run_in_turn(spool, jobs)
    image = {name: first_image_pixels(spool, m) for name, m in made.items()}
    with Image.open(spool.outbox / made["weighted"]["outputs"][0]["file"]) as png:
        parameters = png.text["parameters"]
    assert image["before"] == image["after"]  # a loaded embedding changes no other prompt
    assert len({image["before"], image["style"], image["weighted"]}) == 3
    assert [(e["name"], e["sha256"]) for e in made["style"]["embeddings"]] == [("test-style", file_sha256(style))]
    assert [e["name"] for e in made["weighted"]["embeddings"]] == ["grain", "test-style"]
    grain, test_style = (e["hash"] for e in made["weighted"]["embeddings"])
    assert f'TI hashes: "grain: {grain}, test-style: {test_style}"' in parameters
    assert made["weighted"]["prompt_encoding"]["method"] == "compel" and made["before"]["embeddings"] == []


def test_sdxl_takes_a_lora_and_a_two_encoder_embedding(
    spool: Spool, test_models: Any, family_models: Any, tmp_path: Path
) -> None:
    from diffusiond.pipeline.testmodel import make_test_lora

    make_test_lora(family_models.sdxl, tmp_path / "loras" / "xl-grain.safetensors", kohya=False)
    make_test_embedding(family_models.sdxl, tmp_path / "embeddings" / "xl-style.safetensors")
    write_config(
        spool.root,
        test_models,
        models={"xl": str(family_models.sdxl)},
        defaults={"all": {"model": "xl", "size": "64x64", "steps": 4}},
        loras=str(tmp_path / "loras"),
        embeddings=str(tmp_path / "embeddings"),
    )
    jobs = [
        ("before", "prompt: a fox\nseed: 3\n"),
        ("lora", "prompt: a fox <lora:xl-grain:1>\nseed: 3\n"),
        ("style", "prompt: a fox, xl-style\nseed: 3\n"),
        ("after", "prompt: a fox\nseed: 3\n"),
    ]
    with start_daemon_thread(spool):
        made = run_in_turn(spool, jobs)
    image = {name: first_image_pixels(spool, m) for name, m in made.items()}
    assert image["before"] == image["after"]
    assert len({image["before"], image["lora"], image["style"]}) == 3
    assert [lora["name"] for lora in made["lora"]["loras"]] == ["xl-grain"]
    assert [e["name"] for e in made["style"]["embeddings"]] == ["xl-style"]
