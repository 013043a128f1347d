"""A job's life around generation, through a real daemon on the stand-in generator.

What happens when generation fails (a diffusiond bug, a failing model), when a file in the
inbox is not a plain file, and when a claim left by an older version resumes. The pixels are
not the subject here: tests/test_end_to_end.py runs the same daemon on real diffusers.
"""

from __future__ import annotations

import json
import os
import threading

import pytest

from diffusiond.daemon.claim import Claim
from diffusiond.daemon.service import Daemon
from diffusiond.pipeline.errors import Code, JobFailed
from diffusiond.pipeline.standin import StandInGenerator
from tests.conftest import CEILING_S, Spool, make_daemon_folders, start_daemon_thread, wait_for, write_config
from tests.test_end_to_end import sketch_png


def after(spool: Spool) -> dict:
    """The daemon still runs: a good job dropped now is done."""
    spool.drop("after.yaml", "prompt: the daemon still runs\n")
    return wait_for(lambda: [m for m in spool.manifests() if m["source"] == "after.yaml"], what="the next job")[0]


def test_an_internal_error_in_generation_fails_the_claim_with_a_report_and_the_daemon_goes_on(spool: Spool) -> None:
    standin = StandInGenerator(fail_with={"boom": RuntimeError("injected bug")})
    with start_daemon_thread(spool, standin) as daemon:
        spool.drop("boom.yaml", "prompt: boom\n")
        [report] = wait_for(spool.reports, what="the report")
        after(spool)
        status = daemon.board.snapshot()
    assert report["code"] == "generation_failed" and report["file"] == "boom.yaml"
    # The status agrees with the files (R1): one failure, counted, its event written, nothing left running.
    assert (status["counters"]["failed"], status["counters"]["done"], status["running"]) == (1, 1, [])
    assert [f["source"] for f in status["last_failures"]] == ["boom.yaml"]
    events = [json.loads(line) for line in (spool.root / "state" / "events.jsonl").read_text().splitlines()]
    assert [e["source"] for e in events if e["event"] == "failed"] == ["boom.yaml"]
    assert report["error"] == "internal error: RuntimeError: injected bug"
    assert "diffusiond bug" in report["fix"]
    assert (spool.failed / "boom.yaml").read_text() == "prompt: boom\n"
    assert [m["source"] for m in spool.manifests()] == ["after.yaml"]


def test_an_internal_error_in_job_2_keeps_job_1_published_and_named_in_the_report(spool: Spool) -> None:
    with start_daemon_thread(spool, StandInGenerator(fail_with={"second": RuntimeError("injected bug")})):
        spool.drop("two.yaml", "prompt: first\n---\nprompt: second\n")
        [report] = wait_for(spool.reports, what="the report")
    [manifest] = spool.manifests()
    assert (report["code"], report["job"]) == ("generation_failed", 2)
    assert report["finished_jobs"] == [manifest["job_id"]], "job 1's outputs stay, and the report says so"


def test_a_failing_model_names_the_job_and_the_fix(spool: Spool) -> None:
    failure = JobFailed("model 'test' could not be loaded from /x", code=Code.MODEL_FAILED, field="model", fix="fix it")
    with start_daemon_thread(spool, StandInGenerator(fail_with={"second": failure})):
        spool.drop("two.yaml", "prompt: first\n---\nprompt: second\n")
        [report] = wait_for(spool.reports, what="the report")
        after(spool)
    assert (report["code"], report["file"], report["job"], report["field"]) == ("model_failed", "two.yaml", 2, "model")
    assert report["fix"] == "fix it"
    assert len(report["finished_jobs"]) == 1, "job 1 was made before job 2 failed"


def test_a_pipe_named_like_a_job_file_lands_in_failed_and_hangs_nothing(spool: Spool, standin_daemon: Daemon) -> None:
    os.mkfifo(spool.inbox / "pipe.yaml")  # a plain open() would block until someone writes to it
    [report] = wait_for(spool.reports, what="the report")
    assert (report["code"], report["file"]) == ("not_a_job", "pipe.yaml")
    assert "not a plain file" in report["error"] and report["fix"]
    assert (spool.failed / "pipe.yaml").is_fifo()
    after(spool)


