"""The spool's daemon registry: `<spool>/.daemons/<instance>.json`, one file per running daemon.

A tool that has only the spool (a producer on a share, `diffusiond submit --spool DIR`) has not the
daemon's config: this is what the daemons tell it. Each daemon writes its entry when it is ready
(its instance, host, pid, state dir, and the rules its jobs are validated against: models and
their families, defaults, limits), rewrites it as a heartbeat every `HEARTBEAT_S`, and removes it
when it stops in order. An entry is alive when its pid runs on this host (and is the same process),
or, written on another host, when its heartbeat is fresher than `STALE_AFTER_S`. A killed daemon's
entry stays until the next start of that instance replaces it; readers skip it as not alive.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

from diffusiond import __version__
from diffusiond.daemon.config import Config
from diffusiond.daemon.fsutil import atomic_write, read_json_object
from diffusiond.daemon.status import is_running, process_start
from diffusiond.pipeline.families import ModelKind
from diffusiond.pipeline.job import Limits, Rules

log = logging.getLogger(__name__)
FOLDER = ".daemons"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 3 * HEARTBEAT_S


def entry_path(config: Config) -> Path:
    return config.spool / FOLDER / f"{config.instance}.json"


def announce(config: Config, state: str = "ready") -> None:
    """Write (or refresh) this daemon's entry; a failure is logged, never raised (a read-only spool root)."""
    rules = config.rules()
    entry = {
        "schema": 1,
        "diffusiond": __version__,
        "instance": config.instance,
        "host": platform.node(),
        "pid": os.getpid(),
        "pid_start": process_start(os.getpid()),
        "state": state,
        "state_dir": str(config.state),
        "heartbeat": time.time(),
        "heartbeat_s": HEARTBEAT_S,
        "models": {name: str(kind) for name, kind in rules.models.items()},
        "defaults": rules.defaults,
        "model_defaults": rules.model_defaults,
        "native_sizes": rules.native_sizes,
        "limits": vars(rules.limits),
        "watermark_required": rules.watermark_required,
    }
    try:
        (config.spool / FOLDER).mkdir(exist_ok=True)
        atomic_write(entry_path(config), json.dumps(entry, indent=1, default=str).encode(), durable=False)
    except OSError as exc:
        log.warning("cannot write %s: %s; `submit --spool` will not see this daemon", entry_path(config), exc)
        return
    _record_state_dir(config)


def state_pointer_path(config: Config) -> Path:
    return config.spool / FOLDER / f"{config.instance}.state"


def _record_state_dir(config: Config) -> None:
    """Where this instance keeps status.json, kept after it stops (unlike its entry).

    A unit may run the daemon with `--state-dir` while the config names none: `diffusiond
    status` with only the config (or `--spool`) reads this to find the daemon's real state dir.
    """
    pointer = state_pointer_path(config)
    record = {"state_dir": str(config.state), "host": platform.node()}
    try:  # written with each heartbeat, never read here: what else is in the spool is not the daemon's to read
        atomic_write(pointer, json.dumps(record).encode(), durable=False)
    except OSError as exc:
        log.warning("cannot write %s: %s; `diffusiond status` needs --state-dir to find this daemon", pointer, exc)


def recorded_state_dir(config: Config) -> Path | None:
    """The state dir the last daemon of this instance on this spool used, if it is on this host."""
    return _readable_state_dir(state_pointer_path(config))


def recorded_state_dirs(spool: Path) -> dict[str, Path]:
    """Every instance's recorded state dir on `spool` that this host can read, by instance."""
    folder = spool / FOLDER
    pointers = sorted(folder.glob("*.state")) if folder.is_dir() else []
    found = {path.name.removesuffix(".state"): _readable_state_dir(path) for path in pointers}
    return {instance: state for instance, state in found.items() if state is not None}


def _readable_state_dir(pointer: Path) -> Path | None:
    record = read_json_object(pointer)
    if record is None or record.get("host") != platform.node() or not isinstance(record.get("state_dir"), str):
        return None
    path = Path(record["state_dir"])
    return path if path.is_dir() else None


def withdraw(config: Config) -> None:
    try:
        entry_path(config).unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot remove %s: %s", entry_path(config), exc)


def live_daemons(spool: Path) -> list[dict[str, Any]]:
    """The entries of the daemons running on `spool` now, freshest heartbeat first."""
    entries: list[dict[str, Any]] = []
    for path in sorted((spool / FOLDER).glob("*.json")) if (spool / FOLDER).is_dir() else []:
        entry = read_json_object(path)
        if entry is not None and _alive(entry):
            entries.append(entry)
    return sorted(entries, key=lambda e: -float(e.get("heartbeat", 0)))


def _alive(entry: dict[str, Any]) -> bool:
    if entry.get("host") == platform.node():
        return is_running(entry)
    return time.time() - float(entry.get("heartbeat", 0)) < STALE_AFTER_S


def rules_of(entry: dict[str, Any]) -> Rules:
    """The validation rules a daemon announced: `submit` checks a job as that daemon will."""
    return Rules(
        models={name: ModelKind(kind) for name, kind in entry.get("models", {}).items()},
        defaults=entry.get("defaults", {}),
        limits=Limits(**entry.get("limits", {})),
        model_defaults=entry.get("model_defaults", {}),
        native_sizes=entry.get("native_sizes", {}),
        watermark_required=bool(entry.get("watermark_required")),
    )
