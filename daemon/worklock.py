"""One daemon per work folder: an exclusive lock on `work/<instance>/`, held for the daemon's life.

Two daemons with the same instance name (the default is the host name, so `make serve` left
running beside the service is enough) would share one work folder: the second would "resume"
the first one's running claim and run its jobs again. So a daemon takes `flock` on
`work/<instance>/.owner` before it looks at its work folder, and refuses to start while another
live process holds it. The kernel drops the lock when the holder dies, kill -9 included, so a
crash never leaves a stale lock to clean up by hand. The file also says who holds it (pid, host,
since when) for the refusal's message; only the lock decides.

`flock` is local to a host on most network filesystems (NFS maps it to a byte-range lock, which
needs a working lock manager; SMB mounts may ignore it): give every daemon on a shared spool its
own instance name, as the template unit does (`<host>-gpuN`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from diffusiond.pipeline.errors import ConfigError

log = logging.getLogger(__name__)
OWNER_FILE = ".owner"
"""In the work folder; a dotfile, so no claim folder can be named like it."""


@dataclass
class WorkLock:
    """The held lock; `release()` at the end of the daemon's run (the kernel does it if the process dies)."""

    folder: Path
    fd: int | None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None


def lock_work_folder(folder: Path, *, instance: str) -> WorkLock:
    """Take `folder` (this daemon's `work/<instance>/`) for this process, or refuse with who has it."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / OWNER_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o664)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _holder(fd)
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise ConfigError(
                f"cannot lock the work folder {folder}: {exc.strerror or exc}",
                field="instance",
                value=instance,
                fix="put the work folder on a filesystem with flock (a local disk, or NFS with its lock manager)",
            ) from exc
        raise ConfigError(
            f"the work folder {folder} is in use by {holder}: two daemons with one instance name would run "
            "each other's jobs",
            field="instance",
            value=instance,
            fix="stop that daemon, or give this one an instance of its own: `diffusiond run --instance NAME` "
            "(or `instance:` in the config)",
        ) from exc
    record = {"pid": os.getpid(), "host": platform.node(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    except OSError as exc:  # a full disk: the lock holds all the same, only the message would name no one
        log.warning("cannot write who holds %s (%s); the lock is held", folder / OWNER_FILE, exc)
    return WorkLock(folder, fd)


def _holder(fd: int) -> str:
    """Who the record says holds the lock, in words (the record may be torn or missing: then "another process")."""
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"diffusiond pid {int(record['pid'])} on {record['host']} (since {record['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
