"""How a claim ends, the only code that moves a claim's files after the claim (R1), and its resumption.

| State     | On disk (in `work/<instance>/<folder>/`)       | Next                                 |
|-----------|------------------------------------------------|--------------------------------------|
| claimed   | `claim.json`, the inputs under `inbox/`        | validated, or rejected               |
| validated | `jobs.json` (seeds fixed, images probed)       | running                              |
| running   | `claim.json` says `running`; `stage/<job_id>/` | staged                               |
| staged    | `stage/<job_id>/<job_id>.json` written last    | published                            |
| published | `outbox/<job_id>.json` (the manifest): DONE    | the next job, or the claim ends      |
| ending    | `claim.json` names its `ending`                | inputs moved, then the folder goes   |

`end_claim` is the one way a claim ends: it records the ending in `claim.json`
first, then moves the inputs (and the report), then removes the folder, so a
crash anywhere in between leaves a claim that `leftover_claims` finishes the
same way on the next start. The same call tells the status board and writes the
one log line for that ending; `Ending` lists them.

A claim found in work/ at start is first fenced: its folder is renamed (to
`<claim_id>~N`), so a process that still holds the old paths (a paused or hung
predecessor) can no longer stage, publish, archive or release through them;
nothing here creates a claim folder's parents (no `mkdir(parents=True)`), so a
fenced path stays dead. Such a process finds its folder gone and drops the claim
(`Ending.FENCED`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any

from diffusiond.daemon import metrics
from diffusiond.daemon.claim import RESERVING, Claim, reservation
from diffusiond.daemon.config import Config
from diffusiond.daemon.faults import fault_point
from diffusiond.daemon.fsutil import atomic_write, fsync_dir, is_disk_full, move_unique, rename_checked
from diffusiond.daemon.journal import job_fields
from diffusiond.daemon.manifest import build_failure, source_sha256
from diffusiond.daemon.outbox import is_published, publish_record
from diffusiond.daemon.report import report_text
from diffusiond.daemon.status import StatusBoard
from diffusiond.pipeline.errors import Code, DiffusiondError, JobFailed

log = logging.getLogger(__name__)
ENDED = ".ended-"
"""A claim folder renamed so for removal: whatever is left of it at start is deleted."""


class Ending(StrEnum):
    """How a claim ended; `end_claim` does what each one means."""

    DONE = "done"
    """Every job's manifest is published: inputs to archive/ (or deleted with `on_success: delete`)."""
    FAILED = "failed"
    """A job failed while running (model, device, disk, a bug, or crashes): inputs and report to failed/."""
    REJECTED = "rejected"
    """The job file or its images are wrong, found before anything ran: inputs and report to failed/."""
    CANCELLED = "cancelled"
    """`diffusiond cancel` asked for it (daemon/cancel.py): inputs and report (`code: cancelled`) to failed/."""
    RELEASED = "released"
    """Stopped before any job was published (a warm stop): inputs back to the inbox, for any daemon."""
    RESUMES = "resumes"
    """Stopped after some jobs were published: stays in work/, the rest run on the next start."""
    DEFERRED = "deferred"
    """The disk was full: stays in work/ and is tried again after `disk_full_retry_s` (the input is fine)."""
    FENCED = "fenced"
    """Another process took the claim over (its folder was renamed): nothing of it is this process's."""


MOVES_INPUTS = {Ending.DONE, Ending.FAILED, Ending.REJECTED, Ending.CANCELLED, Ending.RELEASED}
TO_FAILED = {Ending.FAILED, Ending.REJECTED, Ending.CANCELLED}
"""The endings whose inputs go to failed/ with a report: `error` says why."""


def fenced(claim: Claim) -> bool:
    return not claim.folder.is_dir()


