"""Watching the inbox: which files count, when a file is finished, and the events that say so.

Events only tell the daemon where to look; the settle tracker decides when a
file may be read, and a periodic rescan catches whatever events missed.
"""

from __future__ import annotations

import importlib
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from diffusiond.daemon.threads import name_os_thread
from diffusiond.pipeline.job import IMAGE_SUFFIXES, JOB_SUFFIXES

log = logging.getLogger(__name__)
# watchdog logs "queue_events() called when the thread is inactive" at ERROR when its
# emitter is stopped while events are in flight: harmless at shutdown, alarming in a journal.
logging.getLogger("watchdog.observers.inotify").setLevel(logging.CRITICAL)

# Names that are never jobs, each with the tool that leaves it behind.
IGNORED_NAMES = frozenset(
    {
        ".ds_store",  # macOS Finder
        "thumbs.db",  # Windows Explorer
        "desktop.ini",  # Windows Explorer
        ".stfolder",  # Syncthing folder marker
    }
)
IGNORED_SUFFIXES = (
    ".part",  # curl -O, Firefox and many copy tools while writing
    ".partial",  # Safari, some SMB clients
    ".crdownload",  # Chromium downloads
    ".tmp",  # Syncthing (~syncthing~x.tmp), editors, our own `diffusiond submit`
    ".swp",  # vim
    "~",  # editor backups
)
IGNORED_PREFIXES = (
    ".",  # dotfiles: rsync's .name.XXXXXX, Syncthing's .syncthing.name.tmp, AppleDouble ._name
    "~",  # Syncthing's ~syncthing~ temp files, Office lock files (~$name)
)


def is_candidate(relative: Path) -> bool:
    """Whether a path (relative to the inbox) may be a job file or image.

    Only the inbox root and one level of hot folders are watched: deeper files are
    left alone, so a user's own subfolders in a share are never consumed.
    """
    if len(relative.parts) not in (1, 2) or any(p.startswith(IGNORED_PREFIXES) for p in relative.parts):
        return False
    name = relative.name.lower()
    if name in IGNORED_NAMES or name.endswith(IGNORED_SUFFIXES):
        return False
    return name.endswith(JOB_SUFFIXES + IMAGE_SUFFIXES)


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    quiet_since: float
    """Monotonic time since which size and mtime have not changed."""
    arrived: float
    """Wall-clock time it came into the inbox (its ctime, which a rename sets), for "waiting since"."""


class SettleTracker:
    """Says when a file has stopped changing, so a half-written file is never read.

    The cases it covers: a file renamed into the inbox is complete at once (the
    atomic drop every good tool does); a file written in place (a scanner, an SMB
    copy in chunks, a slow `cat >`) must keep its size and mtime for `settle_s`;
    a file found by a scan counts as quiet since its mtime, so files left from
    before a restart are not delayed.
    """

    def __init__(self, settle_s: float) -> None:
        self.settle_s = settle_s
        self._seen: dict[Path, _Seen] = {}

    def touch(self, path: Path, *, renamed: bool = False, now: float | None = None) -> None:
        """Note an event (or a scan hit) for `path`. Links and folders are never jobs: not noted."""
        now = time.monotonic() if now is None else now
        st = _lstat_file(path)
        if st is None:
            self._seen.pop(path, None)
            return
        old = self._seen.get(path)
        if old is not None and (old.size, old.mtime_ns) == (st.st_size, st.st_mtime_ns):
            if renamed:  # a scan may have seen it first: the rename still says it is complete
                old.quiet_since = min(old.quiet_since, now - self.settle_s)
            return
        if renamed:
            quiet_since = now - self.settle_s
        elif old is None:
            quiet_since = now - max(0.0, time.time() - st.st_mtime_ns / 1e9)
        else:
            quiet_since = now
        arrived = old.arrived if old is not None else min(time.time(), st.st_ctime)
        self._seen[path] = _Seen(st.st_size, st.st_mtime_ns, quiet_since, arrived)

    def forget(self, path: Path) -> None:
        self._seen.pop(path, None)

    def __iter__(self) -> Iterator[Path]:
        """Every file seen and not yet forgotten, settled or not."""
        return iter(self._seen)

    def __contains__(self, path: object) -> bool:
        return path in self._seen

    def __len__(self) -> int:
        return len(self._seen)

    def waiting(self, now: float, limit: int) -> list[tuple[Path, float, bool]]:
        """The first `limit` files not claimed yet, in arrival order: (path, arrived, settled); no stat calls."""
        out: list[tuple[Path, float, bool]] = []
        for path, seen in self._seen.items():
            if len(out) >= limit:
                break
            out.append((path, seen.arrived, now - seen.quiet_since >= self.settle_s))
        return out

    def stable(self, now: float | None = None, limit: int | None = None) -> list[Path]:
        """Files quiet for `settle_s`, re-checked on disk now, oldest first.

        With `limit`, only files seen first are checked, until `limit` are stable: with 10,000
        files dropped at once, each claim round costs a few stat calls instead of 10,000.
        """
        now = time.monotonic() if now is None else now
        out: list[tuple[float, Path]] = []
        for path, seen in list(self._seen.items()):
            if limit is not None and len(out) >= limit:
                break
            st = _lstat_file(path)
            if st is None:
                del self._seen[path]
                continue
            if (st.st_size, st.st_mtime_ns) != (seen.size, seen.mtime_ns):
                self._seen[path] = _Seen(st.st_size, st.st_mtime_ns, now, seen.arrived)
            elif now - seen.quiet_since >= self.settle_s:
                out.append((seen.quiet_since, path))
        return [path for _, path in sorted(out)]


