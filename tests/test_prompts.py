"""Prompts as A1111 users write them: its attention syntax parsed as A1111 does, weighted and chunked by compel."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from diffusiond.pipeline.errors import JobRejected
from diffusiond.pipeline.families import ModelKind
from diffusiond.pipeline.job import Rules, parse_job_text
from diffusiond.pipeline.prompts import BREAK, encode, parse_attention, plain_text
from tests.conftest import Spool, start_daemon_thread, wait_for

RULES = Rules(models={"sd": ModelKind.SD1}, defaults={"all": {"model": "sd"}})
LONG = ", ".join(f"a lighthouse number {n} on a rock" for n in range(25))  # about 200 tokens


@pytest.mark.parametrize(
    ("prompt", "parsed"),
    [  # A1111's own examples (modules/prompt_parser.py, parse_prompt_attention's docstring)
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ],
        ),
        ("a fox BREAK a sky", [("a fox", 1.0), ("BREAK", BREAK), ("a sky", 1.0)]),
    ],
)
def test_the_a1111_syntax_is_parsed_as_a1111_parses_it(prompt: str, parsed: list[tuple[str, float]]) -> None:
    assert parse_attention(prompt) == parsed


def test_the_words_without_the_syntax() -> None:
    assert plain_text("a (red:1.5) fox BREAK [sky]") == "a red fox sky"


@pytest.fixture(scope="module")
def sd(test_models: Any) -> Any:
    return StableDiffusionPipeline.from_pretrained(test_models.sd, safety_checker=None)


def conditioning(pipe: Any, prompt: str, negative: str = "") -> torch.Tensor:
    """The prompt's conditioning as the pipeline gets it (its own encoder for plain text)."""
    encoded = encode(pipe, [prompt], [negative])
    if "prompt_embeds" in encoded.kwargs:
        return encoded.kwargs["prompt_embeds"]
    return pipe.encode_prompt(prompt, "cpu", 1, True, negative)[0]


def test_a_weight_changes_the_conditioning_and_a_weight_of_one_does_not(sd: Any) -> None:
    plain = conditioning(sd, "a red fox")
    assert encode(sd, ["a red fox"], [""]).encodings[0].method == "text"  # as before: the pipeline's own encoding
    assert torch.equal(conditioning(sd, "a (red:1.0) fox"), plain)
    assert not torch.allclose(conditioning(sd, "a (red:1.5) fox"), plain)
    assert not torch.allclose(conditioning(sd, "a ((red)) fox"), plain)
    assert not torch.allclose(conditioning(sd, "a [red] fox"), plain)


def test_a_long_prompt_is_encoded_whole_in_windows_and_its_negative_padded_alike(sd: Any) -> None:
    encoded = encode(sd, [LONG], ["blurry"])
    [how] = encoded.encodings
    assert how.method == "compel" and how.tokens > 150 and how.windows >= 3 and not how.truncated
    embeds, negative = encoded.kwargs["prompt_embeds"], encoded.kwargs["negative_prompt_embeds"]
    assert embeds.shape[1] == negative.shape[1] == 77 * how.windows
    assert encode(sd, ["a fox BREAK a sky"], [""]).kwargs["prompt_embeds"].shape[1] == 154


def test_sdxl_gets_both_encoders_and_the_pooled_embedding(family_models: Any) -> None:
    pipe = StableDiffusionXLPipeline.from_pretrained(family_models.sdxl)
    own = pipe.encode_prompt("a red fox", device="cpu", negative_prompt="blurry")
    same = encode(pipe, ["a (red:1.0) fox"], ["blurry"]).kwargs
    assert torch.allclose(same["prompt_embeds"], own[0], atol=1e-6)
    assert torch.allclose(same["pooled_prompt_embeds"], own[2], atol=1e-6)
    weighted = encode(pipe, ["a (red:1.5) fox"], ["blurry"]).kwargs
    assert weighted["prompt_embeds"].shape == own[0].shape
    assert not torch.allclose(weighted["prompt_embeds"], own[0])


def test_a_weighted_and_a_long_prompt_run_through_the_daemon_and_say_how(spool: Spool) -> None:
    with start_daemon_thread(spool):
        spool.drop("plain.yaml", "prompt: a red fox\nseed: 3\n")
        spool.drop("weighted.yaml", "prompt: a (red:1.6) fox\nseed: 3\n")
        spool.drop("long.yaml", f"prompt: {LONG}\nnegative_prompt: (blurry:1.2)\nseed: 3\n")
        manifests = wait_for(lambda: len(spool.manifests()) == 3 and spool.manifests(), what="three jobs")
    by_source = {m["source"]: m for m in manifests}
    assert by_source["plain.yaml"]["prompt_encoding"]["method"] == "text"
    weighted = by_source["weighted.yaml"]["prompt_encoding"]
    assert (weighted["method"], weighted["weighted"], weighted["windows"]) == ("compel", True, 1)
    long = by_source["long.yaml"]["prompt_encoding"]
    assert long["method"] == "compel" and long["windows"] >= 3 and long["truncated"] is False
    images = {s: (spool.outbox / m["outputs"][0]["file"]).read_bytes() for s, m in by_source.items()}
    assert len(set(images.values())) == 3
    with Image.open(spool.outbox / by_source["weighted.yaml"]["outputs"][0]["file"]) as image:
        assert image.text["parameters"].startswith("a (red:1.6) fox\n")  # the prompt as written