def end_claim(
    claim: Claim,
    ending: Ending,
    *,
    config: Config,
    board: StatusBoard | None,
    error: DiffusiondError | None = None,
    done: tuple[str, ...] = (),
    reason: str = "",
    errors: tuple[DiffusiondError, ...] = (),
) -> Ending:
    """End `claim` as `ending`; returns the ending it had (FENCED when its folder is gone).

    `error` is the why of FAILED and REJECTED (the report), `errors` every failed job's when
    several failed (for `outbox_failures`), `done` the job ids already published (for the
    report), `reason` the why of a DEFERRED, RESUMES or RELEASED ending.
    """
    if ending is not Ending.FENCED and fenced(claim):
        ending = Ending.FENCED
    fields = job_fields(job_file=claim.source)
    if ending is Ending.FENCED:
        log.warning("fenced: %s was taken over by another process; dropping it", claim.source, extra=fields)
        if board is not None:
            board.set_aside(claim.source, ending, "taken over by another process", claim_id=claim.claim_id)
        return ending
    if ending not in MOVES_INPUTS:  # it stays in work/: this run stopped in order (no crash)
        claim = dataclasses.replace(claim, running=False)
        claim.save(durable=False)
        claim.trail(f"{ending}: {reason}")
        log.info("%s %s: %s", ending, claim.source, reason, extra=fields)
        if board is not None:
            board.set_aside(claim.source, ending, reason, claim_id=claim.claim_id)
        return ending
    if ending in TO_FAILED and error is None:
        raise ValueError(f"ending {ending} needs the error")
    _record_ending(claim, ending, error, done, errors)
    report = _finish(claim, config, ending, error, done, errors)
    if ending in TO_FAILED:
        metrics.ended(str(ending), [str(job.task) for job in claim.jobs or () if job.job_id not in done])
    if ending is Ending.DONE:
        log.debug("archived the inputs of %s", claim.source, extra=fields)
    elif ending is Ending.RELEASED:
        log.info("put %s back in the inbox: %s", claim.source, reason or "stopped", extra=fields)
        if board is not None:
            board.set_aside(claim.source, ending, reason or "stopped", claim_id=claim.claim_id)
    else:
        assert error is not None
        verb = {Ending.REJECTED: "rejected", Ending.CANCELLED: "cancelled"}.get(ending, "failed")
        log.warning("%s %s: %s (report: %s)", verb, claim.source, error, report, extra=fields)
        if board is not None:
            board.failed(
                claim.source, str(error.code), str(error), str(report), claim_id=claim.claim_id, attempt=claim.attempt
            )
    return ending


def cancelled_error(claim: Claim, done: int = 0, jobs: int = 0) -> DiffusiondError:
    """Why a CANCELLED claim is in failed/: the report a cancel leaves."""
    made = f" after {done} of its {jobs} jobs" if done else ""
    return JobFailed(
        f"cancelled (diffusiond cancel){made}",
        code=Code.CANCELLED,
        path=claim.source,
        fix=f"to run it after all: diffusiond retry {claim.source}",
    )


def _edit_record(claim: Claim, edit: Callable[[dict[str, Any]], None], *, durable: bool = True) -> None:
    """Change claim.json on disk in place: `claim` may be an older copy of the record than the file."""
    path = claim.folder / "claim.json"
    record = json.loads(path.read_text(encoding="utf-8"))
    edit(record)
    atomic_write(path, json.dumps(record, indent=1).encode(), durable=durable)


def mark_stopped(claim: Claim) -> None:
    """An operator's second SIGTERM ends the process on purpose: its running claim is no crash."""
    with contextlib.suppress(OSError, ValueError):
        _edit_record(claim, lambda record: record.update(running=False))


def begin_run(claim: Claim) -> Claim:
    """Record that a run of `claim` starts: a crash from now on counts (FileNotFoundError: fenced)."""
    started = dataclasses.replace(claim, attempt=claim.attempt + 1, running=True)
    started.save(durable=False)  # on the worker thread: no disk flush while the device waits
    started.trail(f"run {started.attempt} starts")
    return started


