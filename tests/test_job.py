"""The job file: defaults, validation and its error reports, seeds, and claim-record round trips."""

from __future__ import annotations

from typing import Any

import pytest

from diffusiond.pipeline.errors import JobRejected
from diffusiond.pipeline.families import ModelKind
from diffusiond.pipeline.job import (
    SCHEDULER_NAMES,
    SEED_MAX,
    TASKS,
    Img2ImgJob,
    Rules,
    Txt2ImgJob,
    UpscaleJob,
    fill_seed,
    inbox_relative,
    parse_job_text,
    seeds_for,
    spec_from_dict,
    validate_job,
)

MODELS = {"test": ModelKind.SD1, "x4": ModelKind.UPSCALER_X4}
RULES = Rules(
    models=MODELS,
    defaults={"all": {"model": "test", "size": "64x64", "steps": 4}, "upscale": {"model": "x4"}},
)
NO_DEFAULTS = Rules(models=MODELS, defaults={})


def parse(text: str, *, path: str = "job.yaml", rules: Rules = RULES, profile: dict[str, Any] | None = None) -> list:
    return parse_job_text(text, path=path, rules=rules, profile=profile)


def rejected(text: str, *, path: str = "job.yaml", rules: Rules = RULES) -> JobRejected:
    with pytest.raises(JobRejected) as info:
        parse(text, path=path, rules=rules)
    return info.value


# --- defaults --------------------------------------------------------------------------------


def test_defaults_layer_all_then_task_then_profile_then_document() -> None:
    rules = Rules(
        models=MODELS,
        defaults={
            "all": {"model": "test", "prompt": "from all", "negative_prompt": "all-neg", "steps": 10, "guidance": 5},
            "txt2img": {"prompt": "from task", "steps": 20, "guidance": 6},
        },
    )
    profile = {"prompt": "from profile", "guidance": 7}
    [spec] = parse_job_text("prompt: from document\n", path="p/j.yaml", rules=rules, profile=profile)
    assert spec.negative_prompt == "all-neg"  # only `all` sets it
    assert spec.steps == 20  # the task's default beats `all`
    assert spec.guidance == 7  # the profile beats the task
    assert spec.prompt == "from document"  # the document beats everything


def test_a_task_default_applies_only_to_that_task() -> None:
    rules = Rules(models=MODELS, defaults={"all": {"model": "test"}, "img2img": {"steps": 12}})
    txt, img = parse_job_text("prompt: a\n---\ntask: img2img\nimage: a.png\n", path="j.yaml", rules=rules)
    assert txt.steps == 30
    assert img.steps == 12


def test_a_profile_can_set_the_task() -> None:
    [spec] = parse("image: cat.png\n", path="sketches/cat.yaml", profile={"task": "img2img", "strength": 0.5})
    assert isinstance(spec, Img2ImgJob)
    assert spec.strength == 0.5


def test_config_defaults_for_fields_a_task_lacks_are_skipped() -> None:
    rules = Rules(
        models=MODELS,
        defaults={"all": {"model": "test", "size": "64x64", "strength": 0.3}, "upscale": {"model": "x4"}},
    )
    up, txt = parse_job_text("task: upscale\nimage: a.png\n---\nprompt: a\n", path="j.yaml", rules=rules)
    assert isinstance(up, UpscaleJob) and not hasattr(up, "size")
    assert up.model == "x4"
    assert isinstance(txt, Txt2ImgJob) and not hasattr(txt, "strength")
    assert txt.size == (64, 64)


def test_a_field_the_user_wrote_is_strict_even_when_a_default_would_be_skipped() -> None:
    error = rejected("task: upscale\nimage: a.png\nsize: 64\n")
    assert error.field == "size"


# --- size --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "size"),
    [
        ("512x768", (512, 768)),
        ("64X128", (64, 128)),
        ("'512'", (512, 512)),
        ("512", (512, 512)),
        ("[512, 768]", (512, 768)),
    ],
)
def test_size_forms(written: str, size: tuple[int, int]) -> None:
    [spec] = parse(f"size: {written}\n")
    assert spec.size == size