def test_a_pipe_named_like_an_image_is_a_bad_image(spool: Spool, standin_daemon: Daemon) -> None:
    os.mkfifo(spool.inbox / "sketch.png")
    spool.drop("sketch.yaml", "task: img2img\nprompt: x\n")
    [report] = wait_for(spool.reports, what="the report")
    assert (report["code"], report["file"], report["field"], report["value"]) == (
        "bad_image",
        "sketch.yaml",
        "image",
        "sketch.png",
    )
    assert "not a plain file" in report["error"]
    after(spool)


def test_a_link_to_an_endless_device_is_left_alone(spool: Spool, standin_daemon: Daemon) -> None:
    os.symlink("/dev/zero", spool.inbox / "zero.yaml")  # read, it would never end
    manifest = after(spool)
    assert manifest["source"] == "after.yaml"
    assert (spool.inbox / "zero.yaml").is_symlink() and spool.reports() == []


@pytest.mark.parametrize(
    ("data", "code", "says"),
    [
        (b"prompt: " + b"x" * 2_000 + b"\n", "over_limit", "over the limit of 1000"),
        (b"prompt: caf\xe9\n", "yaml_syntax", "not UTF-8 text"),
    ],
    ids=["too-big", "latin-1"],
)
def test_a_job_file_too_big_or_not_utf8_gets_one_clear_report(
    spool: Spool, test_models, data: bytes, code: str, says: str
) -> None:
    write_config(spool.root, test_models, limits={"max_file_bytes": 1000})
    with start_daemon_thread(spool, StandInGenerator()):
        spool.drop("odd.yaml", data)
        [report] = wait_for(spool.reports, what="the report")
        after(spool)
    assert (report["code"], report["file"]) == (code, "odd.yaml")
    assert says in report["error"] and report["fix"]
    assert (spool.failed / "odd.yaml").read_bytes() == data


def test_jobs_json_keeps_the_image_name_where_the_previous_version_reads_it(spool: Spool) -> None:
    """The probe goes beside the name: a claim this version wrote still resumes under the previous one."""
    from diffusiond.daemon.claim import claim, load_jobs
    from diffusiond.daemon.pairing import Intent

    config = spool.config
    spool.drop("fox.png", sketch_png(size=(64, 48)))
    spool.drop("fox.yaml", "task: img2img\nprompt: a fox\nseed: 5\n")
    make_daemon_folders(config)
    claimed = claim(Intent("fox.yaml", ("fox.yaml", "fox.png")), config)
    assert claimed is not None
    [job] = load_jobs(claimed, config)
    [record] = json.loads((claimed.folder / "jobs.json").read_text())
    assert record["image"] == "fox.png"
    assert record["probe"] == {"size": [64, 48], "sha256": job.image.sha256 if job.image else None}
    [again] = load_jobs(claimed, config)  # read back, as a resumed claim
    assert again == job


def run_oneshot(spool: Spool, generator: StandInGenerator) -> None:
    """`diffusiond run --oneshot` in a thread (the main thread would take pytest's signals)."""
    daemon = Daemon(spool.config, oneshot=True, generator_factory=lambda _config: generator)
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    thread.join(CEILING_S)
    assert not thread.is_alive(), "the one-shot daemon did not finish"


def test_a_claim_left_by_the_previous_version_resumes(spool: Spool) -> None:
    """Its jobs.json names the input image by path only (no probe): the image is probed on resume."""
    folder = spool.root / "work" / "test" / "fox-20261130-000000-abcd"
    (folder / "inbox").mkdir(parents=True)
    (folder / "inbox" / "fox.yaml").write_text("task: img2img\nprompt: a fox\nseed: 5\n")
    (folder / "inbox" / "fox.png").write_bytes(sketch_png(size=(64, 48)))
    Claim(folder.name, folder, "fox.yaml", ("fox.yaml", "fox.png"), claimed_at=1.0).save()
    spec = {"task": "img2img", "prompt": "a fox", "seed": 5, "model": "test", "steps": 4, "image": None}
    record = {"job_id": folder.name, "index": 1, "image": "fox.png", "spec": spec}
    (folder / "jobs.json").write_text(json.dumps([record]))
    run_oneshot(spool, StandInGenerator())
    [manifest] = spool.manifests()
    assert manifest["input_image"]["file"] == "fox.png" and manifest["seeds"] == [5]
    assert (manifest["outputs"][0]["width"], manifest["outputs"][0]["height"]) == (64, 48)
    assert sorted(p.name for p in spool.archive.iterdir()) == ["fox.png", "fox.yaml"]
    assert spool.claims() == []