@pytest.mark.parametrize(
    ("name", "ours"),
    [("DPM++ 2M Karras", "dpmpp_2m_karras"), ("DPM++ 2M", "dpmpp_2m"), ("Euler a", "euler_a"), ("euler A", "euler_a")],
)
def test_a1111_sampler_names_are_taken_as_ours(name: str, ours: str) -> None:
    [spec] = parse_job_text(f"prompt: x\nscheduler: {name}\n", path="a.yaml", rules=RULES)
    assert spec.scheduler == ours


@pytest.mark.parametrize(("field", "ours"), [("cfg_scale", "guidance"), ("sampler", "scheduler"), ("width", "size")])
def test_a1111_field_names_get_a_did_you_mean(field: str, ours: str) -> None:
    with pytest.raises(JobRejected) as caught:
        parse_job_text(f"prompt: x\n{field}: 7\n", path="a.yaml", rules=RULES)
    assert f"did you mean '{ours}'? '{field}' is AUTOMATIC1111's name for it" in str(caught.value)


@pytest.mark.parametrize("prompt", ["a [cat:dog:0.5] sitting", "a [cat|dog]"])
def test_prompt_editing_is_refused_not_misread_as_weights(prompt: str) -> None:
    with pytest.raises(JobRejected) as caught:
        parse_job_text(f"prompt: '{prompt}'\n", path="a.yaml", rules=RULES)
    assert caught.value.field == "prompt" and "prompt editing / alternation" in str(caught.value)
    [escaped] = parse_job_text("prompt: 'a \\[cat:dog\\]'\n", path="a.yaml", rules=RULES)
    assert parse_attention(escaped.prompt) == [("a [cat:dog]", 1.0)]


def test_clip_skip_2_conditions_on_the_layer_before_the_last_as_diffusers_does(sd: Any) -> None:
    tokens = sd.tokenizer("a red fox", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = sd.text_encoder(tokens, output_hidden_states=True).hidden_states[-2]
        own = sd.text_encoder.final_layer_norm(hidden)  # A1111's clip skip 2, diffusers' clip_skip=1
    assert not torch.allclose(own, conditioning(sd, "a red fox"))
    for prompt in ("a red fox", "a (red:1.0) fox"):
        encoded = encode(sd, [prompt], [""], clip_skip=2)
        assert encoded.encodings[0].method == "compel"
        assert torch.allclose(encoded.kwargs["prompt_embeds"], own, atol=1e-6)


def test_clip_skip_and_eta_run_through_the_daemon_and_are_in_the_infotext(spool: Spool) -> None:
    with start_daemon_thread(spool):
        spool.drop("base.yaml", "prompt: a fox\nseed: 4\nscheduler: ddim\n")
        spool.drop("skip.yaml", "prompt: a fox\nseed: 4\nscheduler: ddim\nclip_skip: 2\n")
        spool.drop("eta.yaml", "prompt: a fox\nseed: 4\nscheduler: ddim\neta: 1\n")
        spool.drop("bad.yaml", "prompt: a fox\nscheduler: euler\neta: 0.5\n")
        manifests = wait_for(lambda: len(spool.manifests()) == 3 and spool.reports() and spool.manifests(), what="jobs")
    by_source = {m["source"]: m for m in manifests}
    images = {s: (spool.outbox / m["outputs"][0]["file"]) for s, m in by_source.items()}
    pixels = {s: Image.open(p).convert("RGB").tobytes() for s, p in images.items()}
    assert pixels["skip.yaml"] != pixels["base.yaml"] and pixels["eta.yaml"] != pixels["base.yaml"]
    assert "Clip skip: 2" in Image.open(images["skip.yaml"]).text["parameters"]
    assert "Eta DDIM: 1" in Image.open(images["eta.yaml"]).text["parameters"]
    assert "Clip skip" not in Image.open(images["base.yaml"]).text["parameters"]
    [report] = spool.reports()
    assert (report["file"], report["field"]) == ("bad.yaml", "eta") and "DDIM's" in report["error"]


@pytest.mark.parametrize(
    ("job", "field", "says"),
    [
        ("model: xl\nclip_skip: 2\n", "clip_skip", "is for SD 1.x and 2.x"),
        ("prompt: 'a fox <lora:grain:much>'\n", "prompt", "weight that is not a number"),
        ("task: upscale\nmodel: x4\nloras: [{name: grain}]\n", "loras", "for txt2img and img2img"),
    ],
)
def test_knobs_a_model_cannot_take_are_refused(job: str, field: str, says: str) -> None:
    rules = Rules(
        models={"sd": ModelKind.SD1, "xl": ModelKind.SDXL, "x4": ModelKind.UPSCALER_X4},
        defaults={"all": {"model": "sd"}},
        loras={"grain": None},
    )
    with pytest.raises(JobRejected) as caught:
        parse_job_text(f"prompt: x\n{job}" if "prompt" not in job else job, path="a.yaml", rules=rules)
    assert caught.value.field == field and says in str(caught.value)
