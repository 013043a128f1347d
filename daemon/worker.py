"""Running claims in a thread that keeps the models warm, and writing results in a second one.

`run_claims` is the life of claimed job files after the claim, as numbered
stages. Only generation runs on the worker thread: each finished batch is
handed to the `Writer` (stamp, write, archive), so the next batch starts on the
device while the previous one is encoded, watermarked and written. `Worker` is
the thread that feeds `run_claims` from the queue, taking several claims at
once when batching is on.

Only the worker thread may run torch, model loading included. A parallel torch op
on any second thread (a tensor sum on the main thread is enough) gives libgomp more
threads than CPUs, after which it stops spinning between parallel regions: every
later generation on CPU ran 2.6-3.3x slower on the test model, and 1.2x slower on
SD 1.5 loaded on the main thread (`bench/torch_threads.py`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from diffusiond.daemon import lifecycle, metrics, stages
from diffusiond.daemon.claim import Claim, load_jobs
from diffusiond.daemon.config import Config
from diffusiond.daemon.faults import fault_point
from diffusiond.daemon.fsutil import is_disk_full
from diffusiond.daemon.journal import job_fields
from diffusiond.daemon.lifecycle import Ending
from diffusiond.daemon.manifest import build_manifest
from diffusiond.daemon.outbox import OutboxConflict, discard_unpublished, is_published, publish, stage, staged
from diffusiond.daemon.scheduler import Pending, plan_batches
from diffusiond.daemon.status import StatusBoard
from diffusiond.daemon.threads import name_os_thread, set_torch_threads
from diffusiond.pipeline.backend import Cancelled, EarlierStage, Generated, Generator, StepHook
from diffusiond.pipeline.errors import Code, DiffusiondError, JobFailed, internal_error
from diffusiond.pipeline.job import Job
from diffusiond.pipeline.provenance import StampPolicy, stamp_job

log = logging.getLogger(__name__)
WriteTask = Callable[[], None]
EndHook = Callable[[Claim, Ending], None]


class Writer:
    """Runs write tasks in order on its own thread, at most `depth` waiting (then `submit` blocks).

    The bound keeps memory flat when the device makes images faster than the disk takes them.
    """

    def __init__(self, depth: int = 2) -> None:
        self._tasks: queue.Queue[WriteTask | None] = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name="diffusiond-writer", daemon=True)
        self._thread.start()

    def submit(self, task: WriteTask) -> None:
        self._tasks.put(task)

    def drain(self) -> None:
        """Wait until every submitted task has run."""
        self._tasks.join()

    def close(self) -> None:
        self._tasks.put(None)
        self._thread.join()

    def _run(self) -> None:
        name_os_thread("writer")
        while (task := self._tasks.get()) is not None:
            try:
                task()
            except Exception:  # tasks report their own errors; this is a last resort, the thread must live
                log.exception("internal error while writing results")
            finally:
                self._tasks.task_done()
        self._tasks.task_done()


@dataclass
class ClaimRun:
    """What became of one claim's jobs in this run; the end stage turns it into the claim's `Ending`."""

    claim: Claim
    jobs: int
    published: list[str] = field(default_factory=list)
    errors: list[DiffusiondError] = field(default_factory=list)
    deferred: str | None = None
    """Why it must wait (a full disk), when it must."""
    fenced: bool = False
    begun: bool = False
    """Its run is counted in claim.json (`lifecycle.begin_run`); `claim` is the record as saved then."""
    progressed: bool = False
    """A stage of a multi-stage job was kept in its folder: after a stop it resumes there."""
    cancelled: bool = False
    """`diffusiond cancel` asked for it: its jobs not made yet are not run."""
    held: Callable[[], bool] = field(default=lambda: True, repr=False)
    """Whether this daemon still owns its work folder (daemon/worklock.py), asked before each publish."""

    def ending(self, stopped: bool) -> Ending:
        if self.fenced:
            return Ending.FENCED
        if self.errors:
            return Ending.FAILED
        if self.cancelled and len(self.published) < self.jobs:
            return Ending.CANCELLED
        if self.deferred is not None:
            return Ending.DEFERRED
        if len(self.published) < self.jobs:
            if not stopped:
                missing = self.jobs - len(self.published)
                raise RuntimeError(f"{missing} job(s) of {self.claim.source} neither ran nor failed")
            kept = self.published or self.progressed or self.claim.resumed
            return Ending.RESUMES if kept else Ending.RELEASED
        return Ending.DONE


def run_claims(
    claims: list[Claim],
    config: Config,
    generator: Generator,
    *,
    cancel: threading.Event | None = None,
    cancelled: Callable[[], set[str]] = set,
    on_step: StepHook | None = None,
    board: StatusBoard | None = None,
    writer: Writer,
    on_end: EndHook,
    held: Callable[[], bool] = lambda: True,
) -> None:
    """Pre-check, run every job not yet done (batched), then end each claim (daemon/lifecycle.py).

    Stages 3b and 4 run on `writer`, in order; `on_end(claim, ending)` is called once per claim
    when it has ended. When `cancel` is set during a step, the jobs not made yet stay undone: a
    claim with published jobs (or a kept stage of a multi-stage job) stays in work/ (RESUMES), one
    without goes back to the inbox. Unless `cancelled()` names claims (`diffusiond cancel`, which
    sets `cancel` too): then only those end, CANCELLED, and the rest of the batch runs again.
    A multi-stage job's images between two of its stages are kept on this thread (daemon/stages.py:
    lossless PNG, quick to write), as the next stage needs them.
    """
    # 1. Pre-check each claim: the service validated a new claim and passes its jobs; a claim resumed
    #    after a stop or crash is read back from its jobs.json (or validated again). A wrong one fails
    #    now. A run is counted in claim.json (`begin_run`) before anything of the claim can crash the
    #    process: before parsing its file again, or else before its first batch (so a claim batched
    #    with another one is not blamed for that one's crash).
    runs: list[ClaimRun] = []
    pending: list[Pending] = []
    staged_jobs: list[tuple[ClaimRun, str, Path]] = []
    for claim in claims:
        try:
            # Only a claim back from work/ (resumed, or queued again without its jobs) can have an ending
            # recorded that waited for disk space; a new one is not read back.
            may_have_ending = claim.resumed or claim.jobs is None
            if may_have_ending and (recorded := lifecycle.finish_recorded(claim, config, board)) is not None:
                on_end(claim, recorded)
                continue
            validates = claim.jobs is None and not (claim.folder / "jobs.json").exists()
            if validates:  # parsing the file again could be what crashed the daemon: count it
                claim = lifecycle.begin_run(claim)
            jobs = list(claim.jobs) if claim.jobs is not None else load_jobs(claim, config)
        except DiffusiondError as exc:
            on_end(claim, _end(claim, Ending.REJECTED, config, board, exc, (), ""))
            continue
        except OSError as exc:
            if not lifecycle.fenced(claim) and not is_disk_full(exc):
                raise
            on_end(claim, _end(claim, Ending.DEFERRED, config, board, None, (), f"disk full: {exc}"))
            continue
        run = ClaimRun(claim, len(jobs), begun=validates, held=held)
        runs.append(run)
        for job in jobs:
            # A resumed claim: a published job is done; a staged one only needs publishing.
            if claim.resumed and is_published(config.outbox, job.job_id):
                run.published.append(job.job_id)
            elif claim.resumed and (folder := staged(claim.folder, job.job_id)) is not None:
                staged_jobs.append((run, job.job_id, folder))
            else:
                if claim.resumed and claim.attempt == 0:  # left by the previous version: its partial images
                    discard_unpublished(config.outbox, job)
                pending.extend(_pending(claim, job))
    by_id = {run.claim.claim_id: run for run in runs}

    def publish_staged() -> None:  # made by the run a crash interrupted: only the publishing is left
        for run, job_id, folder in staged_jobs:
            if (names := _publish(run, job_id, folder, config)) is not None:
                log.info("done %s: published what the interrupted run staged", job_id)
                if board is not None:
                    board.done(job_id, run.claim.source, names, 0.0, claim_id=run.claim.claim_id)

    if staged_jobs:
        writer.submit(publish_staged)

    # 2. Plan: jobs that can share a pipeline call go together, in arrival order. A multi-stage job's
    #    next stage is planned when its stage before has ended, and runs next (daemon/stages.py).
    stopped = False
    todo = collections.deque(plan_batches(pending, config.batch_size))
    calls = itertools.count()  # numbers each pipeline call: a stage's images from one call share its timings
    while todo:
        call, batch = next(calls), todo.popleft()
        # 3a. Run the batch on the device (this thread) ...
        started = time.perf_counter()
        _mark_cancelled(runs, cancelled())  # asked for between two batches
        batch = [item for item in batch if not by_id[item.claim.claim_id].cancelled]
        batch = [item for item in batch if _begin(by_id[item.claim.claim_id])]
        try:
            results: Sequence[Generated | DiffusiondError] = (
                _generate(batch, config, generator, cancel, on_step, board) if batch else []
            )
        except Cancelled:
            asked = cancelled()
            if not asked:  # a warm stop
                stopped = True
                break
            _mark_cancelled(runs, asked)
            todo.appendleft(batch)  # the others in it run again; the cancelled ones are dropped above
            continue
        commits: list[_Commit] = []
        later: list[Pending] = []
        for item, result in zip(batch, results, strict=True):
            run = by_id[item.claim.claim_id]
            if item.chain is None:
                commits.append(_Commit(run, item.job, result))
            else:
                _advance(run, item, result, call, config, commits, later)
        todo.extendleft(reversed(plan_batches(later, config.batch_size)))

        # 3b. ... and commit each job, staged then published, manifest last, while the next batch runs.
        def write(commits: list[_Commit] = commits, started: float = started) -> None:
            for commit in commits:
                run = commit.run
                try:
                    if isinstance(commit.result, DiffusiondError):
                        run.errors.append(commit.result)
                    elif not run.fenced and run.deferred is None:
                        since = commit.started or started
                        _commit(run, commit.job, commit.result, config, board, since, commit.earlier)
                except Exception as exc:  # a bug fails this job; the claim still ends, with a report
                    log.exception("internal error writing %s", commit.job.job_id, extra=_job_fields(run, commit.job))
                    run.errors.append(internal_error(exc, path=run.claim.source))

        writer.submit(write)

    # 4. End each claim: DONE (inputs to archive/), FAILED (to failed/ with the report), DEFERRED,
    #    RESUMES or RELEASED after a stop, FENCED when another process took it over.
    def end() -> None:
        for run in runs:
            try:
                ending = run.ending(stopped)
            except Exception as exc:  # a bug: the claim still ends, with a report
                log.exception("internal error ending %s", run.claim.source)
                run.errors.append(internal_error(exc, path=run.claim.source))
                ending = Ending.FAILED
            error = run.errors[0] if run.errors else None
            if ending is Ending.CANCELLED:
                error = lifecycle.cancelled_error(run.claim, len(run.published), run.jobs)
            reason = run.deferred or ("stopped at a step boundary" if stopped else "")
            if error is not None and len(run.errors) > 1:
                log.warning("%s: %d of %d jobs failed", run.claim.source, len(run.errors), run.jobs)
            ended = _end(run.claim, ending, config, board, error, tuple(run.published), reason, tuple(run.errors))
            on_end(run.claim, ended)

    writer.submit(end)


def _mark_cancelled(runs: list[ClaimRun], asked: set[str]) -> None:
    for run in runs:
        run.cancelled = run.cancelled or run.claim.claim_id in asked


@dataclass(frozen=True)
class _Commit:
    """A job's last stage as generated (or its error), for the writer to stamp, stage and publish."""

    run: ClaimRun
    job: Job
    result: Generated | DiffusiondError
    earlier: tuple[EarlierStage, ...] = ()
    """A multi-stage job's stages before the last."""
    started: float | None = None
    """When a multi-stage job's first stage began (else the batch's start counts)."""