@pytest.mark.parametrize(("written", "shown"), [("500x512", "500x512"), ("[64, 65]", "64x65"), ("4", "4x4")])
def test_size_must_be_a_multiple_of_8(written: str, shown: str) -> None:
    error = rejected(f"size: {written}\n")
    assert error.field == "size"
    assert error.value == shown
    assert "multiples of 8" in error.message
    assert error.fix


def test_size_that_is_not_a_size_names_the_expected_form() -> None:
    error = rejected("size: 64 by 64\n")
    assert error.field == "size"
    assert error.value == "64 by 64"
    assert "512x768" in error.message


# --- errors name file, job, field, value and a fix ---------------------------------------------

SECOND_JOB_ERRORS = [
    ("steps: 0", "steps", 0),
    ("steps: many", "steps", "many"),
    ("guidance: 99", "guidance", 99),
    ("seed: -1", "seed", -1),
    ("count: 0", "count", 0),
    ("output: {format: gif}", "output.format", "gif"),
    ("negative_prompt: [a, b]", "negative_prompt", ["a", "b"]),
    ("model: sdxl", "model", "sdxl"),
    ("scheduler: dpm", "scheduler", "dpm"),
    ("size: 100x100", "size", "100x100"),
]


@pytest.mark.parametrize(("line", "field", "value"), SECOND_JOB_ERRORS)
def test_an_error_names_file_job_field_value_and_a_fix(line: str, field: str, value: Any) -> None:
    error = rejected(f"prompt: fine\n---\n{line}\n", path="sub/two.yaml")
    assert (error.path, error.job_index, error.field, error.value) == ("sub/two.yaml", 2, field, value)
    assert error.fix.strip()
    report = error.report()
    assert report["file"] == "sub/two.yaml"
    assert report["job"] == 2
    assert report["field"] == field
    assert report["value"] == value
    assert report["fix"] == error.fix
    assert report["code"] == "invalid_field"
    assert report["error"] == error.message
    text = str(error)
    assert text.startswith("sub/two.yaml (job 2), field ") and "Fix: " in text


def test_the_first_wrong_job_rejects_the_whole_file() -> None:
    error = rejected("prompt: a\n---\nsteps: 0\n---\ncount: 0\n")
    assert (error.job_index, error.field) == (2, "steps")


def test_unknown_field_suggests_the_close_name() -> None:
    error = rejected("promt: a red fox\n")
    assert error.field == "promt"
    assert error.value == "a red fox"
    assert "did you mean 'prompt'?" in error.message
    assert "negative_prompt" in error.message  # the accepted fields are listed
    assert "promt" in error.fix


@pytest.mark.parametrize(
    ("text", "task"),
    [
        ("task: img2img\nimage: a.png\nstrenght: 0.5\n", "img2img"),
        ("task: upscale\nimage: a.png\nmetod: lanczos\n", "upscale"),
    ],
)
def test_unknown_field_message_names_the_task(text: str, task: str) -> None:
    error = rejected(text)
    assert error.field in ("strenght", "metod")
    assert f"{task} job accepts" in error.message, error.message


def test_unknown_nested_field_lists_what_that_section_accepts() -> None:
    error = rejected("output: {qualty: 90}\n")
    assert error.field == "output.qualty"
    assert error.value == 90
    assert "quality" in error.message, error.message


@pytest.mark.parametrize("task_name", TASKS)
def test_a_field_named_like_a_task_is_an_unknown_field(task_name: str) -> None:
    error = rejected(f"prompt: a\n{task_name}: true\n")
    assert error.field == task_name
    assert error.value is True


def test_unknown_task_lists_the_allowed_ones() -> None:
    error = rejected("task: inpaint\n")
    assert (error.field, error.value) == ("task", "inpaint")
    for task in TASKS:
        assert task in error.message
    assert error.fix


def test_upscale_with_an_sd_model_is_rejected_and_names_the_fitting_model() -> None:
    error = rejected("task: upscale\nimage: a.png\nmodel: test\n")
    assert (error.field, error.value) == ("model", "test")
    assert "upscale" in error.message and "x4" in error.message


