"""`diffusiond schema`: the JSON Schema of a job, checked by a real JSON Schema validator (jsonschema)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from diffusiond.pipeline.job import job_schema

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def schema_from_the_command() -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "diffusiond.daemon.cli", "schema"], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout)


def test_the_command_prints_a_valid_schema_and_the_examples_carry_it() -> None:
    schema = schema_from_the_command()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema == job_schema()
    shipped = json.loads((EXAMPLES / "job.schema.json").read_text())
    assert shipped == schema, "examples/job.schema.json is stale: diffusiond schema > examples/job.schema.json"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("inbox/**/*.yaml")), ids=lambda p: p.name)
def test_every_example_job_is_valid_and_names_the_schema(path: Path) -> None:
    text = path.read_text()
    assert text.splitlines()[0] == "# yaml-language-server: $schema=../job.schema.json"
    validator = jsonschema.Draft202012Validator(job_schema())
    documents = [d for d in yaml.safe_load_all(text) if d is not None]
    assert documents
    for document in documents:
        validator.validate(document)


@pytest.mark.parametrize(
    ("job", "wrong"),
    [
        ({"promt": "a typo"}, "promt"),
        ({"task": "img2img", "prompt": "x", "strenght": 0.5}, "strenght"),
        ({"task": "upscale", "method": "bicubic"}, "bicubic"),
        ({"prompt": "x", "size": "big"}, "big"),
        ({"prompt": "x", "steps": 0}, "0"),
        ({"task": "paint"}, "paint"),
    ],
)
def test_a_misspelled_field_or_a_wrong_value_is_rejected(job: dict, wrong: str) -> None:
    errors = list(jsonschema.Draft202012Validator(job_schema()).iter_errors(job))
    assert errors, f"{job} should not validate"
    found = [error for e in errors for error in [e, *(e.context or [])]]
    assert any(wrong in error.message or wrong in json.dumps(error.instance) for error in found), found


@pytest.mark.parametrize(
    "job",
    [
        {"prompt": "a fox", "size": "512x768"},
        {"prompt": "a fox", "size": 512},
        {"prompt": "a fox", "size": [512, 768], "seed": 3, "count": 2, "output": {"format": "webp", "quality": 80}},
        {"task": "img2img", "image": "fox.png", "strength": 0.6},
        {"task": "upscale", "method": "lanczos", "scale": 2},
        {"prompt": "x", "watermark": {"visible": {"text": "AI"}, "invisible": False}},
    ],
)
def test_what_the_daemon_accepts_the_schema_accepts(job: dict) -> None:
    from diffusiond.pipeline.job import spec_from_dict

    spec_from_dict({"task": "txt2img"} | job)  # the daemon's own models take it (txt2img: the default task)
    jsonschema.Draft202012Validator(job_schema()).validate(job)
