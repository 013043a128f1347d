"""Prometheus metrics of one daemon, written to `<state>/metrics.prom` for `diffusiond web` to serve.

The daemon binds no port (it only watches folders): it keeps its metrics in this module's
registry and writes them in the text format every `WRITE_EVERY_S` (and when it stops), the
way node_exporter's textfile collector reads them. `diffusiond web` serves every daemon's file
of the spool at `/metrics`, each sample labelled with its `daemon` (instance).

One daemon per process, so the metrics are module-level, as prometheus-client has them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, write_to_textfile
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from diffusiond.daemon.manifest import Manifest

log = logging.getLogger(__name__)
FILE = "metrics.prom"
WRITE_EVERY_S = 5.0
REGISTRY = CollectorRegistry(auto_describe=True)
_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

JOBS = Counter(
    "diffusiond_jobs",
    "Jobs ended, by task and outcome (done, failed, rejected, cancelled)",
    ["task", "outcome"],
    registry=REGISTRY,
)
IMAGES = Counter("diffusiond_images", "Images published", registry=REGISTRY)
QUEUE = Gauge("diffusiond_queue_length", "Claims waiting for the worker", registry=REGISTRY)
INBOX = Gauge("diffusiond_inbox_waiting", "Files in the inbox not claimed yet", registry=REGISTRY)
JOB_SECONDS = Histogram(
    "diffusiond_job_seconds",
    "A job's time from its start to its publishing",
    ["task"],
    buckets=_SECONDS,
    registry=REGISTRY,
)
STEP_SECONDS = Histogram(
    "diffusiond_step_seconds",
    "Time between two denoising steps",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
    registry=REGISTRY,
)
MODEL_LOADS = Counter("diffusiond_model_loads", "Models loaded (not found warm)", ["model"], registry=REGISTRY)
MODEL_LOAD_SECONDS = Histogram(
    "diffusiond_model_load_seconds", "Time to load a model", buckets=_SECONDS, registry=REGISTRY
)
STAMP_SECONDS = Histogram(
    "diffusiond_stamp_seconds",
    "Time to stamp a job's images (marks, metadata, encode, verify)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    registry=REGISTRY,
)
VERIFY_FAILURES = Counter(
    "diffusiond_watermark_verify_failures",
    "Images whose invisible mark was embedded but not read back",
    registry=REGISTRY,
)
GPU_MEMORY = Gauge(
    "diffusiond_gpu_memory_bytes", "GPU memory torch holds (allocated), on a CUDA device", registry=REGISTRY
)


def published(task: str, manifest: Manifest, seconds: float) -> None:
    """A job's manifest is published: count it, its images, and what its timings and marks say."""
    JOBS.labels(task=task, outcome="done").inc()
    JOB_SECONDS.labels(task=task).observe(seconds)
    IMAGES.inc(len(manifest.outputs))
    timings = manifest.timings
    if float(timings.get("load_s") or 0) > 0:
        MODEL_LOADS.labels(model=str((manifest.model or {}).get("name"))).inc()
        MODEL_LOAD_SECONDS.observe(float(timings["load_s"]))
    if "stamp_s" in timings:
        STAMP_SECONDS.observe(float(timings["stamp_s"]))
    for output in manifest.outputs:
        mark = output.watermark.get("invisible") or {}
        if mark.get("embedded") and not mark.get("verified"):
            VERIFY_FAILURES.inc()


def ended(outcome: str, tasks: Iterable[str]) -> None:
    """A claim failed, was rejected or cancelled: each of its jobs counts (`unknown` before it was read)."""
    for task in list(tasks) or ["unknown"]:
        JOBS.labels(task=task, outcome=outcome).inc()


def gpu_memory(device: str) -> None:
    """Record torch's GPU memory after a batch (a no-op off CUDA)."""
    if not device.startswith("cuda"):
        return
    try:
        import torch

        GPU_MEMORY.set(torch.cuda.memory_allocated(torch.device(device)))
    except Exception:  # metrics never fail a job
        log.debug("cannot read GPU memory", exc_info=True)


def write(state_dir: Path) -> None:
    """The text format into `<state>/metrics.prom`, atomically (prometheus-client writes a temp file, renames)."""
    try:
        write_to_textfile(str(state_dir / FILE), REGISTRY)
    except OSError as exc:
        log.debug("cannot write %s: %s", state_dir / FILE, exc)


class SpoolMetrics:
    """A collector for `diffusiond web`: every daemon's metrics.prom, each sample labelled `daemon`."""

    def __init__(self, files: Callable[[], list[tuple[str, Path]]]) -> None:
        self.files = files

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for daemon, path in self.files():
            try:
                text = path.read_text(encoding="utf-8")
            except OSError:
                continue
            for family in text_string_to_metric_families(text):
                into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for sample in family.samples:
                    into.samples.append(sample._replace(labels={**sample.labels, "daemon": daemon}))
        yield from merged.values()