def test_txt2img_with_the_upscaler_model_is_rejected() -> None:
    error = rejected("model: x4\n")
    assert (error.field, error.value) == ("model", "x4")
    assert "test" in error.message


def test_without_a_model_default_the_error_lists_the_models_that_fit() -> None:
    error = rejected("task: upscale\nimage: a.png\n", rules=NO_DEFAULTS)
    assert (error.field, error.value) == ("model", None)
    assert "x4" in error.fix and "test" not in error.fix


def test_lanczos_needs_no_model() -> None:
    [spec] = parse("task: upscale\nimage: a.png\nmethod: lanczos\nscale: 2\n", rules=NO_DEFAULTS)
    assert spec.model is None
    assert (spec.method, spec.scale) == ("lanczos", 2)


def test_lanczos_count_must_be_1() -> None:
    error = rejected("task: upscale\nimage: a.png\nmethod: lanczos\nscale: 2\ncount: 2\n")
    assert (error.field, error.value) == ("count", 2)
    assert error.fix


def test_sd_x4_scale_must_be_4() -> None:
    error = rejected("task: upscale\nimage: a.png\nscale: 2\n")
    assert (error.field, error.value) == ("scale", 2)
    assert "lanczos" in error.fix
    [spec] = parse("task: upscale\nimage: a.png\nscale: 4\n")
    assert spec.scale == 4


def test_img2img_steps_times_strength_below_1_is_rejected() -> None:
    error = rejected("task: img2img\nimage: a.png\nsteps: 2\nstrength: 0.4\n")
    assert (error.field, error.value) == ("strength", 0.4)
    assert error.fix
    [spec] = parse("task: img2img\nimage: a.png\nsteps: 4\nstrength: 0.25\n")  # exactly one step is enough
    assert spec.strength == 0.25


def test_unknown_scheduler_lists_the_valid_names() -> None:
    error = rejected("scheduler: dpm\n")
    assert (error.field, error.value) == ("scheduler", "dpm")
    for name in SCHEDULER_NAMES:
        assert name in error.message
    [spec] = parse("scheduler: euler_a\n")
    assert spec.scheduler == "euler_a"


def test_over_a_limit_is_its_own_code() -> None:
    error = rejected("steps: 151\n")
    assert (error.code, error.field, error.value) == ("over_limit", "steps", 151)
    assert "150" in error.fix


# --- image paths -------------------------------------------------------------------------------


def test_inbox_relative_from_a_subfolder_job() -> None:
    assert inbox_relative("sub/j.yaml", "x.png") == "sub/x.png"
    assert inbox_relative("sub/j.yaml", "../x.png") == "x.png"
    assert inbox_relative("sub/j.yaml", "../../x.png") is None
    assert inbox_relative("sub/j.yaml", "/x.png") is None
    assert inbox_relative("j.yaml", "../x.png") is None
    assert inbox_relative("j.yaml", "sub/../../x.png") is None


def test_an_image_path_may_go_up_to_the_inbox_root() -> None:
    [spec] = parse("task: img2img\nimage: ../x.png\n", path="sub/j.yaml")
    assert spec.image == "../x.png"


@pytest.mark.parametrize("image", ["../../x.png", "/etc/x.png", "..\\x.png"])
def test_an_image_path_that_leaves_the_inbox_is_refused(image: str) -> None:
    error = rejected(f"task: img2img\nimage: '{image}'\n", path="sub/j.yaml")
    assert (error.code, error.field, error.value) == ("path_escapes", "image", image)
    assert error.fix


def test_an_image_that_is_not_an_image_type_is_refused() -> None:
    error = rejected("task: img2img\nimage: sketch.gif\n")
    assert (error.field, error.value) == ("image", "sketch.gif")


# --- not a job ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "\n", "---\n", "---\n---\n", "# only a comment\n"])
def test_a_file_without_a_document_is_not_a_job(text: str) -> None:
    error = rejected(text, path="empty.yaml")
    assert error.code == "not_a_job"
    assert error.path == "empty.yaml"
    assert error.fix


