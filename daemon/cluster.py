"""diffusiond on a Ray cluster: Ray places and supervises the slots; the spool decides who owns a job.

Ray has been seen to run the same work twice when a node hangs and comes back (declared dead
after about a minute, its task re-run elsewhere, and the old actor, thawed, finishing too), so
Ray is never the queue. Jobs never travel through Ray calls:

- **A slot is the identity.** The driver (`diffusiond cluster`, `Driver.serve`) keeps one
  detached, named actor per GPU (`gpu-00`, `gpu-01`, ...: `slots:`/`resource:` in `cluster:`),
  restarted by Ray without limit, with no task retries. Each runs today's daemon loop (`Daemon`)
  in a thread as instance `<slot>`, with a local state dir, the inbox polled (inotify sees no
  other host's writes on NFS) and its models warm. It reads the inbox and claims by rename itself.
  Its methods are control only: `status()`, `stop()` (the warm stop of SIGTERM), `reload()`.
- **Restart = fence + resume.** A slot that Ray starts again, on any node, takes its work folder
  over (daemon/worklock.py, `take_over`): its start fences every claim there by rename and resumes
  it, as a restarted service does. A zombie (the old process, still running after Ray declared it
  dead) finds another owner in `work/<slot>/.owner` before its next claim or publish and steps
  down; the paths it still holds are dead.
- **Leases are the backstop** (daemon/lease.py): a slot that Ray cannot place again (no free GPU
  left) stops touching its lease, and the other slots take its claims over.
- **Scale.** The driver compares the slots with the cluster's GPUs every `reconcile_s`: a node
  that joins with a GPU gets a slot. `drain(slot)` makes the slot stop warm (queued claims back to
  the inbox) and removes it; a drain record on the spool (`.cluster/drained/<slot>.json`) keeps
  the driver from placing it again while the node it ran on is in the cluster.

Guarantees, as on one host: every input in exactly one place, every job's outputs visible once;
GPU work itself at least once (a job a lost node was running runs again).

Ray is an optional dependency (the `cluster` extra): this module imports it, and only the
`diffusiond cluster` commands import this module.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import ray

from diffusiond.daemon.config import Config, load_config
from diffusiond.daemon.fsutil import atomic_write
from diffusiond.daemon.inbox import candidates
from diffusiond.daemon.status import reload_clock

log = logging.getLogger(__name__)
NAMESPACE = "diffusiond"
"""The Ray namespace of the slots: detached actors are found by name there from any driver."""
PREFIX = "gpu-"
DRAINED = ".cluster/drained"
"""Under the spool: one record per drained slot."""
ANSWER_S = 5.0
"""How long `status` waits for a slot to answer: one that does not is restarting or waits for a GPU."""
GeneratorFactory = Callable[[Config], Any]


def slot_name(number: int) -> str:
    return f"{PREFIX}{number:02d}"


def slot_config(config_path: Path | None, spool: Path | None, slot: str) -> Config:
    """The config one slot runs: the cluster's file, as instance `slot`, its state on the node, the inbox polled."""
    config = load_config(config_path, spool=spool, overrides={"instance": slot})
    config.state_dir = config.cluster.state_dir / slot
    config.watch.mode = "poll"  # inotify cannot see the writes of other hosts on a network share
    return config