def _record_ending(
    claim: Claim,
    ending: Ending,
    error: DiffusiondError | None,
    done: tuple[str, ...],
    errors: tuple[DiffusiondError, ...],
) -> None:
    """The ending goes into claim.json before anything moves: recovery finishes the same ending."""
    ended = {
        "ending": str(ending),
        "error": error.report() if error else None,
        "done": list(done),
        "errors": [e.report() for e in errors],
    }
    _edit_record(claim, lambda record: record.update(ending=ended))


def _finish(
    claim: Claim,
    config: Config,
    ending: Ending,
    error: DiffusiondError | None,
    done: tuple[str, ...],
    errors: tuple[DiffusiondError, ...] = (),
) -> Path | None:
    """Move every input still in the claim folder to the ending's place, then remove the folder."""
    report: Path | None = None
    if ending in TO_FAILED:
        assert error is not None
        failed = config.folder("failed")
        for relative in claim.present():
            # Linked first, its new name noted, then the claim's name removed: a kill in between leaves
            # both names, and the repeat finds the same file under the noted name (report and record name it).
            source = claim.inputs / relative
            dest = move_unique(source, failed, Path(relative).name, keep_source=True)
            _note_moved(claim, relative, dest)
            fault_point("after_archive_input")
            if os.path.lexists(source) and not stat.S_ISDIR(os.lstat(source).st_mode):
                os.unlink(source)
        moves = _moved(claim)  # this run's moves and an interrupted one's: inbox path → name in failed/
        moved = [Path(name) for name in moves.values()]
        staged = next(claim.folder.glob("*.error.yaml"), None)  # written by an interrupted run of this ending
        if staged is None:
            stem = os.fsdecode(os.fsencode(Path(moved[0].name if moved else claim.source).stem)[:200])
            extra: dict[str, Any] = {"inputs": [p.name for p in moved], "finished_jobs": list(done)}
            extra["inbox_paths"] = {name: relative for relative, name in moves.items()}  # for `diffusiond retry`
            if error.code is Code.CRASHED:
                extra["log_tail"] = claim.trail_tail()
            staged = claim.folder / f"{stem}.error.yaml"
            atomic_write(staged, report_text(error, **extra).encode(errors="backslashreplace"))
        report = move_unique(staged, failed, keep_source=True)  # a repeat finds it delivered: one report
        if config.outbox_failures:
            _publish_failures(claim, config, errors or (error,), moved, report, done)
    else:
        fault_point("before_archive")
        for relative in claim.present():
            source = claim.inputs / relative
            if ending is Ending.RELEASED:
                target = config.inbox / relative
                _move(source, target.parent, target.name)
            elif config.on_success == "delete":
                source.unlink()
                fsync_dir(source.parent)
            else:
                _move(source, config.folder("archive"), Path(relative).name)
    fault_point("before_remove_claim")
    reservation(config.outbox, claim.claim_id).unlink(missing_ok=True)
    _remove(claim.folder)
    return report


def _publish_failures(
    claim: Claim,
    config: Config,
    errors: tuple[DiffusiondError, ...],
    moved: list[Path],
    report: Path,
    done: tuple[str, ...],
) -> None:
    """`outbox/<job_id>.failed.json` for every job of the claim not done, the ending's last files
    (`outbox_failures: true`): each with its own error, or the claim's when it has none of its own
    (a file rejected as a whole is recorded under the claim id). A repeat finds them there."""
    first = errors[0]
    by_index: dict[int | None, DiffusiondError] = {e.job_index: e for e in reversed(errors) if e.job_index is not None}
    source = next((config.folder("failed") / n for r, n in _moved(claim).items() if r == claim.source), None)
    sha256 = source_sha256(claim, source)
    for job_id, index in _unfinished_jobs(claim, done):
        staged = claim.folder / f"{job_id}.failed.json"
        if not staged.exists():
            error = by_index.get(index, first)
            inputs = [f"failed/{path.name}" for path in moved]
            record = build_failure(
                claim, job_id, error, inputs=inputs, report=f"failed/{report.name}", done=done, sha256=sha256
            )
            atomic_write(staged, record.to_json())
        publish_record(staged, config.outbox)


