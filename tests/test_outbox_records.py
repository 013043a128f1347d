"""The outbox's records: each manifest's schema and provenance fields, and (`outbox_failures: true`)
`<job_id>.failed.json`, so that one watched folder says "done" or "failed" for every job."""

from __future__ import annotations

import hashlib

import pytest

from diffusiond.pipeline.errors import JobFailed
from diffusiond.pipeline.standin import StandInGenerator
from tests.conftest import Spool, start_daemon_thread, wait_for, write_config
from tests.test_crash_and_stop import run_oneshot
from tests.test_fault_points import crash_at

THREE = b"prompt: first\nseed: 1\n---\nprompt: second\nseed: 2\n---\nprompt: third\nseed: 3\n"


def test_a_manifest_says_its_schema_status_claim_and_the_job_file_hash(spool: Spool, daemon) -> None:
    """Through real diffusers: what a tool downstream checks before it trusts a manifest."""
    job = b"prompt: a lighthouse\nseed: 9\n"
    spool.drop("light.yaml", job)
    spool.drop("typo.yaml", "promt: a typo\n")
    [manifest] = wait_for(spool.manifests, what="a manifest")
    assert (manifest["schema"], manifest["status"]) == (1, "done")
    assert manifest["source_sha256"] == hashlib.sha256(job).hexdigest()
    assert manifest["claim_id"] == manifest["job_id"] and manifest["claim_id"].startswith("light-")
    assert (manifest["attempt"], manifest["instance"]) == (1, "test")
    wait_for(lambda: (spool.failed / "typo.error.yaml").exists(), what="the typo's report")
    assert spool.failures() == [], "off by default: failures only in failed/"


def test_with_outbox_failures_each_job_ends_in_the_outbox_done_or_failed(spool: Spool, test_models) -> None:
    write_config(spool.root, test_models, outbox_failures=True)
    generator = StandInGenerator(fail_with={"second": JobFailed("the device fell over", fix="try again later")})
    with start_daemon_thread(spool, generator):
        spool.drop("three.yaml", THREE)
        spool.drop("typo.yaml", "promt: a typo\n")
        failures = wait_for(lambda: len(spool.failures()) == 2 and spool.failures(), what="two failure records")
    by_source = {f["source"]: f for f in failures}
    done = sorted(m["job_id"] for m in spool.manifests())
    assert [m["index"] for m in sorted(spool.manifests(), key=lambda m: m["index"])] == [1, 3]

    second = by_source["three.yaml"]
    assert (second["schema"], second["status"], second["index"]) == (1, "failed", 2)
    assert second["job_id"] == f"{second['claim_id']}-2" and sorted(second["finished_jobs"]) == done
    assert second["error"] == "the device fell over" and second["fix"] == "try again later"
    assert second["inputs"] == ["failed/three.yaml"] and second["report"] == "failed/three.error.yaml"
    assert (spool.root / second["inputs"][0]).read_bytes() == THREE
    assert second["source_sha256"] == hashlib.sha256(THREE).hexdigest()
    assert (second["attempt"], second["instance"]) == (1, "test")
    assert (spool.outbox / f"{second['job_id']}.failed.json").exists()

    typo = by_source["typo.yaml"]
    assert typo["job_id"] == typo["claim_id"] and typo["index"] == 1, "rejected before it had jobs: the claim id"
    assert typo["field"] == "promt" and "did you mean 'prompt'" in typo["error"] and typo["fix"]
    assert typo["report"] == "failed/typo.error.yaml" and typo["finished_jobs"] == []


@pytest.mark.parametrize("point", ["after_archive_input", "before_remove_claim"])
def test_a_kill_while_failing_leaves_one_report_and_one_failure_record(spool: Spool, test_models, point: str) -> None:
    write_config(spool.root, test_models, outbox_failures=True)
    spool.drop("bad.yaml", "prompt: [unclosed\n")
    crash_at(spool, point)
    run_oneshot(spool)
    [failure] = spool.failures()
    assert failure["source"] == "bad.yaml" and failure["code"] == "yaml_syntax", failure
    assert [r["file"] for r in spool.reports()] == ["bad.yaml"] and failure["inputs"] == ["failed/bad.yaml"]
    assert spool.claims() == [] and list(spool.inbox.iterdir()) == []
