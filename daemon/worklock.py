"""Who owns a work folder: the owner record `work/<instance>/.owner`, and a lock for one host.

Two daemons with the same instance name (the default is the host name, so `make serve` left
running beside the service is enough) would share one work folder: the second would "resume"
the first one's running claim and run its jobs again. So a daemon takes `flock` on
`work/<instance>/.lock` before it looks at its work folder, and refuses to start while another
live process holds it. The kernel drops the lock when the holder dies, kill -9 included, so a
crash never leaves a stale lock to clean up by hand.

`flock` is local to a host on most network filesystems (NFS maps it to a byte-range lock, which
needs a working lock manager; SMB mounts may ignore it), and a host that froze still holds it. So
a cluster slot (daemon/cluster.py: one `work/<slot>/` that Ray may restart on any node) starts
with `take_over=True` instead: it does not wait for the lock, it takes the folder. What decides
then is the owner record, replaced atomically by each daemon that takes the folder, with a token
of its own: a predecessor that is still running (a zombie: its node froze, Ray declared it dead
and started the slot elsewhere, and then it thawed) reads the record before each claim and
before each publish, finds another token, and steps down (`held()` is False). Its claims were
fenced by the new owner's start (daemon/lifecycle.py), so it could not publish them anyway.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import platform
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusiond.daemon.fsutil import atomic_write
from diffusiond.pipeline.errors import ConfigError

log = logging.getLogger(__name__)
OWNER_FILE = ".owner"
"""The owner record (JSON: token, pid, host, since); dotfiles, so no claim folder can be named like them."""
LOCK_FILE = ".lock"
"""Held with flock for the daemon's life; never replaced, so every daemon locks the same file."""


@dataclass
class WorkLock:
    """This run's hold on its work folder; `release()` at the end (the kernel does it if the process dies)."""

    folder: Path
    fd: int | None
    token: str = field(default_factory=lambda: secrets.token_hex(8))
    """Names this run in the owner record: another run's token there means the folder was taken over."""
    found: str | None = None
    """The token the record held when this run could not replace it (a full disk): still this run's."""

    def held(self) -> bool:
        """Whether the owner record still names this run. An unreadable record (a spool that is not
        reachable for a moment) counts as held: only another owner's record takes the folder away."""
        record = read_owner(self.folder)
        return record is None or record.get("token") in (self.token, self.found)

    def successor(self) -> str:
        """Who holds the folder now, in words (for the log line of a run that steps down)."""
        return _describe(read_owner(self.folder))

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None


def lock_work_folder(folder: Path, *, instance: str, take_over: bool = False) -> WorkLock:
    """Take `folder` (this daemon's `work/<instance>/`) for this process, or refuse with who has it.

    With `take_over`, a live holder does not stop the start: this run records itself as the owner,
    and the holder steps down when it next looks (see the module docstring).
    """
    folder.mkdir(parents=True, exist_ok=True)
    fd: int | None = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o664)
    assert fd is not None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        fd = None
        holder = _describe(read_owner(folder))
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN) and not take_over:
            raise ConfigError(
                f"cannot lock the work folder {folder}: {exc.strerror or exc}",
                field="instance",
                value=instance,
                fix="put the work folder on a filesystem with flock (a local disk, or NFS with its lock manager)",
            ) from exc
        if not take_over:
            raise ConfigError(
                f"the work folder {folder} is in use by {holder}: two daemons with one instance name would run "
                "each other's jobs",
                field="instance",
                value=instance,
                fix="stop that daemon, or give this one an instance of its own: `diffusiond run --instance NAME` "
                "(or `instance:` in the config)",
            ) from exc
        log.warning(
            "taking the work folder %s over from %s, which still holds its lock: its claims are fenced", folder, holder
        )
    lock = WorkLock(folder, fd)
    record = {
        "token": lock.token,
        "pid": os.getpid(),
        "host": platform.node(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        atomic_write(folder / OWNER_FILE, (json.dumps(record) + "\n").encode())
    except OSError as exc:  # a full disk: the folder is this run's all the same, the old record stands for it
        log.warning("cannot write the owner record in %s (%s); the folder is held", folder, exc)
        lock.found = (read_owner(folder) or {}).get("token")
    return lock


def read_owner(folder: Path) -> dict[str, Any] | None:
    """The owner record of a work folder, or None when there is none or it cannot be read."""
    try:
        with open(folder / OWNER_FILE, "rb") as handle:
            record = json.loads(handle.read(4096))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _describe(record: dict[str, Any] | None) -> str:
    """Who the record says holds the folder, in words ("another process" when it names no one)."""
    try:
        assert record is not None
        return f"diffusiond pid {int(record['pid'])} on {record['host']} (since {record['since']})"
    except (AssertionError, KeyError, TypeError, ValueError):
        return "another process"
