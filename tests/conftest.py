"""Shared fixtures: the tiny test models, a spool with a config, and a real running daemon.

The daemon runs in a thread of the test process (real watchdog observer, real
files, real diffusers pipelines on the tiny models) or, for crash and CLI tests,
as a real subprocess.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ["HF_HUB_OFFLINE"] = "1"

from diffusiond.daemon.config import Config, load_config
from diffusiond.daemon.service import Daemon
from diffusiond.pipeline.testmodel import TestModelPaths, make_test_model

FAST_WATCH = {"settle_s": 0.3, "pair_wait_s": 2.0, "rescan_interval_s": 2.0, "poll_interval_s": 0.2}


@pytest.fixture(scope="session")
def test_models(tmp_path_factory: pytest.TempPathFactory) -> TestModelPaths:
    return make_test_model(tmp_path_factory.mktemp("models"))


def write_config(root: Path, test_models: TestModelPaths, **overrides: Any) -> Path:
    """A config for a spool under `root`: tiny models, 64 px, few steps, fast settle."""
    data: dict[str, Any] = {
        "spool": str(root),
        "instance": "test",
        "state_dir": str(root / "state"),
        "models": {"test": str(test_models.sd), "test-x4": str(test_models.upscaler)},
        "defaults": {"all": {"model": "test", "size": "64x64", "steps": 4}, "upscale": {"model": "test-x4"}},
        "profiles": {"sketches": {"task": "img2img", "prompt": "a watercolor", "strength": 0.75}},
        "watch": dict(FAST_WATCH),
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and value and isinstance(data.get(key), dict) and key != "models":
            data[key] = data[key] | value
        else:
            data[key] = value
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@dataclass
class Spool:
    root: Path
    config_path: Path

    @property
    def config(self) -> Config:
        return load_config(self.config_path)

    def folder(self, name: str) -> Path:
        return self.root / name

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def outbox(self) -> Path:
        return self.root / "outbox"

    @property
    def failed(self) -> Path:
        return self.root / "failed"

    @property
    def archive(self) -> Path:
        return self.root / "archive"

    def drop(self, name: str, data: str | bytes) -> Path:
        """Drop a file the way a careful tool does: write a dotted temp name, then rename."""
        target = self.inbox / name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part")
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.rename(tmp, target)
        return target

    def manifests(self) -> list[dict[str, Any]]:
        import json

        return [json.loads(p.read_text()) for p in sorted(self.outbox.glob("*.json"))]

    def reports(self) -> list[dict[str, Any]]:
        return [yaml.safe_load(p.read_text()) for p in sorted(self.failed.glob("*.error.yaml"))]

    def visible_outputs(self) -> list[str]:
        return sorted(p.name for p in self.outbox.iterdir() if not p.name.startswith("."))


@pytest.fixture
def spool(tmp_path: Path, test_models: TestModelPaths) -> Spool:
    root = tmp_path / "spool"
    (root / "inbox").mkdir(parents=True)
    return Spool(root, write_config(root, test_models))


def wait_for(predicate: Callable[[], Any], timeout_s: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@contextlib.contextmanager
def start_daemon_thread(spool: Spool) -> Iterator[Daemon]:
    """A real daemon on `spool` (its config as written now), running in a thread."""
    instance = Daemon(spool.config)
    thread = threading.Thread(target=instance.run, name="daemon-under-test", daemon=True)
    thread.start()
    assert instance.ready.wait(30), "daemon did not start"
    try:
        yield instance
    finally:
        instance.stop.set()
        thread.join(30)
        assert not thread.is_alive(), "daemon did not stop"


@pytest.fixture
def daemon(spool: Spool) -> Iterator[Daemon]:
    """A real daemon on `spool`, running in a thread until the test ends."""
    with start_daemon_thread(spool) as instance:
        yield instance


def start_daemon_process(config_path: Path, *extra: str) -> subprocess.Popen[str]:
    """`diffusiond run` as a real subprocess (for kill -9 and signal tests)."""
    return subprocess.Popen(
        [sys.executable, "-m", "diffusiond.daemon.cli", "run", "--config", str(config_path), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
