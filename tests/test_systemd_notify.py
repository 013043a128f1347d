"""The notify protocol through a real AF_UNIX datagram socket bound by the test, to a real daemon process."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CEILING_S, Spool, hold, start_daemon_process, wait_for


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(0.2)
    yield sock
    sock.close()


def messages_until(sock: socket.socket, wanted: str, timeout_s: float = CEILING_S) -> list[dict[str, str]]:
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


def test_ready_status_and_stopping_reach_the_manager(
    spool: Spool, notify_socket: socket.socket, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    process = start(spool, notify_socket, standin=hold(gate, "slow"))
    try:
        [*_, ready] = messages_until(notify_socket, "READY")
        assert ready["READY"] == "1" and ready["MAINPID"] == str(process.pid)
        assert ready["STATUS"].startswith("idle, watching")
        spool.drop("slow.yaml", "prompt: slow\nsize: 256x256\nsteps: 40\nseed: 1\nwatermark: {invisible: false}\n")
        statuses = [m["STATUS"] for m in messages_until(notify_socket, "STATUS") if "STATUS" in m]
        while not any(s.startswith("running slow.yaml (step 1 of 40)") for s in statuses):
            statuses += [m["STATUS"] for m in messages_until(notify_socket, "STATUS")]
        if Path(f"/proc/{process.pid}/task").is_dir():  # what `top -H` and `ps -L` show (Linux)
            names = {(task / "comm").read_text().strip() for task in Path(f"/proc/{process.pid}/task").iterdir()}
            assert {"diffusiond", "worker", "writer", "watch"} <= names, names
        process.send_signal(signal.SIGTERM)
        [*_, stopping] = messages_until(notify_socket, "STOPPING")
        assert stopping["STOPPING"] == "1"
        assert process.wait(CEILING_S) == 0
    finally:
        process.kill()
        output = process.stdout.read() if process.stdout else ""
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


def start(
    spool: Spool, sock: socket.socket, *, standin: dict[str, Any] | None = None, **env: str
) -> subprocess.Popen[str]:
    """The daemon under a "service manager" that is this test's socket; on the stand-in generator."""
    return start_daemon_process(
        spool.config_path, standin={} if standin is None else standin, env={"NOTIFY_SOCKET": sock.getsockname()} | env
    )


def test_sighup_reloads_the_config_and_refuses_a_broken_one(
    spool: Spool, notify_socket: socket.socket, test_models
) -> None:
    from tests.conftest import wait_for, write_config

    process = start(spool, notify_socket)
    try:
        messages_until(notify_socket, "READY")
        write_config(spool.root, test_models, defaults={"all": {"model": "test", "size": "32x32", "steps": 2}})
        process.send_signal(signal.SIGHUP)
        reloading = messages_until(notify_socket, "RELOADING")[-1]
        assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
        assert messages_until(notify_socket, "READY")[-1]["READY"] == "1"
        spool.drop("after-reload.yaml", "prompt: new defaults\n")
        [manifest] = wait_for(spool.manifests, what="a manifest")
        assert manifest["job"]["size"] == [32, 32] and manifest["job"]["steps"] == 2, "the new config took effect"

        spool.config_path.write_text("device: [not, valid\n")
        process.send_signal(signal.SIGHUP)
        messages_until(notify_socket, "RELOADING")
        ready = messages_until(notify_socket, "READY")[-1]
        assert ready["STATUS"].startswith("config reload refused")
        spool.drop("still-old.yaml", "prompt: the old config still runs\n")
        manifests = wait_for(lambda: len(spool.manifests()) == 2 and spool.manifests(), what="a second manifest")
        assert all(m["job"]["size"] == [32, 32] for m in manifests)
        process.send_signal(signal.SIGTERM)
        assert process.wait(CEILING_S) == 0
    finally:
        process.kill()
        output = process.stdout.read()
    assert "config reload refused, keeping the running config" in output


