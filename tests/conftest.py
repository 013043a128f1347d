"""Shared fixtures: the tiny test models, a spool with a config, and a real running daemon.

The daemon runs in a thread of the test process (real watchdog observer, real
files, real diffusers pipelines on the tiny models) or, for crash and CLI tests,
as a real subprocess. Tests about the daemon's lifecycle rather than its pixels
(kill -9, stops, reloads, the watchdog, batching order) run it on the stand-in
generator (pipeline/standin.py), whose gate holds a job at a step until the test
lets it go: they wait on events, never on how fast this machine generates.

Every wait has a ceiling (`CEILING_S`) so a broken daemon fails the test instead
of hanging it; a passing test never comes near it, however busy the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ["HF_HUB_OFFLINE"] = "1"

from diffusiond.daemon.config import Config, load_config
from diffusiond.daemon.service import Daemon
from diffusiond.pipeline.backend import Generator
from diffusiond.pipeline.standin import StandInGenerator
from diffusiond.pipeline.testmodel import FamilyModelPaths, TestModelPaths, make_family_models, make_test_model

FAST_WATCH = {"settle_s": 0.3, "pair_wait_s": 2.0, "rescan_interval_s": 2.0, "poll_interval_s": 0.2}
REPO = Path(__file__).resolve().parent.parent
CEILING_S = float(os.environ.get("DIFFUSIOND_TEST_CEILING_S", "300"))
"""How long any wait may take before the test fails: far beyond what a passing run needs on a loaded machine
(lower it while developing, to see a hang sooner)."""


@pytest.fixture(scope="session")
def test_models(tmp_path_factory: pytest.TempPathFactory) -> TestModelPaths:
    return make_test_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def family_models(tmp_path_factory: pytest.TempPathFactory) -> FamilyModelPaths:
    return make_family_models(tmp_path_factory.mktemp("families"))


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

        paths = sorted(p for p in self.outbox.glob("*.json") if not p.name.endswith(".failed.json"))
        return [json.loads(p.read_text()) for p in paths]

    def failures(self) -> list[dict[str, Any]]:
        """The outbox's `<job_id>.failed.json` records (`outbox_failures: true`)."""
        import json

        return [json.loads(p.read_text()) for p in sorted(self.outbox.glob("*.failed.json"))]

    def reports(self) -> list[dict[str, Any]]:
        return [yaml.safe_load(p.read_text()) for p in sorted(self.failed.glob("*.error.yaml"))]

    def claims(self) -> list[Path]:
        """The claim folders in the test instance's work folder (its dotfiles: lock, owner record, lease, are not)."""
        work = self.root / "work" / "test"
        return sorted(p for p in work.iterdir() if p.is_dir() and not p.name.startswith(".")) if work.is_dir() else []

    def visible_outputs(self) -> list[str]:
        return sorted(p.name for p in self.outbox.iterdir() if not p.name.startswith("."))


@pytest.fixture
def spool(tmp_path: Path, test_models: TestModelPaths) -> Spool:
    root = tmp_path / "spool"
    (root / "inbox").mkdir(parents=True)
    return Spool(root, write_config(root, test_models))


def make_daemon_folders(config: Config) -> None:
    """The outbox and work folder the daemon makes at start, for tests that claim without one."""
    for folder in (config.outbox, config.work_dir):
        folder.mkdir(parents=True, exist_ok=True)


