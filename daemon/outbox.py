"""Committing a job: stage its files in the claim folder, then publish them into the outbox, manifest last.

1. `stage` writes every file (fsynced) under `<claim folder>/stage/<job_id>/`, then the
   manifest there last, by rename: a stage with its manifest is complete.
2. `publish` links each staged file into the outbox under its name (a link never
   replaces: a name already taken fails, unless it is this very file, from an
   interrupted publish), fsyncs the outbox, then links the manifest, fsyncs again,
   and removes the stage. The manifest's appearance is the job's commit: a tool
   that waits for `<job_id>.json` never sees half a job, and a job whose manifest
   exists is never run again.

When the outbox is on another filesystem than work/ (EXDEV), each file is copied to
a hidden temp name in the outbox, fsynced, and linked into place: files still appear
whole and the manifest last, but a crash can leave a hidden temp file, removed when
that job is published again. Where the outbox has no links (SMB, FAT), a file takes
its name by an `O_EXCL` placeholder and a rename.

A fenced claim (its folder renamed by the process that resumed it) finds its stage
gone: `FileNotFoundError`, which the worker turns into the FENCED ending.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
from pathlib import Path

from diffusiond.daemon.faults import fault_point
from diffusiond.daemon.fsutil import NO_LINKS, atomic_write, copy_synced, fsync_dir, same_bytes, same_file, write_new
from diffusiond.pipeline.errors import Code, JobFailed
from diffusiond.pipeline.job import Job
from diffusiond.pipeline.provenance import output_name

STAGE = "stage"


class OutboxConflict(JobFailed):
    """A name in the outbox is taken by a file this job did not make: nothing of the job was published."""

    code = Code.OUTPUT_FAILED


def stage_dir(claim_folder: Path, job_id: str) -> Path:
    return claim_folder / STAGE / job_id


def staged(claim_folder: Path, job_id: str) -> Path | None:
    """The job's stage when it is complete (its manifest written), else None."""
    folder = stage_dir(claim_folder, job_id)
    return folder if (folder / f"{job_id}.json").is_file() else None


def is_published(outbox: Path, job_id: str) -> bool:
    """The job's manifest is in the outbox (an empty file is an SMB placeholder a crash left, not one)."""
    try:
        return os.lstat(outbox / f"{job_id}.json").st_size > 0
    except FileNotFoundError:
        return False


def discard_unpublished(outbox: Path, job: Job) -> None:
    """Remove what the previous version left of an interrupted job (it wrote images straight into the
    outbox, then the manifest): only for a claim it left, whose job has no manifest."""
    if is_published(outbox, job.job_id):
        return
    images = [output_name(job, n) for n in range(1, job.spec.count + 1)]
    names = [f"{job.job_id}.json", *images, *(f"{Path(i).stem}{x}" for i in images for x in (".txt", ".json"))]
    for name in names[1:]:
        (outbox / name).unlink(missing_ok=True)
    for name in names:  # its temp files: `.<name>.<pid>.tmp`
        for leftover in outbox.glob(f".{glob.escape(name)}.*.tmp"):
            leftover.unlink(missing_ok=True)


def stage(claim_folder: Path, job_id: str, files: list[tuple[str, bytes]], manifest: bytes) -> Path:
    """Write the job's files into its stage, the manifest last; returns the stage folder.

    An earlier incomplete stage of the job is removed first. Never creates the claim
    folder: in a fenced one this raises FileNotFoundError. On any error the incomplete
    stage is removed again, so a full disk leaves nothing behind.
    """
    (claim_folder / STAGE).mkdir(exist_ok=True)  # no parents=True: a fenced claim folder stays gone
    folder = stage_dir(claim_folder, job_id)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(folder)
    folder.mkdir()
    try:
        for name, data in files:
            write_new(folder / name, data)
            fault_point("after_stage_image")
        fault_point("before_manifest")
        atomic_write(folder / f"{job_id}.json", manifest)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    fault_point("after_stage")
    return folder


def publish(folder: Path, outbox: Path, job_id: str) -> list[str]:
    """Link the staged files into the outbox, the manifest last, then drop the stage; returns the names.

    Repeatable: a publish interrupted by a crash is finished by publishing the same stage
    again. On an error before the manifest, the files this call linked are unlinked again
    (no manifest, so nothing was published); the stage is kept for the next try.
    """
    manifest = f"{job_id}.json"
    names = sorted(p.name for p in folder.iterdir() if p.name != manifest and not p.name.startswith("."))
    linked: list[Path] = []
    try:
        for name in names:
            if _place(folder / name, outbox / name):
                linked.append(outbox / name)
            fault_point("after_publish_image")
        fsync_dir(outbox)
        _place(folder / manifest, outbox / manifest)
    except BaseException:
        # Unpublished: no manifest names them. Unless the stage is gone: then this claim was fenced
        # (taken over) mid-publish, and the names now belong to the new owner's publish of the same
        # stage, which may already have linked its manifest: leave them.
        if folder.is_dir() and not is_published(outbox, job_id):
            for path in linked:
                with contextlib.suppress(OSError):
                    path.unlink()
        raise
    fsync_dir(outbox)
    fault_point("after_manifest")
    shutil.rmtree(folder, ignore_errors=True)
    return names


def publish_record(staged_record: Path, outbox: Path) -> None:
    """Link one staged record (a `<job_id>.failed.json`) into the outbox under its name; repeatable."""
    _place(staged_record, outbox / staged_record.name)
    fsync_dir(outbox)


def failure_records(outbox: Path, claim_id: str) -> list[Path]:
    """A claim's `<job_id>.failed.json` records in the outbox (its job ids are the claim id, or `<claim_id>-<n>`)."""
    pattern = glob.escape(claim_id)
    found = [*outbox.glob(f"{pattern}.failed.json"), *outbox.glob(f"{pattern}-*.failed.json")]
    return sorted(found, key=lambda p: (len(p.name), p.name))


def _place(src: Path, dest: Path) -> bool:
    """Give `src`'s file the name `dest`, never replacing another file; False if it already had it."""
    try:
        os.link(src, dest, follow_symlinks=False)
        return True
    except FileExistsError:
        if same_file(src, dest) or same_bytes(src, dest):
            return False
        raise _conflict(dest) from None
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            return _copy_into(src, dest)
        if exc.errno not in NO_LINKS:
            raise
    # No links here (SMB, FAT): a whole, fsynced copy first, then the name reserved with O_EXCL, then
    # the copy renamed over the placeholder; an error after reserving removes the placeholder again.
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    copy_synced(src, tmp)
    reserved = False
    try:
        os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644))
        reserved = True
    except FileExistsError:
        if same_bytes(src, dest):
            tmp.unlink()
            return False
        if os.path.getsize(dest) != 0:  # an empty one is a placeholder a crash left
            tmp.unlink()
            raise _conflict(dest) from None
    try:
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        if reserved:
            dest.unlink(missing_ok=True)
        raise
    return True


def _copy_into(src: Path, dest: Path) -> bool:
    """EXDEV: a whole, fsynced copy under a hidden name, then linked into place."""
    for leftover in dest.parent.glob(f".{glob.escape(dest.name)}.*.tmp"):
        leftover.unlink(missing_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    copy_synced(src, tmp)
    try:
        return _place(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _conflict(dest: Path) -> OutboxConflict:
    return OutboxConflict(
        f"the outbox already has {dest.name}, which this job did not make; nothing of the job was published",
        fix=f"move {dest} out of the outbox; the job runs again when dropped again",
    )