def _pending(claim: Claim, job: Job) -> list[Pending]:
    """What runs first of a job: the job itself, or a multi-stage job's first stage not kept yet."""
    if not job.spec.then:
        return [Pending(claim, job)]
    chain = stages.resume(claim.folder, job)
    if chain.done:
        claim.trail(f"job {job.job_id}: stages 1-{len(chain.done)} were kept; resuming at stage {chain.running}")
    return [Pending(claim, part, chain, n) for n, part in enumerate(chain.jobs(claim.folder))]


def _advance(
    run: ClaimRun,
    item: Pending,
    result: Generated | DiffusiondError,
    call: int,
    config: Config,
    commits: list[_Commit],
    later: list[Pending],
) -> None:
    """One result of a multi-stage job's running stage: once the stage is whole, keep it and plan the
    next (into `later`), or, after the last stage, commit the job (into `commits`)."""
    chain = item.chain
    assert chain is not None
    if chain.failed:
        return
    if isinstance(result, DiffusiondError):
        chain.failed = True
        result.add_context(stage=chain.running)
        commits.append(_Commit(run, chain.job, result))
        return
    generated = chain.collect(item.part, call, result)
    if generated is None:  # more images of this stage to come
        return
    if chain.is_last:
        commits.append(_Commit(run, chain.job, generated, tuple(chain.done), chain.started))
        return
    try:
        chain.keep(run.claim.folder, generated, run.claim.attempt)
    except OSError as exc:
        chain.failed = True
        _write_failed(run, chain.job.job_id, exc, config)
        return
    run.progressed = True
    run.claim.trail(f"job {chain.job.job_id}: kept stage {chain.running - 1} of {chain.stages}")
    fault_point("after_keep_stage")
    later.extend(Pending(run.claim, part, chain, n) for n, part in enumerate(chain.jobs(run.claim.folder)))