def wait_for(predicate: Callable[[], Any], timeout_s: float = CEILING_S, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def run_in_turn(spool: Spool, jobs: Sequence[tuple[str, str]]) -> dict[str, dict[str, Any]]:
    """Drop each `(stem, job text)` and wait for its manifest before the next, under a running daemon:
    each job runs after the one before it (e.g. after a LoRA was loaded). Manifests by stem."""
    made: dict[str, dict[str, Any]] = {}
    for name, text in jobs:
        spool.drop(f"{name}.yaml", text)
        made[name] = wait_for(
            lambda name=name: next((m for m in spool.manifests() if m["source"] == f"{name}.yaml"), None),
            what=f"the manifest of {name}.yaml",
        )
    return made


def first_image_pixels(spool: Spool, manifest: dict[str, Any]) -> bytes:
    """The RGB pixels of a manifest's first image (metadata left out)."""
    from PIL import Image

    with Image.open(spool.outbox / manifest["outputs"][0]["file"]) as image:
        return image.convert("RGB").tobytes()


@contextlib.contextmanager
def start_daemon_thread(spool: Spool, generator: Generator | None = None) -> Iterator[Daemon]:
    """A real daemon on `spool` (its config as written now), running in a thread; diffusers unless `generator`."""
    if generator is None:
        instance = Daemon(spool.config)
    else:
        instance = Daemon(spool.config, generator_factory=lambda _config: generator)
    thread = threading.Thread(target=instance.run, name="daemon-under-test", daemon=True)
    thread.start()
    assert instance.ready.wait(CEILING_S), "daemon did not start"
    try:
        yield instance
    finally:
        instance.stop.set()
        thread.join(CEILING_S)
        assert not thread.is_alive(), "daemon did not stop"


@pytest.fixture
def daemon(spool: Spool) -> Iterator[Daemon]:
    """A real daemon on `spool`, running in a thread until the test ends."""
    with start_daemon_thread(spool) as instance:
        yield instance


@pytest.fixture
def standin() -> StandInGenerator:
    return StandInGenerator()


@pytest.fixture
def standin_daemon(spool: Spool, standin: StandInGenerator) -> Iterator[Daemon]:
    """A real daemon on `spool` running the stand-in generator (`standin`), in a thread until the test ends."""
    with start_daemon_thread(spool, standin) as instance:
        yield instance


def start_daemon_process(
    config_path: Path,
    *extra: str,
    standin: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    log: Path | None = None,
) -> subprocess.Popen[str]:
    """`diffusiond run` as a real subprocess (for kill -9 and signal tests).

    With `standin` (the settings tests/standin_daemon.py takes: `hold`, `fail`, `step_s`), the
    same command line runs on the stand-in generator. Its output is a pipe the test reads at the
    end, or the file `log` for a daemon that logs more than a pipe holds (64 KiB) before then.
    """
    entry = ["diffusiond.daemon.cli"] if standin is None else ["tests.standin_daemon", json.dumps(standin)]
    return subprocess.Popen(
        [sys.executable, "-m", *entry, "run", "--config", str(config_path), *extra],
        stdout=subprocess.PIPE if log is None else log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env=os.environ | {"PYTHONUNBUFFERED": "1"} | (env or {}),
    )


def hold(gate: Path, prompt: str | None = None, step: int = 1) -> dict[str, Any]:
    """Stand-in settings (for `start_daemon_process`) that hold the job with `prompt` (any job if None)
    at `step` until `gate/release` exists; the held job shows as `gate/held-<job_id>`."""
    gate.mkdir(exist_ok=True)
    return {"hold": {"prompt": prompt, "step": step, "folder": str(gate)}}


def wait_until_ready(config_path: Path, process: subprocess.Popen[str]) -> dict[str, Any]:
    """Wait for the daemon process's status.json to say `ready` (its signal handlers are installed by then)."""
    state = load_config(config_path).state / "status.json"

    def ready() -> dict[str, Any] | None:
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            raise AssertionError(f"the daemon exited with {process.returncode}: {output}")
        try:
            status = json.loads(state.read_text())
        except (OSError, ValueError):
            return None
        return status if status.get("state") == "ready" and status.get("pid") == process.pid else None

    return wait_for(ready, what=f"{state} to say ready")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real filesystem of 8 MiB (a tmpfs), to fill up or to move across; skipped where it cannot be mounted."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


FIGURES: list[str] = []
"""Lines the crash, race and full-disk tests report (kills survived, jobs, lost, duplicated)."""


def figure(line: str) -> None:
    """Report a measured figure: printed at the end of the test run, passed or not, `-q` or not."""
    FIGURES.append(line)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("spool protocol figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
