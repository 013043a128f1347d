"""A deterministic stand-in for the real generator: the daemon's lifecycle without a model.

`StandInGenerator` makes each image from its seed alone (a solid colour, or seeded noise), at
the size the real pipeline would make, in the job's denoising steps: each step reports
progress and honours a cancel exactly where diffusers' callback does. A `Gate` holds chosen
jobs at a step until it is released (or the job is cancelled), so a test can kill, stop or
reload the daemon while a job is provably mid-way, on any machine at any speed. `fail_with`
makes chosen jobs raise a given error.

It is picked only by code: `Daemon(config, generator_factory=lambda config: StandInGenerator())`,
`diffusiond.daemon.cli.main(argv, generator_factory=...)` (tests/standin_daemon.py), or the
bench. No config field, environment variable or command-line flag of `diffusiond` selects it.
It imports no torch, so a daemon running it starts in a fraction of the time.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from PIL import Image

from diffusiond.pipeline.backend import Cancelled, ExtraNetworks, Generated, ModelInfo, StepHook
from diffusiond.pipeline.errors import job_context
from diffusiond.pipeline.families import ModelEntry
from diffusiond.pipeline.job import Job, seeds_for

_POLL_S = 0.02
"""How often a held job looks at its gate's release file (another process opens the gate)."""


@dataclass
class Gate:
    """Holds each job whose prompt is `prompt` (every job if None) when it reaches `step`, until `release()`.

    In-process, `held` is set while a job waits. With `folder`, the gate works across processes: a
    held job writes `folder/held-<job_id>`, and creating `folder/release` opens the gate.
    """

    step: int = 1
    prompt: str | None = None
    folder: Path | None = None
    held: threading.Event = field(default_factory=threading.Event, init=False)
    _released: threading.Event = field(default_factory=threading.Event, init=False)

    def holds(self, job: Job, step: int) -> bool:
        return step == self.step and (self.prompt is None or job.spec.prompt == self.prompt)

    def release(self) -> None:
        """Open the gate for good: held jobs go on, later ones pass."""
        self._released.set()
        if self.folder is not None:
            (self.folder / "release").touch()

    @property
    def released(self) -> bool:
        return self._released.is_set() or (self.folder is not None and (self.folder / "release").exists())

    def wait(self, job: Job, cancel: threading.Event | None) -> None:
        """Block until released; raise Cancelled if `cancel` is set first (a warm stop at this step)."""
        if self.folder is not None:
            (self.folder / f"held-{job.job_id}").touch()
        self.held.set()
        while not self.released:
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"cancelled while held at step {self.step}")
            time.sleep(_POLL_S)


class StandInGenerator:
    """A `Generator` with no model: seeded images at the real sizes, real steps, a gate, chosen failures."""

    def __init__(
        self,
        *,
        step_s: float = 0.0,
        gate: Gate | None = None,
        fail_with: Mapping[str, BaseException] | None = None,
        pattern: Literal["solid", "noise"] = "solid",
    ) -> None:
        self.step_s = step_s
        """Seconds each step takes (the bench's stand-in for generation time)."""
        self.gate = gate
        self.fail_with = dict(fail_with or {})
        """Prompt -> the error a job with that prompt raises before its first step."""
        self.pattern = pattern
        self.calls: list[list[str]] = []
        """The job ids of each call, in order: which jobs shared a call."""
        self._loaded: list[str] = []
        self._lock = threading.Lock()  # preload on the worker thread, reconfigure on the main one

    @property
    def device(self) -> str:
        return "cpu"

    def preload(self, name: str) -> None:
        with self._lock:
            if name not in self._loaded:
                self._loaded.append(name)

    def reconfigure(
        self,
        entries: Mapping[str, ModelEntry],
        *,
        memory: str,
        max_loaded: int,
        networks: ExtraNetworks | None = None,
    ) -> None:
        with self._lock:
            self._loaded = [name for name in self._loaded if name in entries]

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def generate(
        self,
        jobs: Sequence[Job],
        *,
        cancel: threading.Event | None = None,
        on_step: StepHook | None = None,
    ) -> list[Generated]:
        started = time.perf_counter()
        self.calls.append([job.job_id for job in jobs])
        first = jobs[0]
        for job in jobs:
            error = self.fail_with.get(job.spec.prompt)
            if error is not None:
                with job_context(path=job.source, job_index=job.index):
                    raise error
        if first.spec.uses_model and first.spec.model is not None:
            self.preload(first.spec.model)
        total = first.spec.denoise_steps() if first.spec.uses_model else 0  # a Lanczos upscale has no steps
        for step in range(1, total + 1):
            if self.step_s:
                time.sleep(self.step_s)
            if on_step is not None:
                on_step(step, total)
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"cancelled after step {step} of {total}")
            if self.gate is not None:
                held = next((job for job in jobs if self.gate.holds(job, step)), None)
                if held is not None:
                    self.gate.wait(held, cancel)
        took = time.perf_counter() - started
        return [self._images(job, took, len(jobs)) for job in jobs]

    def _images(self, job: Job, took: float, batch_size: int) -> Generated:
        spec = job.spec
        size = spec.output_size(job.input_size)
        seeds = seeds_for(spec) if spec.uses_model else [spec.seed or 0]
        images = [self._image(seed, size) for seed in seeds]
        model = ModelInfo(spec.model, "(stand-in)", "0" * 10, "stand-in", type(self).__name__) if spec.model else None
        return Generated(
            images,
            seeds,
            (spec.scheduler or "StandIn") if spec.uses_model else "lanczos",
            load_s=0.0,
            generate_s=took,
            device=self.device,
            dtype="float32",
            model=model,
            memory="normal" if spec.uses_model else None,
            batch_size=batch_size,
            prediction="epsilon" if spec.uses_model else None,
        )

    def _image(self, seed: int, size: tuple[int, int]) -> Image.Image:
        digest = hashlib.sha256(seed.to_bytes(8, "little")).digest()
        if self.pattern == "solid":
            return Image.new("RGB", size, (digest[0], digest[1], digest[2]))
        noise = hashlib.shake_256(digest).digest(size[0] * size[1] * 3)
        return Image.frombytes("RGB", size, noise)


@dataclass(frozen=True)
class StandInFactory:
    """A picklable `generator_factory` for code that starts daemons in other processes it cannot hand an
    object to (a Ray slot: tests/test_cluster.py, bench/cluster.py); `hold_folder` is a cross-process Gate's."""

    step_s: float = 0.0
    hold_prompt: str | None = None
    hold_folder: str | None = None

    def __call__(self, _config: object) -> StandInGenerator:
        gate = None
        if self.hold_folder is not None:
            gate = Gate(prompt=self.hold_prompt, folder=Path(self.hold_folder))
        return StandInGenerator(step_s=self.step_s, gate=gate)