def _begin(run: ClaimRun) -> bool:
    """Count the claim's run before its first batch; False when it cannot run now (fenced, disk full)."""
    if run.begun:
        return not (run.fenced or run.deferred)
    run.begun = True
    try:
        run.claim = lifecycle.begin_run(run.claim)
    except OSError as exc:
        if lifecycle.fenced(run.claim):
            run.fenced = True
        elif is_disk_full(exc):
            run.deferred = f"disk full: {exc}; retrying"
        else:
            raise
        return False
    return True


def _end(
    claim: Claim,
    ending: Ending,
    config: Config,
    board: StatusBoard | None,
    error: DiffusiondError | None,
    done: tuple[str, ...],
    reason: str,
    errors: tuple[DiffusiondError, ...] = (),
) -> Ending:
    """`end_claim`, where a full disk keeps the claim in work/ and a bug still fails the claim with a report."""
    try:
        return lifecycle.end_claim(
            claim, ending, config=config, board=board, error=error, done=done, reason=reason, errors=errors
        )
    except OSError as exc:
        if lifecycle.fenced(claim):
            return Ending.FENCED
        if is_disk_full(exc):  # its ending is recorded in claim.json: the next start completes it
            log.error("cannot end %s, the disk is full (%s); it stays in work/", claim.source, exc)
            if board is not None:
                board.set_aside(claim.source, Ending.DEFERRED, f"disk full: {exc}", claim_id=claim.claim_id)
            return Ending.DEFERRED
        log.exception("internal error ending %s", claim.source)
        failure: Exception = exc
    except Exception as exc:  # a bug must not lose the claim: it still gets a report
        log.exception("internal error ending %s", claim.source)
        failure = exc
    with contextlib.suppress(Exception):
        lifecycle.end_claim(
            claim, Ending.FAILED, config=config, board=board, error=internal_error(failure, path=claim.source)
        )
    return Ending.FAILED


