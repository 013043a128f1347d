"""`output: {name: ...}`: image names from a template, checked at validation, never replacing a file."""

from __future__ import annotations

import hashlib

from tests.conftest import Spool, wait_for

JOB = "prompt: a lamp\nseed: 5\ncount: 2\noutput: {name: '{stem}-{seed}-{n}'}\n"


def test_images_are_named_by_the_template_and_a_second_run_gets_new_names(spool: Spool, daemon) -> None:
    """Through real diffusers: the same job twice, the same names asked for, no file replaced."""
    spool.drop("lamp.yaml", JOB)
    [first] = wait_for(spool.manifests, what="the first manifest")
    assert [o["file"] for o in first["outputs"]] == ["lamp-5-1.png", "lamp-6-2.png"]
    hashes = {
        name: hashlib.sha256((spool.outbox / name).read_bytes()).hexdigest()
        for name in ("lamp-5-1.png", "lamp-6-2.png")
    }
    assert hashes == {o["file"]: o["sha256"] for o in first["outputs"]}

    wait_for(lambda: (spool.archive / "lamp.yaml").exists(), what="the first run archived")
    spool.drop("lamp.yaml", JOB)
    manifests = wait_for(lambda: len(spool.manifests()) == 2 and spool.manifests(), what="the second manifest")
    [second] = [m for m in manifests if m["job_id"] != first["job_id"]]
    assert [o["file"] for o in second["outputs"]] == ["lamp-5-1-2.png", "lamp-6-2-2.png"]
    for name, digest in hashes.items():
        assert hashlib.sha256((spool.outbox / name).read_bytes()).hexdigest() == digest, f"{name} was replaced"


def test_a_template_naming_an_unknown_field_or_a_path_is_rejected(spool: Spool, daemon) -> None:
    spool.drop("typo.yaml", "prompt: x\noutput: {name: '{stem}-{sed}'}\n")
    spool.drop("path.yaml", "prompt: x\noutput: {name: '../{stem}'}\n")
    reports = wait_for(lambda: len(spool.reports()) == 2 and spool.reports(), what="two reports")
    by_file = {r["file"]: r for r in reports}
    assert by_file["typo.yaml"]["field"] == "output.name"
    assert "'sed' is not a field of output.name; fields: {stem}, {job_id}, {seed}, {n}" in by_file["typo.yaml"]["error"]
    assert "plain file name" in by_file["path.yaml"]["error"]
    assert list(spool.outbox.glob("*.png")) == []