def _unfinished_jobs(claim: Claim, done: tuple[str, ...]) -> list[tuple[str, int | None]]:
    """(job_id, index) of each job in jobs.json not in `done`; the claim id alone when it has no jobs.json."""
    try:
        records = json.loads((claim.folder / "jobs.json").read_text(encoding="utf-8"))
        jobs = [(str(r["job_id"]), int(r["index"])) for r in records]
    except (OSError, ValueError, KeyError, TypeError):
        return [(claim.claim_id, None)]
    return [(job_id, index) for job_id, index in jobs if job_id not in done]


def _remove(folder: Path) -> None:
    """Remove a claim folder in one step: renamed out of the way first (an rmtree is many steps, and a
    crash half-way would leave a claim.json without the report it had written), then deleted."""
    gone = folder.with_name(f"{ENDED}{folder.name}")
    shutil.rmtree(gone, ignore_errors=True)  # what a crash left of an earlier removal of this name
    os.rename(folder, gone)
    fsync_dir(folder.parent)
    shutil.rmtree(gone, ignore_errors=True)


def _note_moved(claim: Claim, relative: str, dest: Path) -> None:
    """Where an input went, in the ending's record: a report written after a crash still names it."""

    def note(record: dict[str, Any]) -> None:
        record["ending"].setdefault("moved", {})[relative] = dest.name

    _edit_record(claim, note, durable=False)  # a power cut loses only the name


def _moved(claim: Claim) -> dict[str, str]:
    recorded = recorded_ending(claim) or {}
    moved = recorded.get("moved")
    return {str(k): str(v) for k, v in moved.items()} if isinstance(moved, dict) else {}


def _move(source: Path, folder: Path, name: str) -> Path:
    dest = move_unique(source, folder, name)
    fault_point("after_archive_input")
    return dest


def leftover_claims(config: Config, board: StatusBoard | None = None) -> list[Claim]:
    """The claims this instance had when it stopped or crashed, fenced and counted, oldest first.

    A claim that was ending is finished as it was ending; one whose first file was never
    renamed is removed (nothing was claimed); one that crashed `limits.max_crashes` times
    fails with `crashed`.
    """
    claims: list[Claim] = []
    work = config.work_dir
    if not work.is_dir():
        return claims
    for folder in sorted(work.iterdir()):
        if folder.name.startswith(ENDED) and folder.is_dir():  # a removal a crash interrupted
            shutil.rmtree(folder, ignore_errors=True)
            continue
        if folder.name.startswith(RESERVING):  # a reservation a kill left before (or after) its link
            folder.unlink(missing_ok=True)
            continue
        if folder.name.startswith(".") or not folder.is_dir():  # the lock (.owner), nothing claimed
            continue
        try:
            resumed = _leftover(folder, config, board)
        except Exception:  # one broken claim must not stop the start (and so every start after it)
            log.exception("cannot resume the claim in %s; it stays there for a person to look at", folder)
            continue
        if resumed is not None:
            claims.append(resumed)
    _drop_stale_reservations(config, keep=_claim_ids(work))  # the resumed claims are folders there too
    return sorted(claims, key=lambda c: c.claimed_at)


def _claim_ids(work: Path) -> set[str]:
    """The claim ids of the folders in work/ (a claim left there must keep its reservation)."""
    return {p.name.partition("~")[0] for p in work.iterdir() if not p.name.startswith(".")}