def _generate(
    batch: list[Pending],
    config: Config,
    generator: Generator,
    cancel: threading.Event | None,
    on_step: StepHook | None,
    board: StatusBoard | None,
) -> list[Generated] | list[DiffusiondError]:
    """One pipeline call for the batch; an error of the call is every job's error."""
    starting = list({item.job.job_id: item for item in batch}.values())  # a stage's images are one job's
    for item in starting:
        job, claim, chain = item.job, item.claim, item.chain
        stage = f" stage {chain.running} of {chain.stages}" if chain is not None else ""
        claim.trail(f"generating job {job.job_id}{stage}")
        log.info(
            "started %s%s (%s, %d steps) from %s",
            job.job_id,
            stage,
            job.task,
            job.spec.steps,
            claim.source,
            extra=_fields(item),
        )
        if board is not None:
            board.started(
                job.job_id,
                claim.source,
                job.task,
                job.spec.model,
                job.spec.steps,
                claim_id=claim.claim_id,
                stage=(chain.running, chain.stages) if chain is not None else None,
            )

    def step(done: int, total: int) -> None:
        if on_step is not None:
            on_step(done, total)
        if board is not None:
            for item in starting:
                board.progress(item.job.job_id, done, total)

    try:
        return generator.generate([p.job for p in batch], cancel=cancel, on_step=step)
    except Cancelled:  # a warm stop, for run_claims to handle
        raise
    except DiffusiondError as exc:
        for item in batch:
            log.error("job %s failed: %s", item.job.job_id, exc, extra=_fields(item))
        return [exc] * len(batch)
    except Exception as exc:  # a bug in generation fails these jobs; the claims end as usual, with reports
        log.exception("internal error generating %s", ", ".join(p.job.job_id for p in batch))
        failures: list[DiffusiondError] = []
        for item in batch:
            failure = internal_error(exc, path=item.claim.source)
            failure.job_index = item.job.index
            failures.append(failure)
        return failures


