"""Where a claim's files go when it ends: archive/, failed/ (with its report) or back to the inbox.

The only code that moves claimed files after the claim. Each ending moves the
inputs first and deletes the claim folder last, so a crash in between leaves a
claim folder that recovery finishes on the next start.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path

from diffusiond.daemon.claim import Claim
from diffusiond.daemon.config import Config
from diffusiond.daemon.fsutil import move_unique
from diffusiond.daemon.report import write_report
from diffusiond.pipeline.errors import DiffusiondError

log = logging.getLogger(__name__)


def mark_done(claim: Claim, job_id: str) -> None:
    """Record locally that a job's manifest is written, so recovery never runs it twice."""
    os.close(os.open(claim.folder / f"done-{job_id}", os.O_WRONLY | os.O_CREAT, 0o644))


def is_done(claim: Claim, job_id: str) -> bool:
    """Only a claim resumed after a stop or crash can have done jobs: a new one is not looked at."""
    return claim.resumed and (claim.folder / f"done-{job_id}").exists()


def done_jobs(claim: Claim) -> list[str]:
    return sorted(p.name.removeprefix("done-") for p in claim.folder.glob("done-*"))


def archive(claim: Claim, config: Config) -> list[Path]:
    """Success: inputs to archive/ (or deleted, with `on_success: delete`)."""
    moved = []
    for relative in claim.present():
        source = claim.inputs / relative
        if config.on_success == "delete":
            source.unlink()
        else:
            moved.append(move_unique(source, config.folder("archive"), Path(relative).name))
    shutil.rmtree(claim.folder)
    return moved


def fail(claim: Claim, config: Config, error: DiffusiondError) -> Path:
    """Failure: inputs to failed/, then `<stem>.error.yaml` beside them; returns the report's path."""
    failed = config.folder("failed")
    moved = [move_unique(claim.inputs / r, failed, Path(r).name) for r in claim.present()]
    stem = Path(moved[0].name if moved else claim.source).stem
    report = write_report(failed, stem, error, inputs=[p.name for p in moved], done_jobs=done_jobs(claim))
    shutil.rmtree(claim.folder)
    return report


def release(claim: Claim, config: Config) -> None:
    """Put a claim that has not started back into the inbox (warm stop), for this or another daemon."""
    for relative in claim.present():
        target = config.inbox / relative
        move_unique(claim.inputs / relative, target.parent, target.name)
    shutil.rmtree(claim.folder)


def leftover_claims(config: Config) -> list[Claim]:
    """Claims this daemon had when it stopped or crashed, oldest first."""
    claims: list[Claim] = []
    if not config.work_dir.is_dir():
        return claims
    for folder in sorted(config.work_dir.iterdir()):
        if folder.name.startswith(".") or not folder.is_dir():  # the lock (.owner), nothing claimed
            continue
        try:
            found = Claim.load(folder)
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("claim folder %s has no readable claim.json; its files go back to the inbox", folder)
            _return_orphans(folder, config)
            continue
        if found.source not in found.present():
            # Stopped between writing the record and the claiming rename: nothing was claimed.
            _return_orphans(folder, config)
            continue
        claims.append(dataclasses.replace(found, resumed=True))
    return sorted(claims, key=lambda c: c.claimed_at)


def _return_orphans(folder: Path, config: Config) -> None:
    inputs = folder / "inbox"
    for path in sorted(inputs.rglob("*")) if inputs.is_dir() else []:
        if path.is_file():
            target = config.inbox / path.relative_to(inputs)
            move_unique(path, target.parent, target.name)
    shutil.rmtree(folder, ignore_errors=True)