def taken_over_claims(folders: list[Path], lost: str, config: Config, board: StatusBoard | None) -> list[Claim]:
    """Claim folders just renamed here from `lost`, a daemon whose lease ran out (daemon/lease.py):
    counted, then resumed as after a crash; at `limits.max_takeovers` one fails with `node_lost`."""
    claims: list[Claim] = []
    for folder in folders:
        try:
            resumed = _leftover(folder, config, board, taken_from=lost)
        except Exception:  # one broken claim must not stop the daemon
            log.exception("cannot resume the claim taken over in %s; it stays there for a person to look at", folder)
            continue
        if resumed is not None:
            claims.append(resumed)
    return sorted(claims, key=lambda c: c.claimed_at)


def _leftover(folder: Path, config: Config, board: StatusBoard | None, *, taken_from: str = "") -> Claim | None:
    """One claim folder found at start (or `taken_from` a lost daemon): fenced first (a takeover's rename
    was its fence), then finished, removed, failed as crashed or lost, or returned."""
    try:
        found = Claim.load(folder)
        # First: a predecessor still holding the old paths is shut out.
        found = _fence(found) if not taken_from else _taken_over(found, taken_from, config)
        recorded = recorded_ending(found)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if is_disk_full(exc):
            raise
        if not os.path.lexists(folder):  # another daemon took it over first
            return None
        log.warning("claim folder %s has no readable claim.json; its files go back to the inbox", folder)
        _return_orphans(folder, config)
        return None
    resumed = dataclasses.replace(found, resumed=True)
    if recorded is not None:
        try:
            finish_recorded(resumed, config, board)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            return resumed  # the worker finishes it, waiting for space
        return None
    if found.source not in found.present():  # stopped between the record and the claiming rename
        _return_orphans(found.folder, config)
        reservation(config.outbox, found.claim_id).unlink(missing_ok=True)
        return None
    for relative in found.files:  # stopped between two renames of the claim: take the rest now
        source = config.inbox / relative
        if not os.path.lexists(found.inputs / relative) and os.path.lexists(source) and not source.is_symlink():
            with contextlib.suppress(OSError):
                (found.inputs / relative).parent.mkdir(exist_ok=True)
                rename_checked(source, found.inputs / relative)
    crashes = resumed.crashes + (1 if resumed.running else 0)
    resumed = dataclasses.replace(resumed, crashes=crashes, running=False)
    try:
        resumed.save()
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        return resumed  # counted again at the next start; the worker waits for space
    if crashes:
        resumed.trail(f"found after a crash ({crashes} of {config.limits.max_crashes})")
    published = _published_jobs(resumed, config)
    if taken_from and resumed.takeovers >= config.limits.max_takeovers and not published.all:
        error = JobFailed(
            f"this job's daemon stopped answering {resumed.takeovers} times (last {taken_from}); it is not tried "
            "again, so that a job that hangs or kills its host does not go on to the next one",
            code=Code.NODE_LOST,
            path=found.source,
            fix="see log_tail below and those hosts' journals for what happened; if the job is fine, drop it again",
        )
        end_claim(resumed, Ending.FAILED, config=config, board=board, error=error, done=published.ids)
        return None
    if crashes >= config.limits.max_crashes and not published.all:
        error = JobFailed(
            f"the daemon crashed {crashes} times while running this job; it is not tried again",
            code=Code.CRASHED,
            path=found.source,
            fix="see log_tail below and the journal for what was running; if the job is fine, drop it again",
        )
        end_claim(resumed, Ending.FAILED, config=config, board=board, error=error, done=published.ids)
        return None
    return resumed


@dataclasses.dataclass(frozen=True)
class _Published:
    ids: tuple[str, ...]
    all: bool
    """Every job of the claim is published (known only once jobs.json was written)."""


def _published_jobs(claim: Claim, config: Config) -> _Published:
    """Which of the claim's jobs have their manifest in the outbox, from its jobs.json."""
    try:
        job_ids = [str(r["job_id"]) for r in json.loads((claim.folder / "jobs.json").read_text("utf-8"))]
    except (OSError, ValueError, KeyError, TypeError):
        return _Published((), False)
    ids = tuple(j for j in job_ids if is_published(config.outbox, j))
    return _Published(ids, bool(job_ids) and len(ids) == len(job_ids))