def _commit(
    run: ClaimRun,
    job: Job,
    generated: Generated,
    config: Config,
    board: StatusBoard | None,
    started: float,
    earlier: tuple[EarlierStage, ...] = (),
) -> None:
    """Stamp one job's images, stage them with the manifest in the claim folder, then publish them.

    `generated` is the job's last stage; `earlier` a multi-stage job's stages before it."""
    claim = run.claim  # as `begin_run` saved it: its attempt goes into the manifest
    for tries in itertools.count(1):
        try:
            policy = StampPolicy(
                config.marks(job.spec.watermark), config.metadata_options(), config.c2pa(), config.stamp_workers()
            )
            stamped = stamp_job(
                job, generated, policy, taken=lambda name: os.path.lexists(config.outbox / name), earlier=earlier
            )
            manifest = build_manifest(job, claim, generated, stamped, earlier)
        except DiffusiondError as exc:
            run.errors.append(exc)
            return
        try:
            folder = stage(claim.folder, job.job_id, stamped.files, manifest.to_json())
        except OSError as exc:
            _write_failed(run, job.job_id, exc, config)
            return
        claim.trail(f"staged job {job.job_id}")
        published = _publish(run, job.job_id, folder, config)
        # A name of `output.name` taken by another daemon since it was chosen: choose again (names
        # by job id are unique, and a conflict there is a foreign file: that fails the job).
        if published is None and job.spec.output.name and tries < NAME_TRIES and _lost_a_name(run):
            shutil.rmtree(folder, ignore_errors=True)
            continue
        break
    if published is not None:
        if earlier:
            stages.discard(claim.folder, job.job_id)
        files = [o.file for o in manifest.outputs]
        seconds = time.perf_counter() - started
        fields = job_fields(job_id=job.job_id, job_file=claim.source, task=job.task, model=job.spec.model)
        log.info("done %s (%s) in %.2f s: %s", job.job_id, job.task, seconds, ", ".join(files), extra=fields)
        metrics.published(job.task, manifest, seconds)
        if board is not None:
            board.done(job.job_id, claim.source, files, seconds, claim_id=claim.claim_id)


NAME_TRIES = 5
"""Stagings of one job whose `output.name` names another daemon took first, before it fails."""


def _lost_a_name(run: ClaimRun) -> bool:
    """The last publish lost a name to a file that appeared meanwhile: forget that error, to try again."""
    if run.errors and isinstance(run.errors[-1], OutboxConflict):
        run.errors.pop()
        return True
    return False


def _publish(run: ClaimRun, job_id: str, folder: Path, config: Config) -> list[str] | None:
    """Publish a complete stage; its images (not the manifest), or None (the reason recorded in `run`)."""
    if not run.held():  # another daemon took the work folder over: its start fenced this claim
        log.warning("not publishing %s: another daemon took this work folder over", job_id)
        run.fenced = True
        return None
    try:
        names = publish(folder, config.outbox, job_id)
    except DiffusiondError as exc:
        run.errors.append(exc)
        return None
    except OSError as exc:
        _write_failed(run, job_id, exc, config)
        return None
    run.published.append(job_id)
    run.claim.trail(f"published job {job_id}")
    return [name for name in names if not name.endswith((".txt", ".json"))]


