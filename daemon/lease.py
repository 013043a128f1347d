"""Leases: a daemon that stops answering loses its claims to the others, fenced, never doubled.

Every daemon touches `work/<instance>/.lease` while it is healthy (its watcher and worker alive,
its running job making progress: the watchdog's test). Every daemon also looks at the other work
folders of the spool: a lease older than `lease_timeout_s` means its daemon is gone (killed with
its host, frozen, cut off), and its claims are taken over. The same protocol serves daemons under
plain systemd on several hosts and the slots of a Ray cluster (daemon/cluster.py), where it is the
backstop for a slot that Ray cannot place again (no free GPU left).

- **Whose clock.** Lease ages are judged by the file server's clock, never by this host's: the
  daemon writes a probe file (`.clock`) in its own work folder and reads its mtime, which the
  server set, as "now". Hosts whose clocks disagree by minutes still agree on the ages.
- **The takeover is the fence.** A claim folder `work/<lost>/<claim_id>~N` is renamed to
  `work/<me>/<claim_id>~N+1`: one rename, which exactly one daemon wins, and after which the lost
  daemon's paths are dead. If it was only frozen and thaws, it can no longer stage, publish,
  archive or release anything of that claim (daemon/lifecycle.py, FENCED). The claim then resumes
  here as after a crash: published jobs stay published, staged ones are published, the rest run
  again (GPU work at least once, outputs exactly once).
- **Poison jobs.** Each takeover is counted in the claim's record; at `limits.max_takeovers` the
  claim goes to failed/ with `code: node_lost` instead of hopping on to the next host.
- **A lease that never existed** (a work folder of a daemon from before leases, or a folder made
  by hand) is never taken over: only an expired lease is evidence that its daemon is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from diffusiond.daemon.config import Config
from diffusiond.daemon.fsutil import fsync_dir
from diffusiond.daemon.lifecycle import fence_target

log = logging.getLogger(__name__)
LEASE_FILE = ".lease"
CLOCK_FILE = ".clock"
BEATS_PER_TIMEOUT = 4
"""A lease is touched 4 times per `lease_timeout_s`: three missed beats (a slow share) still keep it."""


@dataclass(frozen=True)
class Expired:
    """Another daemon's work folder whose lease ran out, by the file server's clock."""

    folder: Path
    age_s: float


class Lease:
    """This daemon's lease (`beat`) and its view of the others' (`expired`, `take_over`)."""

    def __init__(self, config: Config) -> None:
        self.work = config.work_dir
        self.timeout_s = config.lease_timeout_s

    @property
    def every_s(self) -> float:
        """How often the main loop beats and looks at the other leases."""
        return max(0.2, self.timeout_s / BEATS_PER_TIMEOUT)

    def beat(self) -> None:
        """Touch this daemon's lease (its mtime is the file server's time of the touch)."""
        path = self.work / LEASE_FILE
        try:
            os.utime(path)
        except FileNotFoundError:
            path.write_bytes(b"")
        # Other errors (a share gone for a moment) propagate: the caller logs them and beats again.

    def server_now(self) -> float:
        """The file server's clock: the mtime of a probe file written just now."""
        path = self.work / CLOCK_FILE
        with open(path, "wb") as handle:
            handle.write(str(time.time()).encode())
            handle.flush()
            return os.fstat(handle.fileno()).st_mtime

    def expired(self) -> list[Expired]:
        """The other work folders of the spool whose lease is older than `lease_timeout_s`, and that
        hold a claim (a lost daemon with nothing claimed costs nothing)."""
        if self.timeout_s <= 0:
            return []
        found: list[Expired] = []
        now: float | None = None
        with os.scandir(self.work.parent) as entries:
            folders = [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False) and e.name != self.work.name]
        for folder in sorted(folders):
            try:
                leased = os.stat(folder / LEASE_FILE).st_mtime
            except OSError:  # no lease: never taken over (see the module docstring)
                continue
            if now is None:
                now = self.server_now()
            age_s = now - leased
            if age_s > self.timeout_s and _claim_folders(folder):
                found.append(Expired(folder, age_s))
        return found

    def take_over(self, lost: Expired) -> list[Path]:
        """Rename each claim folder of `lost` into this daemon's work folder; returns the new folders.

        A folder another daemon renamed first is passed over (its rename won)."""
        taken: list[Path] = []
        for folder in _claim_folders(lost.folder):
            target = fence_target(folder, self.work)
            try:
                os.rename(folder, target)
            except FileNotFoundError:  # another daemon (or its own, restarted) was first
                continue
            except OSError as exc:
                log.error("cannot take over %s: %s", folder, exc)
                continue
            taken.append(target)
        if taken:
            with contextlib.suppress(OSError):
                fsync_dir(self.work)
                fsync_dir(lost.folder)
        return taken


def _claim_folders(work: Path) -> list[Path]:
    """The claim folders in a work folder: not its dotfiles, reservations or folders being removed."""
    try:
        with os.scandir(work) as entries:
            return sorted(
                Path(e.path) for e in entries if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)
            )
    except OSError:
        return []