@pytest.mark.parametrize(("text", "index"), [("- a\n- b\n", 1), ("prompt: a\n---\n- x\n", 2), ("just words\n", 1)])
def test_a_document_that_is_not_a_mapping_is_not_a_job(text: str, index: int) -> None:
    error = rejected(text)
    assert error.code == "not_a_job"
    assert error.job_index == index
    assert error.fix


def test_yaml_syntax_error_says_where() -> None:
    error = rejected("prompt: a\nsteps: [4\n")
    assert error.code == "yaml_syntax"
    assert "line" in error.message
    assert error.fix


def test_validate_job_alone_gives_the_same_spec_as_parsing() -> None:
    document = {"prompt": "a fox", "seed": 3}
    assert validate_job(document, path="j.yaml", index=1, rules=RULES) == parse("prompt: a fox\nseed: 3\n")[0]


# --- seeds -------------------------------------------------------------------------------------


def test_fill_seed_picks_a_seed_when_there_is_none() -> None:
    [spec] = parse("prompt: a\n")
    assert spec.seed is None
    filled = [fill_seed(spec) for _ in range(4)]
    for f in filled:
        assert f.seed is not None and 0 <= f.seed <= SEED_MAX
        assert f.model_copy(update={"seed": None}) == spec  # nothing else changed
    assert len({f.seed for f in filled}) > 1  # random, not a constant


def test_fill_seed_keeps_a_given_seed() -> None:
    [spec] = parse("prompt: a\nseed: 1234\n")
    assert fill_seed(spec).seed == 1234


def test_seeds_for_counts_up_from_the_seed() -> None:
    [spec] = parse("seed: 10\ncount: 3\n")
    assert seeds_for(spec) == [10, 11, 12]


def test_seeds_for_wraps_at_2_to_the_32() -> None:
    [spec] = parse(f"seed: {2**32 - 2}\ncount: 3\n")
    assert seeds_for(spec) == [2**32 - 2, 2**32 - 1, 0]


def test_seeds_for_refuses_an_unfilled_seed() -> None:
    [spec] = parse("prompt: a\n")
    with pytest.raises(ValueError):
        seeds_for(spec)


# --- claim records -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "prompt: a, b\nnegative_prompt: c\nsize: 64x128\nscheduler: euler_a\nseed: 5\ncount: 2\n"
        "output: {format: webp, quality: 80}\n",
        "task: img2img\nimage: ../x.png\nstrength: 0.5\nsize: [64, 64]\n",
        "task: upscale\nimage: a.png\nmethod: lanczos\nscale: 2.5\n",
        "task: upscale\nimage: a.png\nnoise_level: 30\nseed: 9\n",
    ],
)
def test_spec_round_trips_through_json(text: str) -> None:
    [spec] = parse(text, path="sub/j.yaml")
    again = spec_from_dict(spec.model_dump(mode="json"))
    assert again == spec
    assert type(again) is type(spec)


def test_model_defaults_sit_between_task_defaults_and_the_job() -> None:
    rules = Rules(
        models={"sd21": ModelKind.SD2, "test": ModelKind.SD1},
        defaults={"all": {"model": "sd21", "negative_prompt": "from all"}},
        model_defaults={"sd21": {"negative_prompt": "lowres, bad anatomy", "steps": 25}},
    )
    [spec] = parse_job_text("prompt: x\n", path="j.yaml", rules=rules)
    assert (spec.negative_prompt, spec.steps) == ("lowres, bad anatomy", 25)
    [spec] = parse_job_text("prompt: x\nsteps: 9\n", path="j.yaml", rules=rules)
    assert spec.steps == 9
    [spec] = parse_job_text("prompt: x\nmodel: test\n", path="j.yaml", rules=rules)
    assert spec.negative_prompt == "from all", "another model's defaults do not apply"