def _fields(item: Pending) -> dict[str, str]:
    """Journal fields for a job's log lines (`journalctl JOB_ID=...`)."""
    return job_fields(job_id=item.job.job_id, job_file=item.claim.source, task=item.job.task, model=item.job.spec.model)


def _job_fields(run: ClaimRun, job: Job) -> dict[str, str]:
    return job_fields(job_id=job.job_id, job_file=run.claim.source, task=job.task, model=job.spec.model)


def _write_failed(run: ClaimRun, job_id: str, exc: OSError, config: Config) -> None:
    """Why staging or publishing failed: fenced, a full disk (retried later), or an outbox that refuses files."""
    claim = run.claim
    if lifecycle.fenced(claim):
        run.fenced = True
    elif is_disk_full(exc):
        run.deferred = f"disk full writing job {job_id}: {exc}; retrying in {config.disk_full_retry_s:g} s"
        log.error("job %s: %s", job_id, run.deferred, extra=job_fields(job_id=job_id, job_file=claim.source))
    else:
        run.errors.append(
            JobFailed(
                f"cannot write the results to {config.outbox}: {exc}",
                code=Code.OUTPUT_FAILED,
                path=claim.source,
                fix="fix the outbox's permissions (or free space); the job runs again when dropped again",
            )
        )