def test_watchdog_pings_while_healthy_and_stop_while_a_job_makes_no_progress(
    spool: Spool, notify_socket: socket.socket, test_models, tmp_path: Path
) -> None:
    """A job counts as hung when no step ends for job_stall_s (0.1 s here): the stand-in holds one at a step."""
    from tests.conftest import wait_for, write_config

    gate = tmp_path / "gate"
    write_config(spool.root, test_models, job_stall_s=0.1)
    watchdog_s = 1.0  # pings every half of it
    process = start(spool, notify_socket, standin=hold(gate, "stalls"), WATCHDOG_USEC=str(int(watchdog_s * 1e6)))
    try:
        messages_until(notify_socket, "READY")
        pings = [time.monotonic() for _ in range(6) if messages_until(notify_socket, "WATCHDOG")]
        healthy_gap = max(b - a for a, b in itertools.pairwise(pings))
        assert healthy_gap < watchdog_s, f"pings come within WATCHDOG_USEC while idle, worst gap {healthy_gap:.2f} s"
        spool.drop("stalls.yaml", "prompt: stalls\nsteps: 2\nwatermark: {invisible: false}\n")
        wait_for(lambda: list(gate.glob("held-*")), what="the job held at its first step")
        silence_s = 5 * watchdog_s / 2  # five ping intervals without one: the pings stopped
        last_ping = deadline = time.monotonic()
        deadline += CEILING_S
        while time.monotonic() - last_ping < silence_s:
            assert time.monotonic() < deadline, "the pings went on while the job was held"
            try:
                if b"WATCHDOG=1" in notify_socket.recv(4096):
                    last_ping = time.monotonic()
            except TimeoutError:
                continue
        assert spool.manifests() == [], "the job is still held"
        (gate / "release").touch()
        wait_for(spool.manifests, what="the job finished once released")
        assert messages_until(notify_socket, "WATCHDOG"), "pings resume once the job is done"
    finally:
        process.kill()
        process.wait(CEILING_S)


def test_the_reload_command_returns_once_the_daemon_has_read_the_config(spool: Spool, test_models) -> None:
    """`diffusiond reload` is the units' ExecReload: `systemctl reload` returns when it does, and fails
    when the daemon refuses the config (systemd 252 has no Type=notify-reload to wait for READY=1)."""
    from tests.conftest import wait_until_ready, write_config
    from tests.test_cli import cli

    process = start_daemon_process(spool.config_path, standin={})
    try:
        status = wait_until_ready(spool.config_path, process)
        assert status["reload"] is None
        write_config(spool.root, test_models, defaults={"all": {"model": "test", "size": "32x32", "steps": 2}})
        took = cli("reload", "--config", str(spool.config_path), "--pid", str(process.pid))
        assert took.returncode == 0 and "config reloaded" in took.stdout, took.stderr
        # What a script that reloads and then submits relies on: the reload is done when it returns.
        first = json.loads((spool.root / "state" / "status.json").read_text())["reload"]
        assert first["ok"] is True and first["error"] is None

        spool.config_path.write_text(spool.config_path.read_text() + "device: warp-drive\n")
        state = str(spool.root / "state")  # as the units say it: the config itself is now broken
        refused = cli("reload", "--state-dir", state, "--pid", str(process.pid))
        assert refused.returncode == 1
        assert "config reload refused, the daemon keeps its running config" in refused.stderr
        assert "field 'device'" in refused.stderr, refused.stderr
        second = json.loads((spool.root / "state" / "status.json").read_text())["reload"]
        assert second["ok"] is False and second["asked"] > first["asked"]
        assert process.poll() is None, "a refused config does not stop the daemon"
        spool.drop("after.yaml", "prompt: the reloaded config still runs\n")
        [manifest] = wait_for(spool.manifests, what="a manifest")
        assert manifest["job"]["size"] == [32, 32]

        process.send_signal(signal.SIGTERM)
        assert process.wait(CEILING_S) == 0
        gone = cli("reload", "--state-dir", state, "--timeout", str(CEILING_S))
        assert gone.returncode == 1 and f"the daemon (pid {process.pid}) is not running" in gone.stderr
    finally:
        process.kill()
        process.wait()
