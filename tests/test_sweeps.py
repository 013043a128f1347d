"""Sweeps: one job file document that runs once per combination of the values it lists."""

from __future__ import annotations

import pytest
from PIL import Image

from diffusiond.pipeline.errors import JobRejected
from diffusiond.pipeline.families import ModelKind
from diffusiond.pipeline.job import Rules, parse_job_text
from tests.conftest import Spool, start_daemon_thread, wait_for

RULES = Rules(models={"sd": ModelKind.SD1}, defaults={"all": {"model": "sd"}})


def test_a_sweep_is_the_product_of_its_values_in_the_order_written() -> None:
    specs = parse_job_text("prompt: x\nsweep: {seed: [1, 2, 3], guidance: [5, 7.5]}\n", path="a.yaml", rules=RULES)
    assert [(s.seed, s.guidance) for s in specs] == [(1, 5), (1, 7.5), (2, 5), (2, 7.5), (3, 5), (3, 7.5)]
    assert specs[3].sweep == {"seed": [2], "guidance": [7.5]}


@pytest.mark.parametrize(
    ("sweep", "field", "says"),
    [
        ("{seed: [1, 2, 3, 4, 5, 6, 7, 8, 9], guidance: [1, 2]}", "sweep", "18 images: over the limit of 16"),
        ("{count: [1, 2]}", "sweep.count", "cannot vary 'count'"),
        ("{seed: 3}", "sweep.seed", "non-empty list"),
        ("{guidance: [5, 70]}", "guidance", "less than or equal to 50"),
    ],
)
def test_a_wrong_sweep_is_refused_before_anything_runs(sweep: str, field: str, says: str) -> None:
    with pytest.raises(JobRejected) as caught:
        parse_job_text(f"prompt: x\nsweep: {sweep}\n", path="a.yaml", rules=RULES)
    assert caught.value.field == field and says in str(caught.value)


def test_a_profile_cannot_sweep() -> None:
    from diffusiond.pipeline.job import validate_job

    with pytest.raises(JobRejected) as caught:
        validate_job(
            {"image": "a.png"},
            path="p/a.png",
            index=1,
            rules=RULES,
            profile={"task": "img2img", "sweep": {"seed": [1, 2]}},
        )
    assert caught.value.field == "sweep" and "only from a job file" in str(caught.value)


def test_a_3_by_2_sweep_makes_6_jobs_each_naming_its_values(spool: Spool) -> None:
    with start_daemon_thread(spool):
        spool.drop("sweep.yaml", "prompt: a lighthouse\nsweep: {seed: [1, 2, 3], guidance: [5, 7.5]}\n")
        spool.drop("big.yaml", "prompt: x\ncount: 3\nsweep: {seed: [1, 2, 3, 4, 5, 6]}\n")
        manifests = wait_for(lambda: len(spool.manifests()) == 6 and spool.reports() and spool.manifests(), what="6")
    assert sorted((m["index"], m["seeds"][0], m["job"]["guidance"]) for m in manifests) == [
        (1, 1, 5),
        (2, 1, 7.5),
        (3, 2, 5),
        (4, 2, 7.5),
        (5, 3, 5),
        (6, 3, 7.5),
    ]
    for manifest in manifests:
        assert manifest["job"]["sweep"] == {"seed": manifest["seeds"], "guidance": [manifest["job"]["guidance"]]}
        with Image.open(spool.outbox / manifest["outputs"][0]["file"]) as image:
            assert (
                f"CFG scale: {manifest['job']['guidance']:g}, Seed: {manifest['seeds'][0]}" in image.text["parameters"]
            )
    [report] = spool.reports()
    assert (report["file"], report["code"], report["field"]) == ("big.yaml", "over_limit", "sweep")


def test_prompt_alternatives_expand_like_a_sweep_of_prompts() -> None:
    specs = parse_job_text("prompt: 'a {red|blue} {fox|cat}'\nsweep: {seed: [1, 2]}\n", path="a.yaml", rules=RULES)
    assert [(s.prompt, s.seed) for s in specs][:3] == [("a red fox", 1), ("a red fox", 2), ("a red cat", 1)]
    assert len(specs) == 8 and specs[-1].sweep == {"prompt": ["a blue cat"], "seed": [2]}
    with pytest.raises(JobRejected) as caught:
        parse_job_text("prompt: 'a {red|blue} fox'\nsweep: {prompt: [x, y]}\n", path="a.yaml", rules=RULES)
    assert caught.value.field == "sweep.prompt"
