"""examples/chain/: two real daemon processes chained by the example's on_done hook."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from PIL import Image

from tests.conftest import CEILING_S, REPO, Spool, start_daemon_process, wait_for, wait_until_ready, write_config

HANDOFF = REPO / "examples" / "chain" / "handoff.py"


def test_the_example_hook_hands_each_image_to_a_second_daemon(spool: Spool, test_models, tmp_path: Path) -> None:
    (tmp_path / "spool-b" / "inbox").mkdir(parents=True)
    second = Spool(tmp_path / "spool-b", write_config(tmp_path / "spool-b", test_models, instance="second"))
    write_config(
        spool.root, test_models, hooks={"on_done": [sys.executable, str(HANDOFF), "{manifest}", str(second.root)]}
    )
    first_daemon = start_daemon_process(spool.config_path, standin={})
    second_daemon = start_daemon_process(second.config_path)  # real diffusers: a Lanczos upscale needs no model
    try:
        wait_until_ready(spool.config_path, first_daemon)
        wait_until_ready(second.config_path, second_daemon)
        spool.drop("lighthouse.yaml", "prompt: a lighthouse at dusk\nseed: 3\ncount: 2\n")
        finals = wait_for(lambda: len(second.manifests()) == 2 and second.manifests(), what="two upscaled images")
    finally:
        for process in (first_daemon, second_daemon):
            process.send_signal(signal.SIGTERM)
            process.wait(CEILING_S)
    [made] = spool.manifests()
    assert [o["file"] for o in made["outputs"]] == [f"{made['job_id']}-1.png", f"{made['job_id']}-2.png"]
    assert all((spool.outbox / o["file"]).exists() for o in made["outputs"]), "the first outbox keeps its images"
    for final in finals:
        assert final["task"] == "upscale" and final["job"]["prompt"] == "a lighthouse at dusk"
        with Image.open(second.outbox / final["outputs"][0]["file"]) as image:
            assert image.size == (128, 128)
    handed = sorted(f["source"] for f in finals)  # each job file is named after the image it carries
    assert handed == sorted(f"{Path(o['file']).stem}.yaml" for o in made["outputs"]), handed


def test_the_example_stage_job_runs_as_one_job_through_a_real_daemon(spool: Spool) -> None:
    """examples/inbox/lighthouse.yaml: txt2img, a hires fix and the x4 upscaler, on the test models."""
    spool.drop("lighthouse.yaml", (REPO / "examples" / "inbox" / "lighthouse.yaml").read_bytes())
    process = start_daemon_process(spool.config_path, "--oneshot")
    assert process.wait(CEILING_S) == 0
    [made] = spool.manifests()
    assert [s["task"] for s in made["stages"]] == ["txt2img", "img2img", "upscale"]
    assert [s["model"]["name"] for s in made["stages"]] == ["test", "test", "test-x4"]
    assert [(o["width"], o["height"], o["seed"]) for o in made["outputs"]] == [(512, 512, 77), (512, 512, 78)]
    assert spool.visible_outputs() == sorted([*(o["file"] for o in made["outputs"]), f"{made['job_id']}.json"])
    with Image.open(spool.outbox / made["outputs"][0]["file"]) as image:
        parameters = image.text["parameters"]
    assert parameters.startswith("a lighthouse at dusk\nNegative prompt: blurry\n")
    assert "Seed: 77, Size: 64x64" in parameters and "Hires upscale: 2" in parameters
    assert "Postprocess upscale by: 4, Postprocess upscaler: SD x4 (test-x4)" in parameters
