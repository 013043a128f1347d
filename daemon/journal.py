"""Logging for `diffusiond run`: the systemd journal with job fields when we run under it, stderr otherwise.

Under systemd, `journalctl -u diffusiond JOB_ID=hamster-1` finds every line of one job: pass
`extra=job_fields(...)` on a log call and python-systemd's `JournalHandler` sends each record
attribute as a journal field. It sends *all* of them (`record.__dict__`); journald keeps only valid
field names (upper-case letters, digits, `_`), so the lower-case `LogRecord` attributes are dropped
and our upper-case extras arrive. On stderr the extras are simply not part of the format.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Literal

__all__ = ["JOURNAL_SOCKET", "job_fields", "setup_logging"]

JOURNAL_SOCKET = "/run/systemd/journal/socket"
"""journald's native socket (libsystemd's `sd_journal_send` always writes here)."""
STDERR_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

log = logging.getLogger(__name__)

Target = Literal["auto", "journal", "stderr"]


def job_fields(
    *, job_id: str | None = None, job_file: str | None = None, task: str | None = None, model: str | None = None
) -> dict[str, str]:
    """Journal fields for a job's log lines: `log.info("done %s", job_id, extra=job_fields(job_id=...))`.

    Unset values are left out (a field `MODEL=None` would match nothing useful).
    """
    fields = {"JOB_ID": job_id, "JOB_FILE": job_file, "TASK": task, "MODEL": model}
    return {name: str(value) for name, value in fields.items() if value is not None}


def setup_logging(level: str, target: Target = "auto") -> str:
    """Configure the root logger; returns "journal" or "stderr", whichever was chosen.

    `auto` picks the journal when stderr is systemd's journal stream (`$JOURNAL_STREAM` names it, so a
    `diffusiond run` typed in a terminal still logs to the terminal), journald's socket exists and
    python-systemd imports.
    """
    under_journal = _stderr_is_journal()
    journal_handler = _journal_handler() if target == "journal" or (target == "auto" and under_journal) else None
    if journal_handler is not None:
        journal_handler.setFormatter(logging.Formatter("%(message)s"))  # level, logger, time: fields of their own
        logging.basicConfig(level=level, handlers=[journal_handler], force=True)
        return "journal"
    handler = logging.StreamHandler(sys.stderr)
    # Under systemd without python-systemd, stderr still reaches the journal: a `<N>` prefix gives
    # each line its priority there, and journald adds its own timestamp.
    handler.setFormatter(_PriorityFormatter() if under_journal else logging.Formatter(STDERR_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    if target == "journal" or under_journal:
        log.warning(
            "logging to stderr, without journal fields (JOB_ID, JOB_FILE, TASK, MODEL): %s",
            _why_no_journal(),
        )
    return "stderr"


def _stderr_is_journal() -> bool:
    """True when `$JOURNAL_STREAM` ("device:inode") is our stderr, as systemd documents for services."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        stat = os.fstat(sys.stderr.fileno())
        return (stat.st_dev, stat.st_ino) == (int(device), int(inode))
    except (ValueError, OSError, AttributeError):  # unset or malformed, or stderr is not a real file
        return False


def _journal_handler() -> logging.Handler | None:
    if not os.path.exists(JOURNAL_SOCKET):
        return None
    try:
        from systemd.journal import JournalHandler
    except ImportError:
        return None
    return JournalHandler(SYSLOG_IDENTIFIER="diffusiond")


def _why_no_journal() -> str:
    if not os.path.exists(JOURNAL_SOCKET):
        return f"there is no journal socket at {JOURNAL_SOCKET} (is systemd-journald running?)"
    return (
        "python-systemd is not installed; install it with `pip install 'diffusiond[systemd]'` "
        "(it builds against libsystemd: `apt-get install libsystemd-dev pkg-config` first)"
    )


class _PriorityFormatter(logging.Formatter):
    """`<3>ERROR diffusiond.daemon.worker: ...`: journald reads the `<N>` syslog priority off each stderr line."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        levels = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
        priority = next((p for threshold, p in levels if record.levelno >= threshold), 7)
        return f"<{priority}>{super().format(record)}"
