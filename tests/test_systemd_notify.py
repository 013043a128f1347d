"""The notify protocol through a real AF_UNIX datagram socket bound by the test, to a real daemon process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Spool


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(0.2)
    yield sock
    sock.close()


def messages_until(sock: socket.socket, wanted: str, timeout_s: float = 60.0) -> list[dict[str, str]]:
    """Read datagrams until one has the key `wanted`; each as a dict of its KEY=value lines."""
    seen: list[dict[str, str]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            data = sock.recv(4096).decode()
        except TimeoutError:
            continue
        fields = dict(line.split("=", 1) for line in data.splitlines())
        seen.append(fields)
        if wanted in fields:
            return seen
    raise AssertionError(f"no {wanted} after {timeout_s} s; got {seen}")


def test_ready_status_and_stopping_reach_the_manager(spool: Spool, notify_socket: socket.socket) -> None:
    env = os.environ | {"NOTIFY_SOCKET": notify_socket.getsockname(), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "diffusiond.daemon.cli", "run", "--config", str(spool.config_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        [*_, ready] = messages_until(notify_socket, "READY")
        assert ready["READY"] == "1" and ready["MAINPID"] == str(process.pid)
        assert ready["STATUS"].startswith("idle, watching")
        spool.drop("slow.yaml", "prompt: slow\nsize: 256x256\nsteps: 40\nseed: 1\nwatermark: {invisible: false}\n")
        statuses = [m["STATUS"] for m in messages_until(notify_socket, "STATUS") if "STATUS" in m]
        while not any(s.startswith("running slow.yaml (step") for s in statuses):
            statuses += [m["STATUS"] for m in messages_until(notify_socket, "STATUS")]
        process.send_signal(signal.SIGTERM)
        [*_, stopping] = messages_until(notify_socket, "STOPPING")
        assert stopping["STOPPING"] == "1"
        assert process.wait(60) == 0
    finally:
        process.kill()
        output = process.stdout.read()
    assert "stopped:" in output


def test_an_abstract_socket_address_and_no_manager_at_all() -> None:
    from diffusiond.daemon.systemd import Notifier

    name = f"diffusiond-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        Notifier(f"@{name}").status("hello")
        assert sock.recv(100) == b"STATUS=hello"
    finally:
        sock.close()
    quiet = Notifier("")
    quiet.ready("nobody listens")  # outside systemd: nothing is sent, nothing fails
    assert not quiet.enabled
