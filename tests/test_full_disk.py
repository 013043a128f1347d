"""A full disk, for real: the spool on a small tmpfs filled to the last page while jobs run.

Nothing partial becomes visible, no input is failed for it (the input is fine), the daemon says
why in its status and log, and the jobs go through once space returns. Mounting needs root
(CI runs as root); elsewhere these tests are skipped with the reason.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest

from diffusiond.pipeline.errors import Code, JobFailed
from diffusiond.pipeline.standin import Gate, StandInGenerator
from tests.conftest import CEILING_S, Spool, figure, start_daemon_thread, wait_for, write_config
from tests.spool_checks import check_spool


@pytest.fixture
def full_spool(small_disk: Path, tmp_path: Path, test_models) -> Spool:
    root = small_disk / "spool"
    (root / "inbox").mkdir(parents=True)
    config = write_config(root, test_models, state_dir=str(tmp_path / "state"), disk_full_retry_s=0.2)
    return Spool(root, config)


def fill(disk: Path) -> Path:
    """Write zeros until the disk says ENOSPC; the file is the space to give back."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as handle:
        for chunk in (1 << 20, 1 << 12):
            try:
                while True:
                    handle.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    return filler


def test_a_disk_full_while_staging_and_failing_loses_nothing_and_goes_on_once_space_returns(
    full_spool: Spool, small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = full_spool
    gate = Gate(prompt="a full disk")
    broken = JobFailed("the model broke", code=Code.MODEL_FAILED, field="model", fix="fix the model")
    generator = StandInGenerator(gate=gate, fail_with={"boom": broken})
    text = b"prompt: a full disk\nseed: 2\n---\nprompt: boom\n"
    with caplog.at_level(logging.INFO), start_daemon_thread(spool, generator) as daemon:
        spool.drop("full.yaml", text)
        assert gate.held.wait(CEILING_S), "the job reached its first step"
        try:
            filler = fill(small_disk)
        finally:
            gate.release()  # job 1 is staged on a full disk; job 2 fails, and its report needs space too
        status = wait_for(lambda: (s := daemon.board.snapshot()).get("waiting") and s, what="waiting in status")
        assert "disk full" in status["waiting"]
        assert spool.visible_outputs() == [], "nothing partial is visible"
        assert list(spool.failed.iterdir()) == [], "not failed for a full disk"
        assert len(spool.claims()) == 1, "the claim waits in work/"
        filler.unlink()
        [report] = wait_for(spool.reports, what="the report once space returned")
    assert (report["code"], report["file"], report["job"]) == ("model_failed", "full.yaml", 2)
    assert len(report["finished_jobs"]) == 1, "job 1 was published once space returned"
    check_spool(spool, {"full.yaml": text}, jobs=1, failed={"full.yaml"})
    assert any("disk full" in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    tries = sum("disk full" in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    figure(
        f"full disk while staging and failing: {tries} deferrals, then 1 job published, 1 failed as it should, 0 lost"
    )


def test_a_job_dropped_on_a_full_disk_waits_in_the_inbox_then_runs(
    full_spool: Spool, small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = full_spool
    text = b"prompt: claimed once there is room\nseed: 6\n"
    waiting = spool.inbox / ".later.yaml.part"
    waiting.write_bytes(text)
    filler = fill(small_disk)
    with caplog.at_level(logging.INFO), start_daemon_thread(spool, StandInGenerator()):
        os.rename(waiting, spool.inbox / "later.yaml")  # a rename needs no space
        wait_for(lambda: any("cannot claim later.yaml" in r.getMessage() for r in caplog.records), what="the error")
        assert (spool.inbox / "later.yaml").read_bytes() == text and spool.claims() == []
        filler.unlink()
        wait_for(spool.manifests, what="the job once space returned")
    [manifest] = check_spool(spool, {"later.yaml": text}, jobs=1)
    assert manifest["seeds"] == [6]
    tries = sum("cannot claim later.yaml" in r.getMessage() for r in caplog.records)
    figure(f"full disk while claiming: {tries} claims refused, the file kept in the inbox, then done once")