def _drop_stale_reservations(config: Config, keep: set[str]) -> None:
    """Remove this instance's outbox reservations that have no claim (a kill between reserving and mkdir)."""
    with os.scandir(config.outbox) as entries:
        stale = [
            Path(e.path) for e in entries if e.name.startswith(".") and e.name.endswith(".reserved") and e.is_file()
        ]
    for path in stale:
        claim_id = path.name[1 : -len(".reserved")]
        try:
            owner = path.read_text(encoding="utf-8").strip()
            age_s = time.time() - path.stat().st_mtime
        except (OSError, ValueError):  # not one of ours (or not readable): leave it
            continue
        # Empty: its daemon died between creating it and writing its name; an hour later, no one is mid-way.
        if (owner == config.instance and claim_id not in keep) or (owner == "" and age_s > 3600):
            path.unlink(missing_ok=True)


def fence_target(folder: Path, into: Path) -> Path:
    """The claim folder's next name in the work folder `into`: `<claim_id>~N+1`, one not taken."""
    base, _, n = folder.name.partition("~")
    number = int(n) + 1 if n.isdigit() else 2
    while os.path.lexists(target := into / f"{base}~{number}"):
        number += 1
    return target


def _fence(found: Claim) -> Claim:
    """Rename the claim's folder to a new name: the old paths die for whoever still holds them."""
    target = fence_target(found.folder, found.folder.parent)
    os.rename(found.folder, target)
    fsync_dir(target.parent)
    fault_point("after_fence")
    return dataclasses.replace(found, folder=target)


def _taken_over(found: Claim, lost: str, config: Config) -> Claim:
    """A claim renamed here from a lost daemon: this daemon's now, with the takeover counted."""
    taken = dataclasses.replace(found, instance=config.instance, takeovers=found.takeovers + 1)
    taken.save()
    taken.trail(f"taken over from {lost}, whose lease ran out ({taken.takeovers} of {config.limits.max_takeovers})")
    with contextlib.suppress(OSError):  # the outbox reservation names its holder (_drop_stale_reservations)
        atomic_write(reservation(config.outbox, found.claim_id), f"{config.instance}\n".encode())
    fault_point("after_takeover")
    return taken


def recorded_ending(claim: Claim) -> dict[str, Any] | None:
    """The ending `end_claim` recorded in claim.json before it was interrupted (a crash, a full disk)."""
    record = json.loads((claim.folder / "claim.json").read_text(encoding="utf-8"))
    recorded = record.get("ending")
    return recorded if isinstance(recorded, dict) else None


def finish_recorded(claim: Claim, config: Config, board: StatusBoard | None = None) -> Ending | None:
    """Finish the ending recorded in claim.json, if there is one: the same moves, the same report."""
    recorded = recorded_ending(claim)
    if recorded is None:
        return None
    ending = Ending(recorded["ending"])
    error = DiffusiondError.from_report(recorded["error"]) if recorded.get("error") else None
    errors = tuple(DiffusiondError.from_report(r) for r in recorded.get("errors") or ())
    log.info("finishing the %s ending of %s, which was interrupted", ending, claim.source)
    report = _finish(claim, config, ending, error, tuple(recorded.get("done", ())), errors)
    if board is not None and error is not None:
        board.failed(
            claim.source, str(error.code), str(error), str(report), claim_id=claim.claim_id, attempt=claim.attempt
        )
    return ending


def _return_orphans(folder: Path, config: Config) -> None:
    inputs = folder / "inbox"
    for path in sorted(inputs.rglob("*")) if inputs.is_dir() else []:
        if not path.is_dir() or path.is_symlink():
            target = config.inbox / path.relative_to(inputs)
            move_unique(path, target.parent, target.name)
    _remove(folder)
