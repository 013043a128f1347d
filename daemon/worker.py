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

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from diffusiond.daemon import lifecycle
from diffusiond.daemon.claim import Claim, load_jobs
from diffusiond.daemon.config import Config
from diffusiond.daemon.journal import job_fields
from diffusiond.daemon.outbox import commit, discard_partial
from diffusiond.daemon.scheduler import Pending, plan_batches
from diffusiond.daemon.status import StatusBoard
from diffusiond.daemon.threads import name_os_thread
from diffusiond.pipeline.backend import Cancelled, Generated, Generator, StepHook
from diffusiond.pipeline.errors import DiffusiondError, internal_error

log = logging.getLogger(__name__)
WriteTask = Callable[[], None]
EndHook = Callable[[Claim, bool], None]


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


def run_claims(
    claims: list[Claim],
    config: Config,
    generator: Generator,
    *,
    cancel: threading.Event | None = None,
    on_step: StepHook | None = None,
    board: StatusBoard | None = None,
    writer: Writer,
    on_end: EndHook,
) -> None:
    """Pre-check, run every job not yet done (batched), then archive or fail each claim.

    Stages 3b and 4 run on `writer`, in order; `on_end(claim, ok)` is called once per claim
    when it has ended. Raises `Cancelled` when `cancel` is set during a step: the claims then
    stay in `work/` as they are (drain the writer first).
    """
    # 1. Pre-check each claim: validate the claimed copy and its images; a wrong one goes to failed/ now.
    #    (The service validated it when it claimed it and passes the jobs along; a claim resumed after a
    #    crash is validated here, or read back from its jobs.json.)
    ready: list[Claim] = []
    pending: list[Pending] = []
    totals: dict[str, int] = {}
    for claim in claims:
        try:
            jobs = list(claim.jobs) if claim.jobs is not None else load_jobs(claim, config)
        except DiffusiondError as exc:
            reject(claim, config, exc, board)
            on_end(claim, False)
            continue
        ready.append(claim)
        totals[claim.claim_id] = len(jobs)
        # A claim re-run after a crash skips the jobs whose manifest is written.
        pending += [Pending(claim, job) for job in jobs if not lifecycle.is_done(claim, job.job_id)]
    # 2. Plan: jobs that can share a pipeline call go together, in arrival order.
    errors: dict[str, list[DiffusiondError]] = {claim.claim_id: [] for claim in ready}
    for batch in plan_batches(pending, config.batch_size):
        # 3a. Run the batch on the device (this thread) ...
        started = time.perf_counter()
        results = _generate(batch, config, generator, cancel, on_step, board)

        # 3b. ... and commit each job, images first, manifest last, while the next batch runs.
        def write(batch: list[Pending] = batch, results: Any = results, started: float = started) -> None:
            for item, result in zip(batch, results, strict=True):
                error = result if isinstance(result, DiffusiondError) else _commit(item, result, config, board, started)
                if error is not None:
                    errors[item.claim.claim_id].append(error)

        writer.submit(write)

    # 4. End each claim: inputs to archive/ when every job finished, else to failed/ with the report.
    def end() -> None:
        for claim in ready:
            failed = errors[claim.claim_id]
            try:
                if failed:
                    report = lifecycle.fail(claim, config, failed[0])
                    if board is not None:
                        board.failed(claim.source, str(failed[0].code), str(failed[0]), str(report))
                    log.warning(
                        "failed %s: %d of %d jobs failed (report: %s)",
                        claim.source,
                        len(failed),
                        totals[claim.claim_id],
                        report,
                    )
                else:
                    lifecycle.archive(claim, config)
            except Exception as exc:  # a bug must not lose the claim: it still gets a report
                log.exception("internal error ending %s", claim.source)
                failed = [internal_error(exc, path=claim.source)]
                if claim.folder.exists():
                    lifecycle.fail(claim, config, failed[0])
            on_end(claim, not failed)

    writer.submit(end)


def reject(claim: Claim, config: Config, exc: DiffusiondError, board: StatusBoard | None) -> None:
    """A claim whose job file or images are wrong: to failed/ with its report, before anything runs."""
    report = lifecycle.fail(claim, config, exc)
    log.warning("rejected %s: %s (report: %s)", claim.source, exc, report, extra=job_fields(job_file=claim.source))
    if board is not None:
        board.failed(claim.source, str(exc.code), str(exc), str(report))


def _generate(
    batch: list[Pending],
    config: Config,
    generator: Generator,
    cancel: threading.Event | None,
    on_step: StepHook | None,
    board: StatusBoard | None,
) -> list[Generated] | list[DiffusiondError]:
    """One pipeline call for the batch; an error of the call is every job's error."""
    for item in batch:
        if item.claim.resumed:  # a job id is new with each claim: only a resumed one can have left parts
            discard_partial(config.outbox, item.job)
        if board is not None:
            board.started(item.job.job_id, item.claim.source, item.job.task, item.job.spec.model, item.job.spec.steps)

    def step(done: int, total: int) -> None:
        if on_step is not None:
            on_step(done, total)
        if board is not None:
            for item in batch:
                board.progress(item.job.job_id, done, total)

    try:
        return generator.generate([p.job for p in batch], cancel=cancel, on_step=step)
    except DiffusiondError as exc:
        for item in batch:
            log.error("job %s failed: %s", item.job.job_id, exc, extra=_fields(item))
        return [exc] * len(batch)


