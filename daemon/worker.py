"""Running claims, one at a time, in a thread that keeps the models warm.

`run_claim` is the whole life of a claimed job file after the claim, as numbered
stages; `Worker` is the thread that feeds it from the queue.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from diffusiond.daemon import lifecycle
from diffusiond.daemon.claim import Claim, load_jobs
from diffusiond.daemon.config import Config
from diffusiond.daemon.outbox import commit, discard_partial, sha256_file
from diffusiond.pipeline.errors import Code, DiffusiondError, JobFailed
from diffusiond.pipeline.generate import generate
from diffusiond.pipeline.models import ModelCache

log = logging.getLogger(__name__)


def run_claim(claim: Claim, config: Config, cache: ModelCache) -> bool:
    """Pre-check, run every job not yet done, then archive or fail; True if all jobs finished."""
    # 1. Pre-check: validate the claimed copy and its images; nothing runs if any job is wrong.
    try:
        jobs = load_jobs(claim, config)
    except DiffusiondError as exc:
        report = lifecycle.fail(claim, config, exc)
        log.warning("rejected %s: %s (report: %s)", claim.source, exc, report)
        return False
    # 2. Run each job; a claim re-run after a crash skips the jobs whose manifest is written.
    errors: list[DiffusiondError] = []
    for job, image in jobs:
        if lifecycle.is_done(claim, job.job_id):
            continue
        discard_partial(config.outbox, job)
        started = time.perf_counter()
        try:
            generated = generate(cache, job, claim.inputs / image if image else None)
            context: dict[str, Any] = {
                "claimed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(claim.claimed_at)),
                "input_image": {"file": image, "sha256": sha256_file(claim.inputs / image)} if image else None,
                "model": {"name": job.spec.model, "path": str(cache.entries[job.spec.model].path)}
                if job.spec.model in cache.entries
                else None,
                "device": cache.device,
                "dtype": str(cache.dtype).removeprefix("torch."),
            }
            manifest = commit(config.outbox, job, generated, context=context)
        except DiffusiondError as exc:
            log.error("job %s failed: %s", job.job_id, exc)
            errors.append(exc)
            continue
        lifecycle.mark_done(claim, job.job_id)
        files = ", ".join(o["file"] for o in manifest["outputs"])
        log.info("done %s (%s) in %.2f s: %s", job.job_id, job.task, time.perf_counter() - started, files)
    # 3. End: inputs to archive/ when every job finished, else to failed/ with the report.
    if errors:
        report = lifecycle.fail(claim, config, errors[0])
        log.warning("failed %s: %d of %d jobs failed (report: %s)", claim.source, len(errors), len(jobs), report)
        return False
    lifecycle.archive(claim, config)
    return True


class Worker(threading.Thread):
    """Takes claims from the queue until it gets None; the current claim always finishes."""

    def __init__(self, config: Config, cache: ModelCache, claims: queue.Queue[Claim | None]) -> None:
        super().__init__(name="diffusiond-worker", daemon=True)
        self.config = config
        self.cache = cache
        self.claims = claims
        self.current: Claim | None = None
        self.finished = 0
        self.failed = 0

    def run(self) -> None:
        while (claim := self.claims.get()) is not None:
            self.current = claim
            try:
                ok = run_claim(claim, self.config, self.cache)
            except Exception as exc:  # a bug must not stop the daemon; the claim still gets a report
                log.exception("internal error on %s", claim.source)
                ok = False
                error = JobFailed(
                    f"internal error: {type(exc).__name__}: {exc}",
                    code=Code.GENERATION_FAILED,
                    path=claim.source,
                    fix="this is a diffusiond bug: please report it with the daemon's log",
                )
                if claim.folder.exists():
                    lifecycle.fail(claim, self.config, error)
            self.finished += ok
            self.failed += not ok
            self.current = None
            self.claims.task_done()

    @property
    def idle(self) -> bool:
        return self.current is None and self.claims.unfinished_tasks == 0
