"""The error tree: reports that read back as the same error, and context attached on the way out."""

from __future__ import annotations

import pytest
import yaml

from diffusiond.pipeline.errors import Code, ConfigError, DiffusiondError, JobFailed, JobRejected, job_context

ERRORS = [
    JobRejected(
        "unknown field 'promt' (did you mean 'prompt'?)",
        field="promt",
        value="a hamster",
        fix="rename or remove 'promt'",
        path="hamster.yaml",
        job_index=2,
    ),
    JobRejected("not valid YAML at line 2", code=Code.YAML_SYNTAX, path="bad.yaml", fix="fix the YAML syntax"),
    JobRejected("bare image and no job file came with it", code=Code.NO_JOB_FOR_IMAGE, path="sketches/cat.png"),
    JobFailed("model 'sd15' could not be loaded", code=Code.MODEL_FAILED, field="model", value="sd15", fix="check"),
    JobFailed("cannot write the results", code=Code.OUTPUT_FAILED, path="a.yaml", job_index=1, fix="free space"),
    JobFailed("the mark did not survive", code=Code.WATERMARK_FAILED),
    ConfigError("dtype fp16 cannot run on the CPU", field="dtype", value="fp16", fix="use `dtype: auto`"),
]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: str(e.code))
def test_from_report_is_the_inverse_of_report(error: DiffusiondError) -> None:
    report = yaml.safe_load(yaml.safe_dump(error.report()))  # as it is written to failed/ and read back
    again = DiffusiondError.from_report(report)
    assert type(again) is type(error)
    assert again.report() == error.report()
    assert str(again) == str(error)


def test_every_code_reads_back_as_its_branch_of_the_tree() -> None:
    failed = {
        Code.MODEL_FAILED,
        Code.GENERATION_FAILED,
        Code.WATERMARK_FAILED,
        Code.OUTPUT_FAILED,
        Code.CRASHED,
        Code.NODE_LOST,
    }
    for code in Code:
        error = DiffusiondError.from_report({"code": str(code), "error": "x"})
        expected = ConfigError if code is Code.CONFIG else JobFailed if code in failed else JobRejected
        assert type(error) is expected and error.code is code


def test_job_context_fills_in_only_what_the_raiser_left_unset() -> None:
    with pytest.raises(JobRejected) as caught, job_context(path="fox.yaml", job_index=3, field="image", value="x.png"):
        raise JobRejected("not a readable image", code=Code.BAD_IMAGE)
    assert (caught.value.path, caught.value.job_index, caught.value.field, caught.value.value) == (
        "fox.yaml",
        3,
        "image",
        "x.png",
    )
    with pytest.raises(JobRejected) as caught, job_context(path="outer.yaml", job_index=1, field="model", value="m"):
        raise JobRejected("too many steps", path="inner.yaml", field="steps", value=900)
    assert (caught.value.path, caught.value.job_index, caught.value.field, caught.value.value) == (
        "inner.yaml",
        1,
        "steps",
        900,
    )


def test_job_context_leaves_other_exceptions_alone() -> None:
    with pytest.raises(KeyError), job_context(path="fox.yaml"):
        raise KeyError("not ours")
