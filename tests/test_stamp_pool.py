"""The stamp pool (`stamp_threads:`): images stamped at once come out byte for byte as one worker makes
them, in the same order, and a kill -9 mid-publish still leaves the manifest last."""

from __future__ import annotations

import threading

from diffusiond.pipeline.backend import Generated
from diffusiond.pipeline.job import Job, Txt2ImgJob
from diffusiond.pipeline.metadata import MetadataOptions
from diffusiond.pipeline.provenance import Marks, StampPolicy, stamp_job
from diffusiond.pipeline.watermark import InvisibleMark, VisibleMark
from tests.conftest import Spool, write_config
from tests.spool_checks import check_spool
from tests.test_fault_points import kill_after_the_first_published_image, restart_to_the_manifest
from tests.test_watermark import detailed_image


def test_a_pool_writes_the_same_files_in_the_same_order_as_one_worker() -> None:
    spec = Txt2ImgJob(prompt="a pooled stamp", size=(384, 384), count=4, seed=10)
    job = Job("pool-1", "pool.yaml", 1, spec)
    images = [detailed_image(384, seed=20 + n) for n in range(4)]
    generated = Generated(images, [10, 11, 12, 13], "PNDMScheduler", 0.0, 0.0, "cpu", "float32")
    marks = Marks(VisibleMark(text="AI generated"), InvisibleMark())
    options = MetadataOptions(sidecar="txt")

    one = stamp_job(job, generated, StampPolicy(marks, options, workers=1))
    pooled = stamp_job(job, generated, StampPolicy(marks, options, workers=3))
    assert any(t.name.startswith("stamp") for t in threading.enumerate()), "the pool ran"
    assert [name for name, _ in pooled.files] == [name for name, _ in one.files]
    assert [name for name, _ in one.files][:2] == ["pool-1-1.png", "pool-1-1.txt"]
    assert pooled.files == one.files, "same bytes"
    assert pooled.outputs == one.outputs
    assert all(o.watermark["invisible"]["verified"] for o in pooled.outputs)
    assert len({o.watermark["invisible"]["mark_id"] for o in pooled.outputs}) == 4, "one mark id per image"


def test_a_kill_during_a_pooled_publish_leaves_the_manifest_last_and_the_restart_finishes(
    spool: Spool, test_models
) -> None:
    """Real diffusers, 3 stamp threads: killed after the first image reached the outbox, there is no
    manifest; the restart publishes the rest of the same staged files, then the manifest."""
    write_config(spool.root, test_models, stamp_threads=3)
    job = b"prompt: pooled\nseed: 4\ncount: 3\nsize: 256x256\nsteps: 2\n"
    spool.drop("pooled.yaml", job.decode())
    first, seen = kill_after_the_first_published_image(spool)  # no manifest before every image
    manifest = restart_to_the_manifest(spool)
    assert manifest["seeds"] == [4, 5, 6] and manifest["attempt"] == 1
    assert first.read_bytes() == seen
    assert all(o["watermark"]["invisible"]["verified"] for o in manifest["outputs"])
    check_spool(spool, {"pooled.yaml": job}, jobs=1)
