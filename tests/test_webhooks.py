"""Webhooks through a real HTTP server bound by the test on 127.0.0.1, to a real daemon process."""

from __future__ import annotations

import json
import signal
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from diffusiond.daemon.webhooks import SIGNATURE_HEADER, signature
from tests.conftest import CEILING_S, Spool, start_daemon_process, wait_for, wait_until_ready, write_config

SECRET = "s3cret"


class Receiver:
    """An HTTP server that records each POST (headers and body) and answers 204."""

    def __init__(self, port: int = 0) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        received = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((dict(self.headers), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def events(self) -> dict[str, dict[str, Any]]:
        """Each CloudEvent once per id (what a receiver that dedupes keeps), its signature checked."""
        kept: dict[str, dict[str, Any]] = {}
        for headers, body in self.requests:
            assert headers["Content-Type"].startswith("application/cloudevents+json")
            assert headers[SIGNATURE_HEADER] == signature(SECRET, body), "the signature verifies"
            event = json.loads(body)
            kept.setdefault(event["id"], event)
        return kept


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


def notify_config(spool: Spool, test_models, port: int) -> None:
    write_config(
        spool.root,
        test_models,
        outbox_failures=True,
        notify=[{"url": f"http://127.0.0.1:{port}/hook", "secret": SECRET}],
    )


def test_a_done_and_a_failed_job_each_arrive_as_a_signed_cloud_event(
    spool: Spool, test_models, receiver: Receiver
) -> None:
    notify_config(spool, test_models, receiver.port)
    process = start_daemon_process(spool.config_path, standin={"fail": {"second": "the stand-in broke"}})
    try:
        wait_until_ready(spool.config_path, process)
        spool.drop("fine.yaml", "prompt: fine\n")
        spool.drop("typo.yaml", "promt: typo\n")
        spool.drop("three.yaml", "prompt: first\n---\nprompt: second\n---\nprompt: third\n")
        events = wait_for(lambda: len(receiver.events()) == 5 and receiver.events(), what="five webhooks")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(CEILING_S)
    manifests = {m["job_id"]: m for m in spool.manifests()}
    failures = {f["job_id"]: f for f in spool.failures()}
    assert len(manifests) == 3 and len(failures) == 2
    for job_id, manifest in manifests.items():
        done = events[f"{job_id}.1"]
        assert (done["specversion"], done["type"], done["subject"]) == ("1.0", "org.diffusiond.job.done", job_id)
        assert done["data"] == manifest and done["source"].endswith("/test")
    for job_id, failure in failures.items():  # the typo file, and job 2 of three.yaml: each its own record
        failed = events[f"{job_id}.1"]
        assert failed["type"] == "org.diffusiond.job.failed" and failed["data"] == failure
    assert any(job_id.endswith("-2") for job_id in failures)
    assert not list((spool.root / "state" / "notify").glob("*.json")), "nothing left to send"


def test_a_receiver_down_across_a_daemon_restart_still_gets_each_event_once(
    spool: Spool, test_models, tmp_path: Path
) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now: each attempt is refused
    notify_config(spool, test_models, port)
    pending = spool.root / "state" / "notify"

    def tried_twice() -> bool:
        files = list(pending.glob("*.json"))
        return bool(files) and all(json.loads(f.read_text()).get("attempts", 0) >= 2 for f in files)

    process = start_daemon_process(spool.config_path, standin={})
    try:
        wait_until_ready(spool.config_path, process)
        spool.drop("one.yaml", "prompt: one\n")
        spool.drop("two.yaml", "prompt: two\n")
        wait_for(lambda: len(spool.manifests()) == 2, what="both jobs done")
        wait_for(tried_twice, what="each notification refused twice")
    finally:
        process.send_signal(signal.SIGKILL)  # the queue is on disk: the next start sends it
        process.wait(CEILING_S)
    receiver = Receiver(port)
    try:
        again = start_daemon_process(spool.config_path, standin={})
        try:
            events = wait_for(lambda: len(receiver.events()) == 2 and receiver.events(), what="both, after the restart")
            wait_for(lambda: not list(pending.glob("*.json")), what="the queue emptied")
        finally:
            again.send_signal(signal.SIGTERM)
            again.wait(CEILING_S)
    finally:
        receiver.close()
    assert sorted(events) == sorted(f"{m['job_id']}.1" for m in spool.manifests())
    assert all(e["type"] == "org.diffusiond.job.done" for e in events.values())
