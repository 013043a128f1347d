"""The daemon's lifecycle on one screen: bootstrap, signals, loop, teardown.

The main thread watches and claims; the worker thread generates. The first
SIGTERM/SIGINT is a warm stop (stop claiming, put queued claims back in the
inbox, let the running claim finish); a second one exits at once, and the
running claim is picked up again from `work/` on the next start.

What makes the images is a `Generator` (pipeline/backend.py) built by the
`generator_factory` the daemon is given: diffusers unless the starting code
passes another. The config cannot choose it.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from diffusiond.daemon import cancel, lifecycle, metrics, registry
from diffusiond.daemon.claim import Claim, claim, load_jobs
from diffusiond.daemon.config import Config
from diffusiond.daemon.fsutil import is_disk_full
from diffusiond.daemon.hooks import Hooks, hook_for
from diffusiond.daemon.inbox import InboxWatcher, SettleTracker, is_candidate
from diffusiond.daemon.journal import job_fields
from diffusiond.daemon.lease import Lease
from diffusiond.daemon.lifecycle import Ending
from diffusiond.daemon.pairing import Intent, Pairing, file_stamp, is_job_file, same_stem_image, same_stem_mask
from diffusiond.daemon.status import DaemonState, StatusBoard, reload_clock
from diffusiond.daemon.systemd import Notifier
from diffusiond.daemon.threads import name_os_thread
from diffusiond.daemon.webhooks import Webhooks
from diffusiond.daemon.worker import Worker
from diffusiond.daemon.worklock import WorkLock, lock_work_folder
from diffusiond.pipeline.backend import Generator
from diffusiond.pipeline.errors import ConfigError, DiffusiondError, internal_error

log = logging.getLogger(__name__)
GeneratorFactory = Callable[[Config], Generator]
FOLDERS = ("inbox", "outbox", "archive", "failed", "work")
EXTEND_TIMEOUT_USEC = 300_000_000
"""Asked for before each preloaded model: loading a large model from a slow disk takes minutes."""
CLAIM_WINDOW = 64
"""Stable files the pairing looks at per round, oldest first; the rest wait their turn (a flood stays cheap)."""
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
NEARLY_DONE = 0.8
"""On SIGTERM a job this far through its steps is finished rather than interrupted."""
INBOX_VIEW_S = 1.0
"""How often status.json's `inbox` (the files not claimed yet, with why) is brought up to date."""
INBOX_VIEW_FILES = 50
OWNER_CHECK_S = 1.0
"""How often the owner record is read (one small file): a superseded daemon, idle or not, steps down within it."""
CANCEL_POLL_S = 0.5
"""How often the spool's cancel requests are read (one listdir of `.cancel/`)."""


def diffusers_generator(config: Config) -> Generator:
    """The real generator on the config's device; a device this machine lacks stops the start (ConfigError)."""
    from diffusiond.pipeline.generate import DiffusersGenerator  # imports torch and diffusers
    from diffusiond.pipeline.models import ModelCache, resolve_device, resolve_dtype

    device = resolve_device(config.device)
    cache = ModelCache(
        config.model_entries(),
        device=device,
        dtype=resolve_dtype(config.dtype, device),
        memory=config.memory,
        max_loaded=config.max_loaded_models,
        state_dir=config.state,
        networks=config.extra_networks(),
    )
    return DiffusersGenerator(cache)


