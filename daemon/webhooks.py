"""Webhooks: a CloudEvent for each job done or failed, POSTed to each `notify:` receiver, at least once.

A notification is a file in `<state>/notify/` before anything is sent (written whole and fsynced):
the webhook thread POSTs it; a 2xx answer removes it; anything else (refused, a timeout, a 4xx or
5xx) keeps it, and it is tried again after a backoff (1 s, 2 s, 4 s, ... at most `MAX_BACKOFF_S`).
A restart finds the files and sends them. So a receiver gets each event at least once, and may
get one twice (a crash after its 2xx, before the file went): it dedupes on the CloudEvent `id`,
which is unique per job and attempt. Only the URLs in the config are sent to: a notification whose
URL a reload removed is dropped with a log line.

The body is CloudEvents 1.0 structured JSON (`application/cloudevents+json`); `data` is the
job's manifest (`type: org.diffusiond.job.done`) or its failure (`org.diffusiond.job.failed`: the
outbox's failure record when `outbox_failures` is on, else the failed event's fields). The header
`X-Diffusiond-Signature: sha256=<hex>` is the HMAC-SHA256 of the body under the receiver's secret.

Sent with the standard library's urllib: one POST with a timeout per attempt is all it needs, and
it keeps the daemon's dependencies as they are.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import logging
import platform
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from diffusiond import __version__
from diffusiond.daemon.config import Config, WebhookConfig
from diffusiond.daemon.fsutil import atomic_write, read_json_object
from diffusiond.daemon.outbox import failure_records
from diffusiond.daemon.threads import name_os_thread

log = logging.getLogger(__name__)
FOLDER = "notify"
MAX_BACKOFF_S = 300.0
SIGNATURE_HEADER = "X-Diffusiond-Signature"


def signature(secret: str, body: bytes) -> str:
    """The signature header's value: what a receiver computes from the body and compares."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def cloud_events(event: dict[str, Any], config: Config) -> list[dict[str, Any]]:
    """The CloudEvents for a board event: one for a `done`; for a `failed`, one per failed job's record
    (`outbox_failures`), else one with the failure's fields; none for other events."""
    kind = event.get("event")
    job_id = str(event.get("job_id") or event.get("claim_id") or "")
    fields = {k: v for k, v in event.items() if k not in ("time", "event")}
    if kind == "done":
        return [_cloud_event("done", job_id, read_json_object(config.outbox / f"{job_id}.json") or fields, config)]
    if kind != "failed":
        return []
    claim_id = str(event.get("claim_id") or job_id)
    records = [read_json_object(p) for p in failure_records(config.outbox, claim_id)] if config.outbox_failures else []
    found = [r for r in records if r]
    if not found:
        return [_cloud_event("failed", job_id, fields, config)]
    return [_cloud_event("failed", str(r.get("job_id", job_id)), r, config) for r in found]


def _cloud_event(kind: str, job_id: str, data: dict[str, Any], config: Config) -> dict[str, Any]:
    attempt = data.get("attempt") or 1
    return {
        "specversion": "1.0",
        "type": f"org.diffusiond.job.{kind}",
        "source": f"diffusiond://{platform.node()}/{config.instance}",
        "id": f"{job_id}.{attempt}",
        "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "subject": job_id,
        "datacontenttype": "application/json",
        "data": data,
    }


class Webhooks:
    """The queue in `<state>/notify/` and the thread that empties it; `close` leaves what is unsent there."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.folder = config.state / FOLDER
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._sequence = itertools.count()

    def start(self) -> None:
        """Start sending (what a previous run left, then what comes), if there is anything to send to."""
        if self.config.notify or self._pending():
            self._ensure_thread()
            self._wake.set()

    def event(self, event: dict[str, Any]) -> None:
        """A board event: queue one notification per receiver that wants it (from any thread)."""
        kind = event.get("event")
        receivers = [hook for hook in self.config.notify if kind in hook.events]
        if not receivers:
            return
        bodies = cloud_events(event, self.config)
        if not bodies:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        for body in bodies:
            for hook in receivers:
                name = f"{time.time_ns():020d}-{next(self._sequence):06d}.json"
                pending = {"url": hook.url, "attempts": 0, "next_at": 0.0, "event": body}
                try:
                    atomic_write(self.folder / name, json.dumps(pending, ensure_ascii=False).encode())
                except OSError as exc:
                    log.error("cannot queue the %s webhook to %s for %s: %s", kind, hook.url, body["subject"], exc)
        self._ensure_thread()
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        with self._lock:
            thread = self._thread
        if thread is not None:
            while thread.is_alive():  # timed: the main thread handles signals between waits
                thread.join(0.5)

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="webhooks", daemon=True)
                self._thread.start()

    def _pending(self) -> list[Path]:
        return sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []

    def _serve(self) -> None:
        name_os_thread("webhooks")
        while not self._stop.is_set():
            self._wake.clear()
            wait_s = 60.0
            for path in self._pending():
                if self._stop.is_set():
                    return
                try:
                    due = self._send_due(path)
                except Exception:  # a bug must not end the thread: the file stays, tried again later
                    log.exception("internal error sending the webhook %s", path.name)
                    due = 60.0
                wait_s = min(wait_s, due)
            self._wake.wait(max(wait_s, 0.05))

    def _send_due(self, path: Path) -> float:
        """Send `path` if it is due; seconds until it (or nothing: 60) needs looking at again."""
        pending = read_json_object(path)
        if pending is None:
            return 60.0  # being written, or gone
        now = time.time()
        if pending["next_at"] > now:
            return float(pending["next_at"] - now)
        hook = next((h for h in self.config.notify if h.url == pending["url"]), None)
        event = pending["event"]
        if hook is None:
            log.warning("dropping the webhook for %s: %s is no longer in the config", event["subject"], pending["url"])
            path.unlink(missing_ok=True)
            return 60.0
        problem = _post(hook, event)
        if problem is None:
            path.unlink(missing_ok=True)
            log.info("webhook %s for %s delivered to %s", event["type"], event["subject"], hook.url)
            return 60.0
        attempts = int(pending["attempts"]) + 1
        backoff = min(2.0 ** (attempts - 1), MAX_BACKOFF_S)
        pending |= {"attempts": attempts, "next_at": now + backoff, "last_error": problem}
        atomic_write(path, json.dumps(pending, ensure_ascii=False).encode(), durable=False)
        log.warning(
            "webhook %s for %s to %s failed (attempt %d: %s); trying again in %g s",
            event["type"],
            event["subject"],
            hook.url,
            attempts,
            problem,
            backoff,
        )
        return backoff


def _post(hook: WebhookConfig, event: dict[str, Any]) -> str | None:
    """POST one CloudEvent; None when the receiver answered 2xx, else what went wrong."""
    body = json.dumps(event, ensure_ascii=False).encode()
    headers = {
        "Content-Type": "application/cloudevents+json; charset=utf-8",
        "User-Agent": f"diffusiond/{__version__}",
    }
    if hook.secret:
        headers[SIGNATURE_HEADER] = signature(hook.secret, body)
    request = urllib.request.Request(hook.url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=hook.timeout_s) as answer:
            status = answer.status
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return str(getattr(exc, "reason", exc))
    return None if 200 <= status < 300 else f"HTTP {status}"
