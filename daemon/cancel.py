"""Cancel requests: `<spool>/.cancel/<id>.json`, written by `diffusiond cancel`, answered by a daemon.

A request names a claim id, a job id (`<claim_id>-<n>`: its whole file is cancelled) or a file
as the inbox knows it (`sketches/cat.png`). It lives on the spool, so `diffusiond cancel` works
from any host that mounts it. Every daemon on the spool reads the requests; only the one that
holds the target acts (a claim belongs to one daemon, an inbox file to whoever claims it first),
and it answers in `<id>.answer.json`: at once that it is cancelling, and again when the claim
has ended (`final`), when the request goes:

- running: the job stops at its next step boundary;
- claimed, waiting for the worker: it ends at once;
- in the inbox, not claimed yet: it is claimed and ended at once.

Either way the inputs go to failed/ with a report, `code: cancelled`. A request no daemon
holds a target for is removed by `diffusiond cancel` when it stops waiting, and by the daemons
after `EXPIRES_S`, so a stale one never cancels a file of the same name dropped later.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusiond.daemon.fsutil import atomic_write

log = logging.getLogger(__name__)
FOLDER = ".cancel"
EXPIRES_S = 600.0
"""A request older than this is dropped unanswered (its asker gave up long ago)."""


@dataclass(frozen=True)
class Request:
    path: Path
    target: str
    asked: float

    @property
    def answer_path(self) -> Path:
        return answer_path(self.path)

    def matches(self, claim_id: str, source: str) -> bool:
        """Its target is this claim: its id, one of its jobs' ids, or its file."""
        target = self.target
        return target in (claim_id, source) or target.startswith(f"{claim_id}-")


def answer_path(request: Path) -> Path:
    return request.with_name(request.name.removesuffix(".json") + ".answer.json")


def ask(spool: Path, target: str) -> Path:
    """Write a request (atomically: a daemon never reads half of one); returns its path."""
    folder = spool / FOLDER
    folder.mkdir(exist_ok=True)
    path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}.json"
    record = {"target": target, "asked": time.time(), "host": platform.node(), "pid": os.getpid()}
    atomic_write(path, json.dumps(record).encode())
    return path


def pending(spool: Path, now: float | None = None) -> list[Request]:
    """The requests not answered yet; expired ones are removed."""
    folder = spool / FOLDER
    now = time.time() if now is None else now
    requests: list[Request] = []
    try:
        names = sorted(os.listdir(folder))
    except OSError:  # no request was ever made (or the spool is unreadable: the rescan logs that)
        return []
    for name in names:
        if name.startswith(".") or not name.endswith(".json") or name.endswith(".answer.json"):
            continue
        path = folder / name
        record = _small_json(path)
        asked = record.get("asked") if record is not None else None
        if record is None or not isinstance(record.get("target"), str) or not isinstance(asked, int | float):
            continue  # not a request `ask` wrote: left alone, never acted on
        if now - asked > EXPIRES_S:
            _remove(path)
            _remove(answer_path(path))
            continue
        answered = _small_json(answer_path(path))
        if answered is None or not answered.get("final"):
            requests.append(Request(path, record["target"], float(asked)))
    return requests


MAX_BYTES = 64 * 1024
"""A request or an answer is a few hundred bytes; a larger file in `.cancel/` is not read."""


def _small_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from a plain file of at most MAX_BYTES: anyone who can write the spool can put a
    link to /dev/zero, a pipe or a huge file here, and the daemon reads this folder twice a second."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_BYTES:
            return None
        value = json.loads(os.read(fd, MAX_BYTES + 1))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    return value if isinstance(value, dict) else None


def answer(request: Request, outcome: dict[str, Any], *, final: bool) -> None:
    """Tell the asker; a final answer (the claim has ended) also removes the request, after it."""
    record = outcome | {"final": final}
    try:
        atomic_write(request.answer_path, json.dumps(record, ensure_ascii=False).encode(errors="backslashreplace"))
    except OSError as exc:
        log.warning("cannot answer the cancel request %s: %s", request.path, exc)
        return
    if final:
        _remove(request.path)


def wait_answer(request: Path, *, found_s: float, ended_s: float, poll_s: float = 0.2) -> dict[str, Any] | None:
    """The last answer to `request` (the answer file removed once final): None when no daemon took it
    within `found_s` (the request is removed then); a `final: false` one when it did not end in `ended_s`."""
    started = time.monotonic()
    answer_file = answer_path(request)
    latest: dict[str, Any] | None = None
    while True:
        latest = _small_json(answer_file) or latest
        if latest is not None and latest.get("final"):
            _remove(answer_file)
            return latest
        waited = time.monotonic() - started
        if latest is None and waited >= found_s:
            _remove(request)
            latest = _small_json(answer_file)  # taken just now, after all: it is being cancelled
            if latest is None:
                return None
        if waited >= ended_s:
            return latest
        time.sleep(poll_s)


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)