class Daemon:
    """One daemon on one spool: `run()` serves until `stop` is set or a signal comes.

    The main thread (this object's loop) watches, pairs, claims and validates; a `Worker` thread
    runs the claims on the generator; the worker's writer thread stamps and writes the results.
    Tests run it in a thread and stop it with `stop`; `diffusiond run` runs it on the main thread,
    where it also installs the signal handlers.
    """

    def __init__(
        self,
        config: Config,
        *,
        oneshot: bool = False,
        reload_config: Callable[[], Config] | None = None,
        generator_factory: GeneratorFactory = diffusers_generator,
        take_over: bool = False,
    ) -> None:
        self.config = config
        self.oneshot = oneshot
        self.take_over = take_over
        """Take the work folder even from a live holder (a cluster slot Ray restarted; daemon/worklock.py)."""
        self.owner: WorkLock | None = None
        self.superseded = ""
        """Who took the work folder over while this daemon ran (then it stepped down), or empty."""
        self.reload_config = reload_config
        """Reads the config again on SIGHUP (the same file and command-line overrides)."""
        self.generator_factory = generator_factory
        """Builds what makes the images, at start (tests and the bench pass the stand-in's)."""
        self.reload_requested = threading.Event()
        self._reload_asked = 0.0
        """When the last SIGHUP came (`reload_clock()`): the reload that follows records it for `diffusiond reload`."""
        self.stop = threading.Event()
        """Set it (a signal, a test) for a warm stop."""
        self.claims: queue.Queue[Claim | None] = queue.Queue()
        self.ready = threading.Event()
        """Set once the watcher runs, preloaded models are loaded and leftover claims are queued."""
        self.generator: Generator | None = None
        self.notifier = Notifier()
        self.board = StatusBoard(config.state)
        """status.json and events.jsonl in the state dir, for `diffusiond status` and other tools."""
        self.hooks = Hooks(on_failure=self.board.hook_failed)
        self.webhooks = Webhooks(config)
        self.board.listener = self._on_job_end
        self._worker: Worker | None = None
        self.rejected = 0
        """Claims failed at validation, before they reached the worker."""
        self.cancelled = 0
        """Claims cancelled before they reached the worker (queued, or still in the inbox)."""
        self._cancelling: dict[str, cancel.Request] = {}
        """Running claims asked to cancel (by claim id), answered when they end (`_answer_cancel`)."""
        # Enough claims queued ahead to fill a batch.
        self._prefetch = max(config.prefetch, config.batch_size)

    def run(self) -> int:
        """Serve until stopped (or, with `oneshot`, until the inbox is empty); returns the exit code:
        0, or with `oneshot` 1 when any job failed or was rejected.

        The work folder is this daemon's for the whole run: another live daemon with the same
        instance makes this one refuse to start (ConfigError) before it touches anything; with
        `take_over`, this one takes it, and the other steps down (a warm stop) when it next looks.
        """
        owner = self.owner = lock_work_folder(
            self.config.work_dir, instance=self.config.instance, take_over=self.take_over
        )
        try:
            return self._serve()
        finally:
            owner.release()

    def _serve(self) -> int:
        config = self.config
        # 1. Bootstrap: the generator (the device is checked first), folders, the worker, claims left by a crash.
        generator = self.generator = self.generator_factory(config)
        for name in FOLDERS:
            config.folder(name).mkdir(parents=True, exist_ok=True)
        config.work_dir.mkdir(parents=True, exist_ok=True)
        if os.stat(config.outbox).st_dev != os.stat(config.work_dir).st_dev:
            log.warning(
                "the outbox %s is on another filesystem than %s: each output is copied in (still whole, the "
                "manifest last), and a crash mid-copy can leave a hidden temp file until that job is published",
                config.outbox,
                config.work_dir,
            )
        self.board.state(DaemonState.STARTING)
        # Preloaded models load on the worker thread, which runs every model: torch on a second thread
        # slows CPU generation 1.2-3x for good (see daemon/worker.py). Before ready: the first job finds
        # its model warm.
        worker = Worker(
            config,
            generator,
            self.claims,
            self.board,
            preload=config.preload,
            on_preload=lambda name: self.notifier.send(
                extend_timeout_usec=EXTEND_TIMEOUT_USEC, status=f"loading model {name}"
            ),
        )
        worker.on_end = self._answer_cancel
        worker.held = self._held
        self._worker = worker
        lease = Lease(config)
        self._beat(lease)  # before the leftovers: no other daemon takes them over while they are resumed here
        worker.start()
        while not worker.preloaded.wait(lease.every_s):  # loading models can take minutes
            self._beat(lease)
        if worker.preload_error is not None:
            raise worker.preload_error
        for leftover in lifecycle.leftover_claims(config, self.board):
            log.info("resuming %s, claimed before the last stop", leftover.source)
            self.claims.put(leftover)
        watcher = InboxWatcher(config.inbox, mode=config.watch.mode, poll_interval_s=config.watch.poll_interval_s)
        # 2. Signals (only the main thread may install them; tests run the daemon in a thread).
        if threading.current_thread() is threading.main_thread():
            # The hook and webhook threads first: the processes hooks start must not inherit the mask below.
            self.hooks.start()
            self.webhooks.start()
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
            signal.signal(signal.SIGHUP, self._on_reload_signal)
            # Blocked on this thread, so the kernel hands them to another one: the handlers still run
            # here (Python runs them on the main thread), at the next bytecode, but never by interrupting
            # a timed wait of this thread. On Debian 12's Python 3.11.2 such an interrupted wait (the
            # inbox queue's get with a timeout) once never returned: `systemctl stop` hung until SIGKILL.
            # Every wait of this thread from here on has a timeout, so a handler runs within 0.5 s.
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            name_os_thread("diffusiond")  # `top` and `ps` show the daemon, not "python"
        watcher.start()
        log.info(
            "watching %s (device %s, %s mode), results in %s",
            config.inbox,
            generator.device,
            config.watch.mode,
            config.outbox,
        )
        self.ready.set()
        self.notifier.ready(self._status(worker))
        self.board.state(DaemonState.READY)
        registry.announce(config)
        self.webhooks.start()  # what the last run left unsent, then what comes (started once)
        try:
            # 3. Loop: events → settle → pair → claim, while the worker has room.
            self._loop(watcher, worker, lease)
        finally:
            # 4. Teardown: no more claims, queued ones back to the inbox, the running one finishes.
            self.notifier.stopping("stopping: finishing the running job, putting queued ones back")
            self.board.state(DaemonState.STOPPING)
            registry.announce(self.config, state="stopping")
            watcher.stop()
            self._release_queued()
            self.claims.put(None)
            while worker.is_alive():  # timed: a second SIGTERM is handled while the running job ends
                worker.join(0.5)
            self.hooks.close()  # the last jobs' hooks, each within its timeout
            self.webhooks.close()  # what is unsent stays in <state>/notify/ for the next start
            registry.withdraw(self.config)
        failed, cancelled = worker.failed + self.rejected, worker.cancelled + self.cancelled
        log.info("stopped: %d claims finished, %d failed, %d cancelled", worker.finished, failed, cancelled)
        if self.superseded:
            log.error("stepped down: %s took this work folder over while this daemon ran", self.superseded)
        self.notifier.close()
        self.board.state(DaemonState.STOPPED)
        self.board.flush()
        metrics.write(self.config.state)
        # `run --oneshot` is a batch run that scripts check: 1 when any input failed (or was cancelled:
        # it did not succeed either). A service stops with 0.
        return 1 if self.oneshot and (failed or cancelled) else 0

    def _on_job_end(self, event: dict[str, object]) -> None:
        """A job done or a file failed (from the board, on the thread that ended it): its hook, if any."""
        run = hook_for(event, self.config)
        if run is not None:
            self.hooks.submit(run)
        self.webhooks.event(event)

    def _on_reload_signal(self, _signum: int, _frame: object) -> None:
        self._reload_asked = reload_clock()
        self.reload_requested.set()

    def _reload(self, worker: Worker, asked: float) -> bool:
        """SIGHUP: read the config again; queued and running jobs go on. A wrong config is refused.

        `asked` (when the SIGHUP came) goes into status.json with the outcome: `diffusiond reload`,
        the units' ExecReload, waits for it, so that `systemctl reload` returns once the config is read.
        """
        self.notifier.send(reloading=1, monotonic_usec=time.monotonic_ns() // 1000, status="reloading the config")
        self.board.state(DaemonState.RELOADING)
        try:
            if self.reload_config is None:
                raise ConfigError("this daemon was started without a config to reload", fix="restart it instead")
            new = self.reload_config()
            moved = [n for n in (*FOLDERS, "instance") if _place(new, n) != _place(self.config, n)]
            if moved:
                raise ConfigError(
                    f"{', '.join(moved)} changed; moving folders needs a restart",
                    fix="restart the service (systemctl restart) to use the new folders",
                )
        except Exception as exc:  # a config given on reload never stops the daemon, a bug in reading it neither
            if isinstance(exc, DiffusiondError):
                log.error("config reload refused, keeping the running config: %s", exc)
                message, error = exc.message, str(exc)
            else:
                log.exception("config reload refused (internal error), keeping the running config")
                message = error = f"internal error reading the config: {exc!r}"
            self.notifier.ready(f"config reload refused: {message}; {self._status(worker)}")
            self.board.state(DaemonState.READY)
            self.board.reloaded(asked, error=error)
            return False
        self.config = worker.config = self.webhooks.config = new
        self._prefetch = max(new.prefetch, new.batch_size)
        if self.generator is not None:
            self.generator.reconfigure(
                new.model_entries(),
                memory=new.memory,
                max_loaded=new.max_loaded_models,
                networks=new.extra_networks(),
            )
        registry.announce(new)
        log.info("config reloaded")
        self.notifier.ready(self._status(worker))
        self.board.state(DaemonState.READY)
        self.board.reloaded(asked, error=None)
        return True

    def _status(self, worker: Worker) -> str:
        """One line for `systemctl status`: what runs, how far, how much waits."""
        queued = self.claims.qsize()
        running = [claim.source for claim in worker.current]
        if not running:
            return f"idle, watching {self.config.inbox}" + (f"; {queued} queued" if queued else "")
        step = f" (step {worker.progress[0]} of {worker.progress[1]})" if worker.progress else ""
        failed, cancelled = worker.failed + self.rejected, worker.cancelled + self.cancelled
        counts = f"{worker.finished} done, {failed} failed" + (f", {cancelled} cancelled" if cancelled else "")
        return f"running {', '.join(running)}{step}; {queued} queued; {counts}"

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.stop.is_set():
            log.warning("second %s: stopping now; the running job resumes on the next start", signal.strsignal(signum))
            for running in self._worker.current if self._worker is not None else []:
                lifecycle.mark_stopped(running)  # stopped on purpose: not counted as a crash
            os._exit(1)
        self.request_stop(str(signal.strsignal(signum)))

    def request_stop(self, why: str = "asked to stop") -> None:
        """The warm stop (the first SIGTERM; a cluster slot's `stop()`): claim nothing more, put the queued
        claims back, stop the running job at its next step unless it is nearly done."""
        self.stop.set()
        progress = self._worker.progress if self._worker is not None else None
        if progress is not None and progress[0] >= NEARLY_DONE * progress[1]:
            log.info("%s: the running job is nearly done; finishing it, then stopping", why)
        else:
            log.info("%s: stopping the running job at its next step, then stopping", why)
            if self._worker is not None:
                self._worker.halt()

    def _held(self) -> bool:
        """Whether this daemon still owns its work folder; once it does not, it steps down (a warm stop)."""
        if self.owner is None or self.superseded:
            return not self.superseded
        if self.owner.held():
            return True
        self.superseded = self.owner.successor()
        log.error(
            "another daemon took this work folder over (%s): stepping down, claiming nothing more", self.superseded
        )
        self.stop.set()
        if self._worker is not None:
            self._worker.halt()
        return False

    def _beat(self, lease: Lease) -> None:
        """Touch this daemon's lease (it is healthy), after checking it still owns its work folder."""
        if not self._held():
            return
        try:
            lease.beat()
        except OSError as exc:  # a share gone for a moment: beat again next time
            log.warning("cannot touch the lease %s: %s", self.config.work_dir, exc)

    def _take_over(self, lease: Lease) -> None:
        """Take over the claims of every daemon on the spool whose lease ran out (daemon/lease.py)."""
        for lost in lease.expired():
            if self.stop.is_set() or not self._held():
                return
            folders = lease.take_over(lost)
            if not folders:
                continue
            log.warning(
                "the lease of %s ran out %.0f s ago: taking over its %d claim(s)",
                lost.folder.name,
                lost.age_s,
                len(folders),
            )
            for taken in lifecycle.taken_over_claims(folders, lost.folder.name, self.config, self.board):
                log.info("resuming %s, taken over from %s", taken.source, lost.folder.name)
                self.claims.put(taken)

    def _loop(self, watcher: InboxWatcher, worker: Worker, lease: Lease) -> None:
        tracker = SettleTracker(self.config.watch.settle_s)
        pairing = Pairing.for_config(self.config)
        next_scan = next_ping = next_view = next_cancels = next_metrics = next_lease = next_owner = 0.0
        next_beat = time.monotonic() + registry.HEARTBEAT_S
        last_status, last_status_s = "", 0.0
        watchdog_s = _watchdog_interval_s()
        while not self.stop.is_set():
            config = self.config
            wait_s = 0.05 if len(tracker) else 0.5
            if watchdog_s:
                wait_s = min(wait_s, watchdog_s / 4)
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                if self._reload(worker, asked=self._reload_asked):
                    config, pairing = self.config, Pairing.for_config(self.config)
                    tracker.settle_s = config.watch.settle_s
            for change in watcher.next_changes(timeout_s=wait_s):
                relative = _relative(change.path, config.inbox)
                if relative is not None and is_candidate(relative):
                    tracker.touch(change.path, renamed=change.renamed)
            now = time.monotonic()
            if now >= next_scan:
                # Events can be missed (overflowing inotify queues, network folders): rescan.
                for path in watcher.scan():
                    tracker.touch(path)
                next_scan = now + config.watch.rescan_interval_s
            if now >= next_cancels:
                self._cancel_asked(tracker, worker)
                next_cancels = now + CANCEL_POLL_S
            if self.claims.qsize() < self._prefetch:
                self._claim_ready(tracker, pairing, now)
            if now >= next_beat:
                registry.announce(config)
                next_beat = now + registry.HEARTBEAT_S
            if now >= next_owner:
                if not self._held():
                    return
                next_owner = now + OWNER_CHECK_S
            if now >= next_lease:
                lease.timeout_s = config.lease_timeout_s  # a reload may change it
                if _health_problem(config, watcher, worker, now) is None:  # a hung daemon's claims are taken over
                    self._beat(lease)
                try:
                    if not self.stop.is_set():
                        self._take_over(lease)
                except OSError as exc:
                    log.warning("cannot look at the other daemons' leases: %s", exc)
                next_lease = now + lease.every_s
            if watchdog_s and now >= next_ping:
                # Ping only while the service really works: a hung job or a dead watcher stops the pings.
                problem = _health_problem(config, watcher, worker, now)
                if problem is None:
                    self.notifier.send(watchdog=1)
                else:
                    log.error("not sending the watchdog ping: %s", problem)
                next_ping = now + watchdog_s / 2
            self.board.queue(self.claims.qsize())
            if now >= next_view:
                self.board.inbox(len(tracker), _inbox_view(tracker, pairing, config.inbox, now))
                next_view = now + INBOX_VIEW_S
            if now >= next_metrics:
                metrics.QUEUE.set(self.claims.qsize())
                metrics.INBOX.set(len(tracker))
                metrics.write(config.state)
                next_metrics = now + metrics.WRITE_EVERY_S
            self.board.flush_due()
            status = self._status(worker)
            if status != last_status and now - last_status_s >= 0.5:
                self.notifier.status(status)
                last_status, last_status_s = status, now
            if self.oneshot and not len(tracker) and worker.idle:
                return

    def _claim_ready(self, tracker: SettleTracker, pairing: Pairing, now: float) -> None:
        """Claim (and validate) files until the queue holds `prefetch` claims or nothing is ready."""
        inbox = self.config.inbox
        present = _Present(tracker, inbox)
        while (room := self._prefetch - self.claims.qsize()) > 0 and not self.stop.is_set():
            stable = [p.relative_to(inbox).as_posix() for p in tracker.stable(now, limit=CLAIM_WINDOW)]
            intents = pairing.decide(stable, present, now, stamp=lambda rel: file_stamp(inbox / rel), limit=room)
            if not intents or not self._held():  # a daemon that lost its work folder claims nothing
                return
            for intent in intents:
                if self.stop.is_set():  # stopping: what is released to the inbox now must stay there
                    return
                config = self.config
                for relative in intent.files:
                    tracker.forget(inbox / relative)  # claimed, or left for the next rescan
                try:
                    claimed = claim(intent, config)
                except OSError as exc:  # a full disk, permissions: the files stay in the inbox for the next rescan
                    log.error("cannot claim %s: %s; trying again at the next rescan", intent.source, exc)
                    if is_disk_full(exc):
                        self.board.set_aside(intent.source, Ending.DEFERRED, f"disk full claiming it: {exc}")
                    return
                except Exception:  # a bug must not stop the daemon: the files stay in the inbox
                    log.exception("internal error claiming %s; trying again at the next rescan", intent.source)
                    continue
                if claimed is None:
                    continue
                if not self._held():  # taken over meanwhile: the new owner's start may not have seen this claim
                    lifecycle.end_claim(
                        claimed, Ending.RELEASED, config=config, board=self.board, reason="stepping down"
                    )
                    return
                log.info("claimed %s as %s", intent.source, claimed.claim_id, extra=job_fields(job_file=intent.source))
                self.board.claimed(claimed.claim_id, intent.source)
                # Validate now, while the worker runs the previous job: a wrong file fails without waiting its turn.
                try:
                    jobs = load_jobs(claimed, config, parsed=intent.parsed)
                except DiffusiondError as exc:
                    self._reject(claimed, exc)
                    continue
                except Exception as exc:  # a bug must not stop the daemon, nor stop it again on every start
                    if is_disk_full(exc):  # the worker validates it again, waiting for space if it must
                        log.error("cannot validate %s now: %s; it waits in work/", intent.source, exc)
                        self.claims.put(replace(claimed, jobs=None))
                        continue
                    log.exception("internal error validating %s", intent.source)
                    self._reject(claimed, internal_error(exc, path=claimed.source))
                    continue
                self.claims.put(replace(claimed, jobs=tuple(jobs)))

    def _cancel_asked(self, tracker: SettleTracker, worker: Worker) -> None:
        """Act on the cancel requests whose target this daemon holds: running, queued or in the inbox."""
        acting = {asked.path for asked in self._cancelling.values()}  # running: answered when it has stopped
        for request in cancel.pending(self.config.spool):
            if request.path in acting:
                continue
            try:
                self._cancel(request, tracker, worker)
            except Exception:  # a bug must not stop the daemon; the request stays for the next look
                log.exception("internal error cancelling %s", request.target)

    def _cancel(self, request: cancel.Request, tracker: SettleTracker, worker: Worker) -> None:
        config = self.config
        for running in list(worker.current):
            if request.matches(running.claim_id, running.source) and worker.cancel_claim(running.claim_id):
                self._cancelling[running.claim_id] = request
                log.info("cancelling %s at its next step", running.source, extra=job_fields(job_file=running.source))
                cancel.answer(request, self._told(request, running, "cancelling"), final=False)
                return
        with self.claims.mutex:  # waiting for the worker: out of the queue, then ended here
            queued = next((c for c in self.claims.queue if c and request.matches(c.claim_id, c.source)), None)
            if queued is not None:
                self.claims.queue.remove(queued)
        if queued is None:
            queued = self._claim_for_cancel(request.target, tracker)
            if queued is None:
                return  # not this daemon's: another one may hold it
            with self.claims.mutex:  # counted as a queue task, so ending it below is as for any claim
                self.claims.unfinished_tasks += 1
        try:
            error = lifecycle.cancelled_error(queued)
            ending = lifecycle.end_claim(queued, Ending.CANCELLED, config=config, board=self.board, error=error)
        finally:
            self.claims.task_done()
        if ending is Ending.CANCELLED:
            self.cancelled += 1
        cancel.answer(request, self._told(request, queued, str(ending)), final=True)

    def _claim_for_cancel(self, target: str, tracker: SettleTracker) -> Claim | None:
        """Claim an inbox file named by a cancel request (with its same-stem image and mask), to end it."""
        inbox = self.config.inbox
        if inbox / target not in tracker or not is_candidate(Path(target)):
            return None
        present = _Present(tracker, inbox)
        image = same_stem_image(target, present.__contains__) if is_job_file(target) else target
        mask = same_stem_mask(image, present.__contains__) if image is not None else None
        files = tuple(dict.fromkeys(f for f in (target, image, mask) if f is not None))
        for relative in files:
            tracker.forget(inbox / relative)
        return claim(Intent(target, files, bare_image=not is_job_file(target)), self.config)

    def _answer_cancel(self, ended: Claim, ending: Ending) -> None:
        """A claim asked to cancel while it ran has ended (on the writer thread): answer its request.

        Stopped instead (a warm stop released it or left it in work/): the request stays, for
        whichever daemon runs it next."""
        request = self._cancelling.pop(ended.claim_id, None)
        if request is None or ending in (Ending.RELEASED, Ending.RESUMES, Ending.DEFERRED):
            return
        cancel.answer(request, self._told(request, ended, str(ending)), final=True)

    def _told(self, request: cancel.Request, claimed: Claim, status: str) -> dict[str, str]:
        """A cancel request's answer: which claim it hit, what became of it, where its inputs are."""
        return {
            "target": request.target,
            "instance": self.config.instance,
            "source": claimed.source,
            "claim_id": claimed.claim_id,
            "status": status,
            "failed": str(self.config.folder("failed")),
        }

    def _reject(self, claimed: Claim, error: DiffusiondError) -> None:
        try:
            ending = lifecycle.end_claim(claimed, Ending.REJECTED, config=self.config, board=self.board, error=error)
        except OSError as exc:  # the worker validates it again and ends it, waiting for space if it must
            log.error("cannot move %s to failed/ now: %s; it waits in work/", claimed.source, exc)
            self.claims.put(replace(claimed, jobs=None))
            return
        if ending is Ending.REJECTED:
            self.rejected += 1

    def _release_queued(self) -> None:
        while True:
            try:
                queued = self.claims.get_nowait()
            except queue.Empty:
                return
            if queued is not None:
                # A claim resumed from work/ may have published jobs: it stays there for the next start.
                ending = Ending.RESUMES if queued.resumed else Ending.RELEASED
                try:
                    lifecycle.end_claim(
                        queued, ending, config=self.config, board=self.board, reason="stopping before it ran"
                    )
                except OSError as exc:  # it stays in work/: the next start runs it
                    log.error("cannot put %s back in the inbox: %s; it runs on the next start", queued.source, exc)
            self.claims.task_done()


class _Present:
    """The inbox files the tracker knows, by inbox-relative name, without listing them all."""

    def __init__(self, tracker: SettleTracker, inbox: Path) -> None:
        self.tracker, self.inbox = tracker, inbox

    def __contains__(self, relative: object) -> bool:
        return isinstance(relative, str) and self.inbox / relative in self.tracker


def _inbox_view(tracker: SettleTracker, pairing: Pairing, inbox: Path, now: float) -> list[dict[str, str]]:
    """The first files not claimed yet, for status.json: each with when it came and why it waits."""
    view = []
    for path, arrived, settled in tracker.waiting(now, limit=INBOX_VIEW_FILES):
        relative = path.relative_to(inbox).as_posix()
        reason = pairing.why_waiting(relative) if settled else "settling: still being written"
        since = datetime.fromtimestamp(arrived).astimezone().isoformat(timespec="milliseconds")
        view.append({"file": relative, "since": since, "reason": reason or "ready: claimed when the queue has room"})
    return view


def _relative(path: Path, inbox: Path) -> Path | None:
    try:
        return path.relative_to(inbox)
    except ValueError:
        return None


def _place(config: Config, name: str) -> object:
    return config.instance if name == "instance" else config.folder(name)


def _watchdog_interval_s() -> float:
    """systemd's WatchdogSec, when it is meant for this process (0 = no watchdog)."""
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return 0.0
    return int(os.environ.get("WATCHDOG_USEC", "0") or 0) / 1e6


def _health_problem(config: Config, watcher: InboxWatcher, worker: Worker, now: float) -> str | None:
    """Why the service is not healthy, or None: the watchdog's liveness test."""
    if not watcher.alive():
        return "the inbox watcher thread has stopped"
    if not worker.is_alive():
        return "the worker thread has stopped"
    if worker.current and now - worker.last_progress_s > config.job_stall_s:
        return f"the running job made no progress for {now - worker.last_progress_s:.0f} s (job_stall_s)"
    try:
        os.stat(config.inbox)
    except OSError as exc:
        return f"the inbox is not reachable: {exc}"
    return None