def test_txt2img_size_defaults_to_the_models_native_size() -> None:
    rules = Rules(models={"v": ModelKind.SD2, "xl": ModelKind.SDXL}, defaults={}, native_sizes={"v": 768, "xl": 1024})
    [spec] = parse_job_text("prompt: x\nmodel: v\n", path="j.yaml", rules=rules)
    assert spec.size == (768, 768)
    [spec] = parse_job_text("prompt: x\nmodel: xl\nsize: 832x1216\n", path="j.yaml", rules=rules)
    assert spec.size == (832, 1216)


def test_depth2img_needs_a_depth_model() -> None:
    rules = Rules(models={"depth": ModelKind.DEPTH2IMG, "test": ModelKind.SD1}, defaults={})
    [spec] = parse_job_text("task: depth2img\nmodel: depth\nimage: a.png\nprompt: x\n", path="j.yaml", rules=rules)
    assert spec.strength == 0.8
    with pytest.raises(JobRejected) as caught:
        parse_job_text("task: depth2img\nmodel: test\nimage: a.png\n", path="j.yaml", rules=rules)
    assert caught.value.field == "model" and "depth" in caught.value.message


# --- what a job runs at, and which jobs may share a call ------------------------------------------

OWN_SIZES = Rules(models=MODELS, defaults={"all": {"model": "test"}, "upscale": {"model": "x4"}})
"""No default `size:`, so img2img runs at its input's size."""


def test_each_task_says_its_run_size_output_size_and_steps() -> None:
    txt, img, up, lanczos = parse(
        "prompt: a\nsize: 64x32\n---\ntask: img2img\nimage: a.png\nstrength: 0.5\nsteps: 10\n---\n"
        "task: upscale\nimage: a.png\n---\ntask: upscale\nimage: a.png\nmethod: lanczos\nscale: 2.5\n",
        rules=OWN_SIZES,
    )
    assert (txt.run_size(None), txt.output_size(None), txt.denoise_steps()) == ((64, 32), (64, 32), 30)
    assert (img.run_size((103, 61)), img.denoise_steps(), img.input_image) == ((96, 56), 5, "a.png")
    assert (up.run_size((103, 61)), up.output_size((103, 61))) == ((103, 61), (412, 244))
    assert (lanczos.output_size((103, 61)), lanczos.uses_model) == ((258, 152), False)


def test_inputs_that_crop_alike_share_an_img2img_call_but_the_x4_upscaler_takes_sizes_as_they_are() -> None:
    """x4 runs on the input as it is: 100 and 103 px inputs in one call made the pipeline fail, both jobs."""
    [img] = parse("task: img2img\nimage: a.png\n", rules=OWN_SIZES)
    [up] = parse("task: upscale\nimage: a.png\n", rules=OWN_SIZES)
    [lanczos] = parse("task: upscale\nimage: a.png\nmethod: lanczos\nscale: 2\n", rules=OWN_SIZES)
    assert img.batch_key((100, 100)) == img.batch_key((103, 103))  # both run at 96x96
    assert up.batch_key((100, 100)) != up.batch_key((103, 103))
    assert lanczos.batch_key((100, 100)) is None  # no model call to share


def test_a_record_as_a_job_file_leaves_out_only_defaults_the_config_does_not_change() -> None:
    """The status page's "copy as job file": a field at its default goes, unless a config default would change it."""
    from diffusiond.pipeline.job import job_file_fields

    record = {"task": "txt2img", "prompt": "a fox", "negative_prompt": "", "steps": 30, "seed": 7, "scheduler": None}
    record |= {"output": {"format": "png", "quality": 95, "name": None}, "then": [], "guidance": 5.0}
    assert job_file_fields(record) == {"task": "txt2img", "prompt": "a fox", "seed": 7, "guidance": 5.0}
    # An SD 2 model's default negative prompt, a config's default steps: the job ran without them.
    kept = job_file_fields(record, keep={"negative_prompt", "steps"})
    assert kept == {"task": "txt2img", "prompt": "a fox", "negative_prompt": "", "steps": 30, "seed": 7} | {
        "guidance": 5.0
    }
