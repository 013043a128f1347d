"""Multi-stage jobs (`then:`): each stage runs on the images of the stage before, kept in the claim folder.

A job with `then:` runs its own task first (stage 1), then each stage in turn on every image the
stage before made: `count: N` fans out, image i going through every later stage with the stage's
seed + i (its stage-1 seed, unless a stage sets a seed of its own). A later stage runs as one
generator job per image (count 1, the image before as its input), all N in one pipeline call
where the task batches, so the `Generator` and the batching need nothing new.

Between two stages the images are kept as lossless PNG in `<claim folder>/chain/<job_id>/<k>/`,
with `stage.json` written last: a stage with it is complete. A crash or a stop resumes at the first
stage without one, with the same seeds, so it makes the same images. They are not fsynced (like
jobs.json): only a power cut can lose a kept stage, and then it is made again. The folder goes
when the job is published.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusiond.daemon.fsutil import atomic_write, read_json_object
from diffusiond.pipeline.backend import EarlierStage, Generated, ModelInfo
from diffusiond.pipeline.job import SEED_MAX, InputImage, Job, Spec, stage_specs

CHAIN = "chain"
STAGE_RECORD = "stage.json"


@dataclass
class Chain:
    """A multi-stage job in this run: the stages it has finished, and the images of the running one."""

    job: Job
    done: list[EarlierStage] = field(default_factory=list)
    parts: dict[int, tuple[int, Generated]] = field(default_factory=dict)
    """The running stage's results so far: image number (0-based) -> (pipeline call, its Generated)."""
    failed: bool = False
    started: float = field(default_factory=time.perf_counter)
    """When this run took the job up (the log's "done ... in N s" counts from here)."""

    @property
    def specs(self) -> tuple[Spec, ...]:
        return stage_specs(self.job.spec)

    @property
    def running(self) -> int:
        """The number of the stage that runs now (1 is the job's own task)."""
        return len(self.done) + 1

    @property
    def stages(self) -> int:
        return len(self.specs)

    @property
    def is_last(self) -> bool:
        return self.running == self.stages

    def jobs(self, claim_folder: Path) -> list[Job]:
        """What the generator runs for the running stage: the job itself at stage 1, else one job per image."""
        if not self.done:
            return [self.job]
        before, spec = self.done[-1], self.specs[len(self.done)]
        job = self.job
        base = spec.seed or 0
        return [
            Job(
                job.job_id,
                job.source,
                job.index,
                spec.model_copy(update={"seed": (base + i) % (SEED_MAX + 1), "count": 1}),
                InputImage(_relative(path, claim_folder), path, before.sizes[i], before.sha256[i]),
            )
            for i, path in enumerate(before.files)
        ]

    def collect(self, part: int, call: int, generated: Generated) -> Generated | None:
        """Take one result of the running stage; the whole stage's images once every part has come."""
        self.parts[part] = (call, generated)
        expected = len(self.done[-1].files) if self.done else 1
        if len(self.parts) < expected:
            return None
        results = [self.parts[i] for i in sorted(self.parts)]
        self.parts = {}
        calls = {call: made for call, made in results}  # parts of one call share its timings: count them once
        first = results[0][1]
        return Generated(
            [image for _, made in results for image in made.images],
            [seed for _, made in results for seed in made.seeds],
            first.scheduler,
            load_s=sum(made.load_s for made in calls.values()),
            generate_s=sum(made.generate_s for made in calls.values()),
            device=first.device,
            dtype=first.dtype,
            model=first.model,
            memory=first.memory,
            batch_size=first.batch_size,
            prediction=first.prediction,
            prompt_encoding=first.prompt_encoding,
            loras=first.loras,
            embeddings=first.embeddings,
            controls=first.controls,
        )

    def keep(self, claim_folder: Path, generated: Generated, attempt: int) -> EarlierStage:
        """Write the finished stage's images, then its record (last: the stage is complete), and go on."""
        number = self.running
        folder = stage_folder(claim_folder, self.job.job_id, number)
        shutil.rmtree(folder, ignore_errors=True)  # an incomplete earlier try
        folder.mkdir(parents=True)
        files: list[Path] = []
        digests: list[str] = []
        for n, image in enumerate(generated.images, start=1):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", compress_level=1)  # lossless and quick: read once more, then deleted
            data = buffer.getvalue()
            atomic_write(folder / f"{n}.png", data, durable=False)
            files.append(folder / f"{n}.png")
            digests.append(hashlib.sha256(data).hexdigest())
        stage = EarlierStage(
            number,
            self.specs[number - 1],
            generated,
            tuple(files),
            tuple(digests),
            tuple(image.size for image in generated.images),
            attempt,
            time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        atomic_write(folder / STAGE_RECORD, json.dumps(_record(stage), indent=1).encode(), durable=False)
        self.done.append(stage)
        return stage


def stage_folder(claim_folder: Path, job_id: str, number: int) -> Path:
    return claim_folder / CHAIN / job_id / str(number)


def resume(claim_folder: Path, job: Job) -> Chain:
    """The job's chain with the stages an earlier run of the claim finished (none for a new claim)."""
    chain = Chain(job)
    for number in range(1, chain.stages):  # the last stage's images are the job's outputs, never kept here
        folder = stage_folder(claim_folder, job.job_id, number)
        record = read_json_object(folder / STAGE_RECORD)
        stage = _from_record(record, chain.specs[number - 1], folder) if record is not None else None
        if stage is None:
            break
        chain.done.append(stage)
    return chain


def discard(claim_folder: Path, job_id: str) -> None:
    """Remove a published job's kept stages."""
    shutil.rmtree(claim_folder / CHAIN / job_id, ignore_errors=True)


def _relative(path: Path, claim_folder: Path) -> str:
    """An intermediate image's name in messages: its path in the claim folder."""
    return path.relative_to(claim_folder).as_posix()


def _record(stage: EarlierStage) -> dict[str, Any]:
    made = stage.generated
    return {
        "stage": stage.number,
        "files": [path.name for path in stage.files],
        "sha256": list(stage.sha256),
        "sizes": [list(size) for size in stage.sizes],
        "seeds": list(made.seeds),
        "scheduler": made.scheduler,
        "load_s": made.load_s,
        "generate_s": made.generate_s,
        "device": made.device,
        "dtype": made.dtype,
        "model": made.model.record() if made.model else None,
        "memory": made.memory,
        "batch_size": made.batch_size,
        "prediction": made.prediction,
        "prompt_encoding": made.prompt_encoding,
        "loras": made.loras,
        "embeddings": made.embeddings,
        "controls": made.controls,
        "attempt": stage.attempt,
        "finished_at": stage.finished_at,
    }


def _from_record(record: dict[str, Any], spec: Spec, folder: Path) -> EarlierStage | None:
    """A kept stage read back; None when its record or an image is missing or unreadable (it runs again)."""
    try:
        files = tuple(folder / str(name) for name in record["files"])
        if not files or not all(path.is_file() for path in files):
            return None
        model = record["model"]
        made = Generated(
            [],
            [int(seed) for seed in record["seeds"]],
            str(record["scheduler"]),
            load_s=float(record["load_s"]),
            generate_s=float(record["generate_s"]),
            device=str(record["device"]),
            dtype=str(record["dtype"]),
            model=ModelInfo(**model) if model else None,
            memory=record["memory"],
            batch_size=int(record["batch_size"]),
            prediction=record["prediction"],
            prompt_encoding=record.get("prompt_encoding"),
            loras=record.get("loras"),
            embeddings=record.get("embeddings"),
            controls=record.get("controls"),
        )
        sizes = tuple((int(w), int(h)) for w, h in record["sizes"])
        return EarlierStage(
            int(record["stage"]),
            spec,
            made,
            files,
            tuple(str(d) for d in record["sha256"]),
            sizes,
            int(record["attempt"]),
            str(record["finished_at"]),
        )
    except (KeyError, TypeError, ValueError):
        return None