class Slot:
    """One slot: a daemon loop in a thread of a Ray actor (`ray.remote` is applied by `_actor_class`).

    `__init__` starts the daemon and returns: the actor answers `status()` while the daemon runs.
    A start after a restart by Ray takes the work folder over and resumes its claims.
    """

    def __init__(
        self, config_path: str | None, spool: str | None, slot: str, generator_factory: GeneratorFactory | None
    ) -> None:
        from diffusiond.daemon.journal import setup_logging
        from diffusiond.daemon.service import Daemon, diffusers_generator

        setup_logging("INFO", "stderr")  # Ray keeps each worker's stderr in its session's logs/ on the node
        self.slot = slot
        self.error = ""
        path = Path(config_path) if config_path else None
        where = Path(spool) if spool else None
        self.config = slot_config(path, where, slot)
        self.daemon = Daemon(
            self.config,
            reload_config=lambda: slot_config(path, where, slot),
            generator_factory=generator_factory or diffusers_generator,
            take_over=True,
        )
        with warnings.catch_warnings():  # Ray's own use of a deprecated API inside this property
            warnings.simplefilter("ignore", DeprecationWarning)
            self.restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        self.thread = threading.Thread(target=self._serve, name=f"diffusiond-{slot}", daemon=True)
        self.thread.start()
        threading.Thread(target=_exit_with_raylet, args=(os.getppid(),), name="raylet-watch", daemon=True).start()

    def _serve(self) -> None:
        try:
            self.daemon.run()
        except BaseException as exc:  # the actor stays, to say why (a restart would fail the same way)
            log.exception("slot %s stopped", self.slot)
            self.error = str(exc)

    def status(self) -> dict[str, Any]:
        """Where the slot runs and its daemon's status.json (state, running job and step, queue, counts)."""
        try:
            daemon = json.loads((self.config.state / "status.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            daemon = {}
        return {
            "slot": self.slot,
            "node_id": ray.get_runtime_context().get_node_id(),
            "host": platform.node(),
            "pid": os.getpid(),
            "restarted": self.restarted,
            "serving": self.thread.is_alive(),
            "superseded": self.daemon.superseded,
            "error": self.error,
            "daemon": daemon,
        }

    def stop(self, timeout_s: float = 600.0) -> dict[str, Any]:
        """The warm stop: nothing more claimed, queued claims back to the inbox, the running job stops
        at its next step (or finishes, when nearly done); returns the last status."""
        self.daemon.request_stop("drain")
        self.thread.join(timeout_s)
        return self.status()

    def reload(self) -> None:
        """Read the config again (SIGHUP's reload): a wrong one is refused and the old one kept."""
        self.daemon._reload_asked = reload_clock()
        self.daemon.reload_requested.set()


def _exit_with_raylet(raylet: int) -> None:
    """Exit when the raylet that started this worker is gone.

    A node frozen past Ray's death timeout and thawed: its raylet learns it was declared dead and
    exits, but a worker exits only when it next calls Ray, and the daemon thread never does; it ran
    on for minutes beside the slot Ray had started elsewhere (measured: 600 lines in 120 s). The
    owner record already keeps it from claiming or publishing; this ends the process too (0.3 s
    after the thaw, measured), as Ray would have.
    """
    while os.getppid() == raylet:
        time.sleep(RAYLET_WATCH_S)
    log.error("the raylet (pid %d) that started this slot is gone: exiting", raylet)
    os._exit(1)


RAYLET_WATCH_S = 0.25
_SLOT_ACTOR: Any = None


def _actor_class() -> Any:
    global _SLOT_ACTOR
    if _SLOT_ACTOR is None:
        # Unlimited restarts (each one fences and resumes), never a retried call: a call is control only.
        _SLOT_ACTOR = ray.remote(max_restarts=-1, max_task_retries=0)(Slot)
    return _SLOT_ACTOR


@dataclass(frozen=True)
class SlotView:
    """One slot as `cluster status` shows it."""

    name: str
    answer: dict[str, Any] | None
    """`Slot.status()`, or None: it did not answer within ANSWER_S (restarting, or waiting for a GPU)."""


class Driver:
    """The slots of one spool on the Ray cluster the config names: create, reconcile, inspect, drain."""

    def __init__(
        self,
        config_path: Path | None = None,
        *,
        spool: Path | None = None,
        generator_factory: GeneratorFactory | None = None,
    ) -> None:
        self.config_path = config_path
        self.spool_arg = spool
        self.config = load_config(config_path, spool=spool)
        self.generator_factory = generator_factory
        """Builds what makes the images in each slot: diffusers unless code passes another (tests, bench)."""

    # -- connecting ------------------------------------------------------------------------------------
    def connect(self, address: str | None = None) -> None:
        if not ray.is_initialized():
            ray.init(
                address=address or self.config.cluster.address,
                namespace=NAMESPACE,
                log_to_driver=False,
                configure_logging=False,
            )

    # -- what should run -------------------------------------------------------------------------------
    def wanted(self) -> list[str]:
        """The slots that should exist now: one per unit of the slot resource (or `slots:`), less the
        drained ones whose node is still in the cluster."""
        cluster = self.config.cluster
        drained = self.drained()
        if isinstance(cluster.slots, int):
            count = cluster.slots
        else:
            count = int(ray.cluster_resources().get(cluster.resource, 0)) - len(drained)
        names: list[str] = []
        number = 0
        while len(names) < max(0, count):
            if (name := slot_name(number)) not in drained:
                names.append(name)
            number += 1
        return names

    def existing(self) -> list[str]:
        """The slots Ray knows (alive, restarting or waiting for resources), by name."""
        return sorted(n for n in ray.util.list_named_actors() if n.startswith(PREFIX))

    def reconcile(self) -> list[str]:
        """Create the wanted slots that do not exist; returns their names. Never removes one: a slot
        whose node is gone waits in Ray for a GPU while the others take its claims over."""
        created = []
        have = set(self.existing())
        for name in self.wanted():
            if name in have or name in self.drained():  # read again: a drain may have just begun
                continue
            self._create(name)
            created.append(name)
            log.info("slot %s created", name)
        return created

    def _create(self, name: str) -> Any:
        cluster = self.config.cluster
        placement: dict[str, Any] = (
            {"num_gpus": 1} if cluster.resource == "GPU" else {"num_gpus": 0, "resources": {cluster.resource: 1}}
        )
        return (
            _actor_class()
            .options(name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0, **placement)
            .remote(
                str(self.config_path) if self.config_path else None,
                str(self.spool_arg) if self.spool_arg else None,
                name,
                self.generator_factory,
            )
        )

    def serve(self, stop: threading.Event) -> None:
        """Reconcile every `reconcile_s` until `stop` is set (the `diffusiond cluster` command)."""
        while not stop.is_set():
            try:
                self.reconcile()
            except Exception:  # a GCS that is restarting, a node going: try again at the next round
                log.exception("cannot reconcile the slots now")
            stop.wait(self.config.cluster.reconcile_s)

    # -- looking ---------------------------------------------------------------------------------------
    def views(self) -> list[SlotView]:
        """Every slot's answer to `status()`, asked of all at once."""
        names = self.existing()
        refs: dict[str, Any] = {name: ray.get_actor(name, namespace=NAMESPACE).status.remote() for name in names}
        if not refs:
            return []
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=ANSWER_S)
        done = set(ready)
        views = []
        for name, ref in refs.items():
            answer: dict[str, Any] | None = None
            if ref in done:
                try:
                    answer = ray.get(ref)
                except ray.exceptions.RayError:
                    answer = None
            views.append(SlotView(name, answer))
        return views

    def backlog(self) -> int:
        """Files waiting in the inbox, not claimed by any slot."""
        return sum(1 for _ in candidates(self.config.inbox))

    # -- draining --------------------------------------------------------------------------------------
    def drained(self) -> dict[str, dict[str, Any]]:
        """The drain records whose node is still in the cluster; the others are removed (that node left:
        the name is free for a new node's GPU)."""
        folder = self.config.spool / DRAINED
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        records: dict[str, dict[str, Any]] = {}
        for path in sorted(folder.glob(f"{PREFIX}*.json")) if folder.is_dir() else []:
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(record, dict) and record.get("node_id") in alive:
                records[path.stem] = record
            else:
                path.unlink(missing_ok=True)
        return records

    def drain(self, name: str, timeout_s: float = 600.0) -> dict[str, Any]:
        """Stop slot `name` warm and remove it; returns its last status. Its queued claims go back to the
        inbox; claims it kept (jobs partly published) are taken over by the others when its lease runs out."""
        actor = ray.get_actor(name, namespace=NAMESPACE)  # ValueError: no such slot
        where = cast(dict[str, Any], ray.get(actor.status.remote(), timeout=ANSWER_S * 6))
        folder = self.config.spool / DRAINED
        folder.mkdir(parents=True, exist_ok=True)
        record = {"node_id": where["node_id"], "host": where["host"], "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write(folder / f"{name}.json", json.dumps(record).encode())  # first: the driver must not re-create it
        last: dict[str, Any] = ray.get(actor.stop.remote(timeout_s), timeout=timeout_s + 60)
        ray.kill(actor, no_restart=True)
        log.info("slot %s drained", name)
        return last

    def undrain(self, name: str) -> bool:
        """Let the driver place slot `name` again; False if it was not drained."""
        path = self.config.spool / DRAINED / f"{name}.json"
        existed = path.exists()
        path.unlink(missing_ok=True)
        return existed


def format_views(views: list[SlotView], backlog: int) -> str:
    """`diffusiond cluster status`: one line per slot (node, state, job, step, queue), then the backlog."""
    lines = [f"{'SLOT':<8} {'HOST':<20} {'STATE':<12} {'QUEUE':>5}  JOB"]
    for view in views:
        answer = view.answer
        if answer is None:
            lines.append(f"{view.name:<8} {'-':<20} {'no answer':<12} {'-':>5}  (restarting, or waiting for a GPU)")
            continue
        daemon = answer.get("daemon") or {}
        state = "error" if answer.get("error") else str(daemon.get("state", "starting"))
        running = daemon.get("running") or []
        job = ", ".join(_job_text(r) for r in running if isinstance(r, dict)) or "-"
        if answer.get("error"):
            job = str(answer["error"])
        host = f"{answer.get('host', '?')}"
        lines.append(f"{view.name:<8} {host:<20} {state:<12} {len(daemon.get('queued') or []):>5}  {job}")
    lines.append(f"inbox: {backlog} file{'s' if backlog != 1 else ''} waiting to be claimed")
    return "\n".join(lines)


def _job_text(running: dict[str, Any]) -> str:
    step, steps = running.get("step"), running.get("steps")
    return f"{running.get('source', '?')}" + (f" (step {step}/{steps})" if step is not None and steps else "")
