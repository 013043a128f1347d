"""Multi-stage jobs (`then:`): validated whole, run stage by stage on real diffusers, resumed after a kill."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import yaml
from PIL import Image

from diffusiond.daemon.faults import ENV
from diffusiond.pipeline.errors import JobFailed, JobRejected
from diffusiond.pipeline.families import ModelKind
from diffusiond.pipeline.job import Limits, Rules, fill_seed, job_schema, parse_job_text, stage_specs
from diffusiond.pipeline.standin import StandInGenerator
from tests.conftest import (
    CEILING_S,
    Spool,
    figure,
    hold,
    start_daemon_process,
    start_daemon_thread,
    wait_for,
    write_config,
)
from tests.spool_checks import events

RULES = Rules(
    models={"sd": ModelKind.SD1, "xl": ModelKind.SDXL, "x4": ModelKind.UPSCALER_X4},
    defaults={"all": {"model": "sd", "size": "64x64", "steps": 4}, "upscale": {"model": "x4"}},
)
HIRES = """\
prompt: a lighthouse at dusk
negative_prompt: blurry
seed: 42
count: 2
scheduler: euler_a
then:
  - {task: img2img, strength: 0.5, size: 96x96}
  - {task: upscale, method: lanczos, scale: 2}
"""


def parse(text: str, rules: Rules = RULES) -> Any:
    return parse_job_text(text, path="chain.yaml", rules=rules)[0]


def rejection(text: str, rules: Rules = RULES) -> JobRejected:
    with pytest.raises(JobRejected) as caught:
        parse(text, rules)
    return caught.value


def test_a_stage_inherits_prompt_seed_and_its_model_s_settings() -> None:
    spec = parse(
        HIRES.replace("count: 2", "count: 2\nsteps: 10") + "  - {task: upscale, prompt: a sharper lighthouse}\n"
    )
    first, hires, lanczos, x4 = stage_specs(spec)
    assert [s.task for s in (first, hires, lanczos, x4)] == ["txt2img", "img2img", "upscale", "upscale"]
    assert {(s.prompt, s.negative_prompt, s.seed) for s in (hires, lanczos)} == {("a lighthouse at dusk", "blurry", 42)}
    assert (hires.model, hires.steps, hires.scheduler) == ("sd", 10, "euler_a")  # same model: a hires fix
    assert lanczos.model is None  # no model made its images
    assert (x4.model, x4.prompt, x4.steps, x4.scheduler) == ("x4", "a sharper lighthouse", 4, None)  # the config's
    assert all(s.count == 1 for s in spec.then)


def test_stage_seeds_follow_the_job_s_random_seed_or_their_own() -> None:
    spec = fill_seed(parse("prompt: x\nthen: [{task: img2img}, {task: img2img, seed: 7}, {task: img2img}]\n"))
    assert spec.seed is not None
    assert [s.seed for s in spec.then] == [spec.seed, 7, 7]


@pytest.mark.parametrize(
    ("stages", "field", "says"),
    [
        ("[{task: img2img, strength: 2}]", "strength", "less than or equal to 1"),
        ("[{task: img2img, strenght: 0.3}]", "strenght", "did you mean 'strength'"),
        ("[{task: img2img, count: 3}]", "count", "set `count:` on the job"),
        ("[{task: txt2img}]", "task", "can only be a job's first stage"),
        ("[{strength: 0.3}]", "task", "a stage must name its task"),
        ("[{task: upscale, scale: 2}]", "scale", "sd-x4 always scales by 4"),
        ("[{task: img2img, model: nope}]", "model", "not in the config's models"),
        ("[{task: upscale, model: sd}]", "model", "cannot run upscale"),
    ],
)
def test_an_error_in_a_stage_names_the_job_the_stage_and_the_field(stages: str, field: str, says: str) -> None:
    error = rejection(f"prompt: x\n---\nprompt: y\nthen: {stages}\n")
    assert (error.job_index, error.stage, error.field) == (2, 2, field)
    assert f"chain.yaml (job 2, stage 2), field '{field}'" in str(error)
    assert says in str(error)
    assert error.report()["stage"] == 2


def test_the_pixel_limit_holds_for_every_stage() -> None:
    limited = Rules(RULES.models, RULES.defaults, limits=Limits(max_pixels=256 * 256))
    error = rejection(
        "prompt: x\nthen:\n  - {task: upscale, method: lanczos, scale: 2}\n  - {task: upscale}\n", limited
    )
    assert (error.stage, error.field, error.code) == (3, "scale", "over_limit")
    assert "the result of stage 3 would be 512x512" in str(error)


def test_then_must_be_a_list_and_stages_are_limited() -> None:
    assert rejection("prompt: x\nthen: {task: img2img}\n").field == "then"
    many = "prompt: x\nthen:\n" + "  - {task: img2img}\n" * 8
    assert "at most 8" in str(rejection(many))


def test_the_schema_knows_stages() -> None:
    validator = jsonschema.Draft202012Validator(job_schema())
    assert not list(validator.iter_errors(yaml.safe_load(HIRES)))
    wrong = yaml.safe_load(HIRES) | {"then": [{"task": "img2img", "strenght": 0.5}]}
    assert any("strenght" in e.message for e in validator.iter_errors(wrong))


def run_real(spool: Spool, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """One pass of a real `diffusiond run --oneshot` (real diffusers on the test model)."""
    process = start_daemon_process(spool.config_path, "--oneshot", *extra, env=env)
    try:
        process.wait(CEILING_S)
    finally:
        if process.poll() is None:
            process.kill()
    return process


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_a_three_stage_job_makes_its_final_images_with_the_original_prompt_and_seed(
    spool: Spool, test_models: Any
) -> None:
    from sd_parsers import ParserManager

    spool.drop("hires.yaml", HIRES + "---\n" + HIRES.replace("count: 2", "count: 1\nkeep: all"))
    process = run_real(spool)
    assert process.returncode == 0, process.stdout.read() if process.stdout else ""
    first, kept = sorted(spool.manifests(), key=lambda m: m["index"])

    # Only the final images of job 1 are published: two, at the last stage's size.
    assert [(o["width"], o["height"], o["seed"]) for o in first["outputs"]] == [(192, 192, 42), (192, 192, 43)]
    assert [s["task"] for s in first["stages"]] == ["txt2img", "img2img", "upscale"]
    assert [s["outputs"][0]["width"] for s in first["stages"]] == [64, 96, 192]
    assert [o["file"] for s in first["stages"][:2] for o in s["outputs"]] == [None] * 4
    assert [[c["stage"] for c in o["chain"]] for o in first["outputs"]] == [[1, 2], [1, 2]]
    assert first["stages"][1]["job"]["strength"] == 0.5 and first["stages"][1]["seeds"] == [42, 43]
    assert first["model"]["name"] == "test" and first["stages"][2]["model"] is None

    # Each final image says how it began (A1111's hires-fix keys), as sd-parsers reads it.
    for output in first["outputs"]:
        info = ParserManager().parse(str(spool.outbox / output["file"]))
        assert info is not None
        sampler = info.samplers[0]
        assert [p.value for p in sampler.prompts] == ["a lighthouse at dusk"]
        assert [p.value for p in sampler.negative_prompts] == ["blurry"]
        assert sampler.parameters["seed"] == str(output["seed"])
        assert info.metadata["Hires upscale"] == "1.5" and info.metadata["Denoising strength"] == "0.5"
        assert info.metadata["Postprocess upscale by"] == "2"

    # keep: all publishes each stage's image, each with its own stages in its record.
    names = [o["file"] for s in kept["stages"] for o in s["outputs"]]
    assert names[:2] == [f"{kept['job_id']}-1-stage1.png", f"{kept['job_id']}-1-stage2.png"]
    assert names[2] == kept["outputs"][0]["file"]
    # A published earlier image's marks are recorded as a final's (its own tiled mark id where it has one).
    assert all(set(o["watermark"]) == {"visible", "invisible"} for s in kept["stages"][:2] for o in s["outputs"])
    assert all("watermark" not in o for s in first["stages"][:2] for o in s["outputs"])
    for stage, name in enumerate(names, start=1):
        image = spool.outbox / name
        record = json.loads(Image.open(image).text["diffusiond"])
        assert [s["stage"] for s in record["stages"]] == list(range(1, stage + 1))
        assert record["seed"] == 42
    assert sorted(spool.visible_outputs()) == sorted(
        [*(o["file"] for o in first["outputs"]), f"{first['job_id']}.json", *names, f"{kept['job_id']}.json"]
    )
    assert spool.claims() == []  # the kept stages went with the claim
    progress = [e for e in events(spool.config.state) if e["event"] == "progress"]
    assert {(e["stage"], e["stages"]) for e in progress} == {(1, 3), (2, 3)}  # a Lanczos stage has no steps
    figure("multi-stage job: txt2img 64 -> img2img 96 -> lanczos 192, count 2: 2 final images, 3 stages recorded")

    # Reproduce: the second final image (seed 43) and a kept stage-2 image run again.
    write_config(spool.root, test_models, reproduce="reproduce")
    second, middle = first["outputs"][1]["file"], names[1]
    spool.drop("reproduce/second.png", (spool.outbox / second).read_bytes())
    spool.drop("reproduce/middle.png", (spool.outbox / middle).read_bytes())
    assert run_real(spool).returncode == 0
    again = {m["source"]: m for m in spool.manifests()}
    assert [s["task"] for s in again["reproduce/second.png"]["stages"]] == ["txt2img", "img2img", "upscale"]
    assert [s["task"] for s in again["reproduce/middle.png"]["stages"]] == ["txt2img", "img2img"]
    remade = {source: pixels(spool.outbox / again[source]["outputs"][0]["file"]).astype(int) for source in again}
    assert np.array_equal(remade["reproduce/middle.png"], pixels(spool.outbox / middle))
    # Made two to a call, remade alone: batched arithmetic rounds a few pixels by a level or two (on
    # one torch thread, `threads: auto` on 2 CPUs, 2 was seen; on two, 1), no more.
    assert np.abs(remade["reproduce/second.png"] - pixels(spool.outbox / second)).max() <= 2


def test_a_kill_between_stages_resumes_at_the_next_stage_with_the_same_seeds(
    spool: Spool, tmp_path: Path, test_models: Any
) -> None:
    job = HIRES.replace("count: 2", "count: 1")
    spool.drop("hires.yaml", job)
    killed = run_real(spool, env={ENV: "after_keep_stage"})
    assert killed.returncode == -signal.SIGKILL
    assert spool.manifests() == [] and len(spool.claims()) == 1
    assert run_real(spool).returncode == 0
    [resumed] = spool.manifests()
    assert [s["attempt"] for s in resumed["stages"]] == [1, 2, 2]
    started = [e for e in events(spool.config.state) if e["event"] == "started"]
    assert [e["stage"] for e in started] == [1, 2, 3]  # stage 1 ran once, before the kill

    # The same job run without a kill makes the same images.
    (tmp_path / "other").mkdir()
    other = Spool(tmp_path / "other", write_config(tmp_path / "other", test_models))
    other.drop("hires.yaml", job)
    assert run_real(other).returncode == 0
    [plain] = other.manifests()
    chains = [[c["sha256"] for c in m["outputs"][0]["chain"]] for m in (resumed, plain)]
    assert chains[0] == chains[1]
    final = [pixels(s.outbox / m["outputs"][0]["file"]) for s, m in ((spool, resumed), (other, plain))]
    assert np.array_equal(final[0], final[1])
    figure("multi-stage job killed after stage 1: resumed at stage 2, stage 1 not run again, same images")


def test_a_stop_between_stages_keeps_the_claim_and_the_restart_finishes_it(spool: Spool, tmp_path: Path) -> None:
    """Stopped during stage 2 (held there by the stand-in's gate), the claim stays in work/ with stage 1
    kept, instead of going back to the inbox; the next start runs stages 2 and 3 only."""
    gate = tmp_path / "gate"
    spool.drop("hires.yaml", HIRES.replace("strength: 0.5,", "strength: 0.5, prompt: slow stage,"))
    process = start_daemon_process(spool.config_path, standin=hold(gate, "slow stage"))
    try:
        wait_for(lambda: list(gate.glob("held-*")), what="stage 2 held at its first step")
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=CEILING_S)
    finally:
        process.kill()
    assert process.returncode == 0, output
    assert not list(spool.inbox.glob("*.yaml")) and len(spool.claims()) == 1
    assert [e["event"] for e in events(spool.config.state) if e["event"] in ("resumes", "released")] == ["resumes"]
    restarted = start_daemon_process(spool.config_path, "--oneshot", standin={})
    assert restarted.wait(CEILING_S) == 0
    [manifest] = spool.manifests()
    assert [s["attempt"] for s in manifest["stages"]] == [1, 2, 2]
    assert [s["prompt"] for s in (st["job"] for st in manifest["stages"])] == [
        "a lighthouse at dusk",
        "slow stage",
        "slow stage",
    ]


def test_a_stage_that_fails_fails_its_job_and_the_report_names_the_stage(spool: Spool, test_models: Any) -> None:
    write_config(spool.root, test_models, outbox_failures=True)
    spool.drop("chain.yaml", "prompt: fine\nseed: 1\n---\n" + HIRES.replace("strength: 0.5,", "prompt: poison,"))
    generator = StandInGenerator(fail_with={"poison": JobFailed("the stage broke", fix="none")})
    with start_daemon_thread(spool, generator):
        wait_for(spool.reports, what="the failure report")
        wait_for(spool.failures, what="the failure record")
    [report] = spool.reports()
    assert (report["code"], report["job"], report["stage"], report["error"]) == (
        "generation_failed",
        2,
        2,
        "the stage broke",
    )
    [record] = spool.failures()
    assert (record["index"], record["stage"]) == (2, 2)
    [done] = spool.manifests()
    assert done["index"] == 1


def test_the_sdxl_refiner_runs_as_a_stage_and_says_so_as_a1111_does(
    spool: Spool, test_models: Any, family_models: Any
) -> None:
    models = {"xl": str(family_models.sdxl), "refiner": str(family_models.sdxl_refiner)}
    write_config(spool.root, test_models, models=models, defaults={"all": {"model": "xl", "steps": 4}})
    spool.drop(
        "refined.yaml",
        "prompt: a (lighthouse:1.2)\nseed: 9\nsize: 64\nthen: [{task: img2img, model: refiner, strength: 0.3}]\n",
    )
    process = run_real(spool)
    assert process.returncode == 0, process.stdout.read() if process.stdout else ""
    [made] = spool.manifests()
    assert [(s["task"], s["model"]["family"]) for s in made["stages"]] == [
        ("txt2img", "sdxl"),
        ("img2img", "sdxl_refiner"),
    ]
    with Image.open(spool.outbox / made["outputs"][0]["file"]) as image:
        parameters = image.text["parameters"]
    assert "Refiner: refiner, Refiner switch at: 0.7" in parameters and "Hires" not in parameters


def test_stages_from_a_profile_or_defaults_and_a_job_that_turns_them_off() -> None:
    from diffusiond.pipeline.job import validate_job

    profile = {
        "task": "img2img",
        "prompt": "a watercolor",
        "then": [{"task": "upscale", "method": "lanczos", "scale": 2}],
    }
    spec = validate_job({"image": "a.png"}, path="sketches/a.png", index=1, rules=RULES, profile=profile)
    assert [s.task for s in stage_specs(spec)] == ["img2img", "upscale"]
    defaults = Rules(RULES.models, {**RULES.defaults, "txt2img": {"then": [{"task": "img2img"}]}})
    assert len(parse("prompt: x\n", defaults).then) == 1
    assert parse("prompt: x\nthen: []\n", defaults).then == ()