def _commit(
    item: Pending,
    generated: Generated,
    config: Config,
    board: StatusBoard | None,
    started: float,
) -> DiffusiondError | None:
    """Stamp and write one job's images and manifest; the job's error, or None when it is done."""
    job, claim = item.job, item.claim
    try:
        context: dict[str, Any] = {
            "claimed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(claim.claimed_at)),
            "input_image": {"file": job.image.name, "sha256": job.image.sha256} if job.image else None,
            "model": generated.model.record() if generated.model else None,
            "prediction": generated.prediction,
            "device": generated.device,
            "dtype": generated.dtype,
            "memory": generated.memory,
            "batch_size": generated.batch_size,
        }
        manifest = commit(
            config.outbox,
            job,
            generated,
            context=context,
            marks=config.marks(job.spec.watermark),
            options=config.metadata_options(),
            c2pa=config.c2pa(),
        )
    except DiffusiondError as exc:
        return exc
    except Exception as exc:  # a bug in stamping or writing fails this job, not the daemon
        log.exception("internal error writing %s", job.job_id, extra=_fields(item))
        return internal_error(exc, path=claim.source)
    lifecycle.mark_done(claim, job.job_id)
    files = [o["file"] for o in manifest["outputs"]]
    seconds = time.perf_counter() - started
    log.info("done %s (%s) in %.2f s: %s", job.job_id, job.task, seconds, ", ".join(files), extra=_fields(item))
    if board is not None:
        board.done(job.job_id, claim.source, files, seconds)
    return None


def _fields(item: Pending) -> dict[str, str]:
    """Journal fields for a job's log lines (`journalctl JOB_ID=...`)."""
    return job_fields(job_id=item.job.job_id, job_file=item.claim.source, task=item.job.task, model=item.job.spec.model)


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
        """Set to stop the running batch at its next step boundary (its claims stay in work/)."""
        self.current: list[Claim] = []
        self.progress: tuple[int, int] | None = None
        """(step, steps) of the running pipeline call."""
        self.last_progress_s = time.monotonic()
        self.finished = 0
        self.failed = 0

    def run(self) -> None:
        name_os_thread("worker")  # before the first generation: torch's OpenMP threads inherit it
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
                    return
                taken = [first]
                deadline = time.monotonic() + self.config.batch_wait_s
                while len(taken) < self.config.batch_size:  # more claims only when they could share a call
                    try:
                        more = self.claims.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        break
                    if more is None:
                        stopping = True
                        self.claims.task_done()
                        break
                    taken.append(more)
                self._run(taken, writer)
        finally:
            writer.close()  # a warm stop writes every image already made

    def _run(self, claims: list[Claim], writer: Writer) -> None:
        self.current = claims
        self.last_progress_s = time.monotonic()
        ended: set[str] = set()

        def on_end(claim: Claim, ok: bool) -> None:
            ended.add(claim.claim_id)
            if ok:
                self.finished += 1
            else:
                self.failed += 1
            self.claims.task_done()

        try:
            run_claims(
                claims,
                self.config,
                self.generator,
                cancel=self.cancel,
                on_step=self._on_step,
                board=self.board,
                writer=writer,
                on_end=on_end,
            )
        except Cancelled:
            writer.drain()  # the batches made before the cancel are written: their jobs count as done
            for claim in claims:
                if claim.claim_id in ended or not claim.folder.exists():
                    continue
                if lifecycle.done_jobs(claim):
                    log.info("stopped %s mid-way; its remaining jobs run on the next start", claim.source)
                else:
                    lifecycle.release(claim, self.config)
                    log.info("stopped %s at a step boundary; it is back in the inbox", claim.source)
                ended.add(claim.claim_id)
                self.claims.task_done()
        except Exception as exc:  # a bug must not stop the daemon; each claim still gets a report
            log.exception("internal error on %s", ", ".join(c.source for c in claims))
            writer.drain()
            for claim in claims:
                if claim.claim_id not in ended:
                    if claim.folder.exists():
                        lifecycle.fail(claim, self.config, internal_error(exc, path=claim.source))
                    on_end(claim, False)
        finally:
            self.current, self.progress = [], None

    def _on_step(self, step: int, steps: int) -> None:
        self.progress = (step, steps)
        self.last_progress_s = time.monotonic()

    @property
    def idle(self) -> bool:
        return not self.current and self.claims.unfinished_tasks == 0