def _lstat_file(path: Path) -> os.stat_result | None:
    """The path's own stat, not its target's; None for a link, a folder or a file gone.

    A pipe, socket or device stays: it goes to failed/ with a report (reading it never blocks).
    """
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return None if stat.S_ISLNK(st.st_mode) or stat.S_ISDIR(st.st_mode) else st


WANTED_EVENTS = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileClosedEvent,
    FileMovedEvent,
    DirCreatedEvent,  # a hot folder made or moved in: watchdog then reports the files inside
    DirMovedEvent,
]
"""Only these reach the daemon (and, with inotify, the kernel's mask): the daemon's own reads of
job files (open, close without write) and the folder-modified echo of every file event would
otherwise each cross watchdog's three threads to be dropped at the end. Deletions are left out
too: the commonest by far is the daemon's own claim moving a file out, and the tracker re-checks
every file on disk before it counts as stable, so a file that is gone is dropped there."""


@dataclass(frozen=True)
class Change:
    path: Path
    renamed: bool


class _Forward(FileSystemEventHandler):
    """Hands watchdog's events to the daemon's loop; no work in the observer thread."""

    def __init__(self, changes: queue.SimpleQueue[Change]) -> None:
        self.changes = changes

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type in ("opened", "closed_no_write"):
            return
        if event.event_type == "moved":
            self.changes.put(Change(Path(os.fsdecode(event.src_path)), renamed=False))
            self.changes.put(Change(Path(os.fsdecode(event.dest_path)), renamed=True))
        else:
            self.changes.put(Change(Path(os.fsdecode(event.src_path)), renamed=False))


class InboxWatcher:
    """The watchdog observer on the inbox, plus full scans for what events miss."""

    def __init__(self, inbox: Path, *, mode: str, poll_interval_s: float) -> None:
        self.inbox = inbox
        self.changes: queue.SimpleQueue[Change] = queue.SimpleQueue()
        self.observer: BaseObserver = (
            PollingObserver(timeout=poll_interval_s) if mode == "poll" else _native_observer(mode)
        )
        self.observer.schedule(_Forward(self.changes), str(inbox), recursive=True, event_filter=WANTED_EVENTS)

    def start(self) -> None:
        self.observer.start()
        for thread in threading.enumerate():  # the observer, its emitter, inotify's readers
            if type(thread).__module__.startswith("watchdog."):
                name_os_thread("watch", thread)

    def stop(self) -> None:
        self.observer.stop()
        self.observer.join(timeout=5)

    def alive(self) -> bool:
        return self.observer.is_alive()

    def next_changes(self, timeout_s: float) -> list[Change]:
        """Wait up to `timeout_s` for the first change, then take all that are queued."""
        try:
            first = self.changes.get(timeout=timeout_s)
        except queue.Empty:
            return []
        out = [first]
        while True:
            try:
                out.append(self.changes.get_nowait())
            except queue.Empty:
                return out

    def scan(self) -> Iterator[Path]:
        """Every candidate file now in the inbox (root and hot folders)."""
        return candidates(self.inbox)


def candidates(inbox: Path) -> Iterator[Path]:
    """Every candidate file now in `inbox` (root and hot folders): what a daemon would claim."""
    try:
        entries = list(os.scandir(inbox))
    except OSError as exc:
        log.error("cannot list the inbox %s: %s", inbox, exc)
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False) and not entry.name.startswith(IGNORED_PREFIXES):
            try:
                children = [Path(c.path) for c in os.scandir(entry.path) if c.is_file(follow_symlinks=False)]
            except OSError:
                continue
            yield from (c for c in children if is_candidate(c.relative_to(inbox)))
        elif entry.is_file(follow_symlinks=False) and is_candidate(Path(entry.name)):
            yield Path(entry.path)


def _fast_move_pairing() -> None:
    """Hold unpaired inotify moves for 20 ms, not watchdog's 500 ms.

    watchdog keeps each IN_MOVED_FROM for `delay` waiting for its IN_MOVED_TO, and
    every later event queues behind it. Each claim moves a file out of the inbox
    (unpaired), so with the default the next dropped file was seen ~0.45 s late
    (measured: drop → claim 400-440 ms back to back, 5 ms after this change). A
    rename inside the inbox delivers both halves in the same read, so 20 ms pairs it.
    """
    # watchdog >= 6 names it InotifyMoveEventGrouper, older ones InotifyBuffer.
    for module, name in (
        ("inotify_move_event_grouper", "InotifyMoveEventGrouper"),
        ("inotify_buffer", "InotifyBuffer"),
    ):
        try:
            grouper = getattr(importlib.import_module(f"watchdog.observers.{module}"), name)
        except (ImportError, AttributeError):
            continue
        grouper.delay = 0.02
        return


def _native_observer(mode: str) -> BaseObserver:
    _fast_move_pairing()
    if mode == "inotify":
        from watchdog.observers.inotify import InotifyObserver

        return InotifyObserver()
    return Observer()