class Worker(threading.Thread):
    """Takes claims from the queue until it gets None; the claims it holds always finish."""

    def __init__(
        self,
        config: Config,
        generator: Generator,
        claims: queue.Queue[Claim | None],
        board: StatusBoard | None = None,
        *,
        preload: Sequence[str] = (),
        on_preload: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(name="diffusiond-worker", daemon=True)
        self.config = config
        self.generator = generator
        self.claims = claims
        self.board = board
        self.preload = list(preload)
        """Models to load first, on this thread (the only one that runs torch), before any claim."""
        self.on_preload = on_preload
        """Called with each model's name before it loads (the service tells systemd)."""
        self.preloaded = threading.Event()
        """Set when the preloading has ended, loaded or failed (then `preload_error` says why)."""
        self.preload_error: BaseException | None = None
        self.cancel = threading.Event()
        """Set to stop the running batch at its next step boundary (`halt`, `cancel_claim`)."""
        self.halting = False
        """A warm stop was asked for (`halt`): the running claims stay in work/ or go back to the inbox."""
        self._cancelled: set[str] = set()
        self._cancel_lock = threading.Lock()
        self.on_end: EndHook | None = None
        """Called with each claim's ending, after it is counted (the service answers cancel requests)."""
        self.current: list[Claim] = []
        self.progress: tuple[int, int] | None = None
        """(step, steps) of the running pipeline call."""
        self.last_progress_s = time.monotonic()
        self.finished = 0
        self.failed = 0
        self.cancelled = 0
        self.stopping = False
        """Set when the queue's end (None) is taken: deferred claims then stay in work/ for the next start."""
        self._timers: list[threading.Timer] = []
        self.wanted_threads = 0
        """`threads:` as last applied on this thread."""
        self.held: Callable[[], bool] = lambda: True
        """Whether this daemon still owns its work folder (the service sets it): asked before each publish."""

    def run(self) -> None:
        name_os_thread("worker")  # before the first generation: torch's OpenMP threads inherit it
        self._set_threads()
        try:
            for name in self.preload:
                if self.on_preload is not None:
                    self.on_preload(name)
                self.generator.preload(name)
        except BaseException as exc:  # the service re-raises it: a model that does not load stops the start
            self.preload_error = exc
            return
        finally:
            self.preloaded.set()
        writer = Writer()
        try:
            stopping = False
            while not stopping:
                first = self.claims.get()
                if first is None:
                    self.stopping = True
                    return
                taken = [first]
                deadline = time.monotonic() + self.config.batch_wait_s
                while len(taken) < self.config.batch_size:  # more claims only when they could share a call
                    try:
                        more = self.claims.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        break
                    if more is None:
                        stopping = self.stopping = True
                        self.claims.task_done()
                        break
                    taken.append(more)
                self._run(taken, writer)
        finally:
            for timer in self._timers:
                timer.cancel()
            writer.close()  # a warm stop writes every image already made

    def halt(self) -> None:
        """Stop the running batch at its next step, for a warm stop."""
        self.halting = True
        self.cancel.set()

    def cancel_claim(self, claim_id: str) -> bool:
        """Cancel a claim this worker runs now, at its next step; False when it runs no such claim."""
        with self._cancel_lock:
            if claim_id not in {claim.claim_id for claim in self.current}:
                return False
            self._cancelled.add(claim_id)
            self.cancel.set()
            return True

    def _take_cancelled(self) -> set[str]:
        """The claims cancelled since the last call; the step boundary's stop is over unless halting."""
        with self._cancel_lock:
            taken, self._cancelled = self._cancelled, set()
            if taken and not self.halting:
                self.cancel.clear()
            return set() if self.halting else taken

    def _set_threads(self) -> None:
        """torch's CPU threads as the config says (again after a reload that changed `threads:`)."""
        wanted = self.config.torch_threads()
        if wanted == self.wanted_threads:
            return
        self.wanted_threads = wanted
        threads = set_torch_threads(wanted)
        if threads is not None:
            log.info("generation uses %d CPU thread%s", threads, "" if threads == 1 else "s")
            if self.board is not None:
                self.board.threads(threads)

    def _run(self, claims: list[Claim], writer: Writer) -> None:
        self._set_threads()
        self.current = claims
        self.last_progress_s = time.monotonic()
        ended: set[str] = set()
        try:
            run_claims(
                claims,
                self.config,
                self.generator,
                cancel=self.cancel,
                cancelled=self._take_cancelled,
                on_step=self._on_step,
                board=self.board,
                writer=writer,
                on_end=lambda claim, ending: self._ended(claim, ending, ended),
                held=self.held,
            )
            writer.drain()  # the end stage has run: every claim taken here has ended
            metrics.gpu_memory(str(getattr(self.generator, "device", "cpu")))
        except Exception as exc:  # a bug must not stop the daemon; each claim still gets a report
            log.exception("internal error on %s", ", ".join(c.source for c in claims))
            writer.drain()
            for claim in claims:
                if claim.claim_id not in ended:
                    error = internal_error(exc, path=claim.source)
                    self._ended(claim, _end(claim, Ending.FAILED, self.config, self.board, error, (), ""), ended)
        finally:
            with self._cancel_lock:
                self.current, self.progress = [], None
                self._cancelled.clear()
                if not self.halting:
                    self.cancel.clear()  # asked for a claim that ended before its next step

    def _ended(self, claim: Claim, ending: Ending, ended: set[str]) -> None:
        """Count one claim's ending: every claim taken from the queue ends here exactly once, and
        `task_done` is called once for it, so `claims.unfinished_tasks` is the claims not ended yet.
        A DEFERRED claim is put back in the queue after `disk_full_retry_s`, as a new task."""
        ended.add(claim.claim_id)
        if ending is Ending.DONE:
            self.finished += 1
        elif ending is Ending.CANCELLED:
            self.cancelled += 1
        elif ending in lifecycle.TO_FAILED:
            self.failed += 1
        elif ending is Ending.DEFERRED:
            again = dataclasses.replace(claim, jobs=None, resumed=True, running=False)
            timer = threading.Timer(self.config.disk_full_retry_s, self._retry, [again])
            timer.daemon = True
            self._timers = [t for t in self._timers if t.is_alive()] + [timer]
            timer.start()
        self.claims.task_done()
        if self.on_end is not None:
            try:
                self.on_end(claim, ending)
            except Exception:  # telling about an ending never breaks the accounting
                log.exception("internal error reporting the end of %s", claim.source)

    def _retry(self, claim: Claim) -> None:
        if not self.stopping:
            log.info("trying %s again (it waited for disk space)", claim.source)
            self.claims.put(claim)

    def _on_step(self, step: int, steps: int) -> None:
        now = time.monotonic()
        if step > 1:  # the first step's time includes the call's set-up
            metrics.STEP_SECONDS.observe(now - self.last_progress_s)
        self.progress = (step, steps)
        self.last_progress_s = now

    @property
    def idle(self) -> bool:
        """Nothing running, queued or waiting to be tried again (a claim deferred for disk space)."""
        waiting = any(timer.is_alive() for timer in self._timers)
        return not self.current and self.claims.unfinished_tasks == 0 and not waiting
