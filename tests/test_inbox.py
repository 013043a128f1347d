"""Watching the inbox: which files count, when a file is finished, and what gets claimed together."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from diffusiond.daemon.claim import claim, load_jobs
from diffusiond.daemon.inbox import SettleTracker, is_candidate
from diffusiond.daemon.pairing import Intent, Pairing, file_stamp, job_file_reader
from diffusiond.pipeline.errors import JobFailed
from diffusiond.pipeline.families import ModelKind
from diffusiond.pipeline.job import Rules
from tests.conftest import Spool, make_daemon_folders

# --- is_candidate ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "job.yaml",
        "job.yml",
        "sketch.png",
        "photo.jpg",
        "photo.jpeg",
        "pic.webp",
        "JOB.YAML",
        "Job.Yml",
        "SKETCH.PNG",
        "photo.JpEg",
        "pic.WEBP",
        "sketches/cat.png",
        "sketches/cat.yaml",
        "Hot Folder/IMG_0001.JPG",
    ],
)
def test_job_files_and_images_in_the_root_and_one_hot_folder_are_candidates(name: str) -> None:
    assert is_candidate(Path(name))


@pytest.mark.parametrize(
    "name",
    [
        ".job.yaml",  # dotfile (rsync's temp names, AppleDouble)
        "._sketch.png",
        "sketches/.cat.png",
        "job.yaml.part",
        "sketch.png.part",
        "job.yaml.tmp",
        "sketch.png.crdownload",
        "~syncthing~x.tmp",
        "~syncthing~sketch.png.tmp",
        ".syncthing.x.tmp",
        ".syncthing.sketch.png.tmp",
        ".DS_Store",
        "Thumbs.db",
        "sketches/Thumbs.db",
        "notes.txt",
        "job.json",
        "a/b/c.png",  # two folders deep: a user's own subfolder
        "a/b/c.yaml",
        ".hidden/cat.png",  # in a dot-folder
        ".stversions/job.yaml",
    ],
)
def test_temporary_hidden_foreign_and_deep_files_are_not_candidates(name: str) -> None:
    assert not is_candidate(Path(name))


# --- SettleTracker -----------------------------------------------------------------------------

SETTLE_S = 5.0


def write(path: Path, data: bytes = b"prompt: a\n") -> Path:
    path.write_bytes(data)
    return path


def move_mtime(path: Path, seconds: float) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + int(seconds * 1e9)))


def test_a_renamed_file_is_stable_at_once(tmp_path: Path) -> None:
    path = write(tmp_path / "job.yaml")
    tracker = SettleTracker(SETTLE_S)
    tracker.touch(path, renamed=True, now=100.0)
    assert tracker.stable(now=100.0) == [path]


def test_a_file_written_in_place_is_stable_only_after_settle_time(tmp_path: Path) -> None:
    path = write(tmp_path / "scan.png")
    tracker = SettleTracker(SETTLE_S)
    tracker.touch(path, now=100.0)
    assert tracker.stable(now=100.0) == []
    assert tracker.stable(now=104.0) == []
    assert list(tracker) == [path]
    assert tracker.stable(now=105.5) == [path]


def test_a_change_seen_by_stable_restarts_the_clock(tmp_path: Path) -> None:
    path = write(tmp_path / "scan.png")
    tracker = SettleTracker(SETTLE_S)
    tracker.touch(path, now=100.0)
    with path.open("ab") as f:
        f.write(b"more bytes")
    move_mtime(path, 1)
    assert tracker.stable(now=103.0) == []  # sees the change: quiet since 103 now
    assert tracker.stable(now=106.0) == []  # would have been stable without the change
    assert tracker.stable(now=107.9) == []
    assert tracker.stable(now=108.0) == [path]


def test_a_change_seen_by_touch_restarts_the_clock(tmp_path: Path) -> None:
    path = write(tmp_path / "job.yaml")
    tracker = SettleTracker(SETTLE_S)
    tracker.touch(path, now=100.0)
    with path.open("ab") as f:
        f.write(b"steps: 4\n")
    move_mtime(path, 1)
    tracker.touch(path, now=104.0)
    assert tracker.stable(now=106.0) == []
    assert tracker.stable(now=109.0) == [path]


def test_a_same_size_rewrite_with_a_new_mtime_restarts_the_clock(tmp_path: Path) -> None:
    path = write(tmp_path / "job.yaml", b"steps: 4\n")
    tracker = SettleTracker(SETTLE_S)
    tracker.touch(path, renamed=True, now=100.0)
    write(path, b"steps: 8\n")
    move_mtime(path, 2)
    assert tracker.stable(now=101.0) == []
    assert tracker.stable(now=105.0) == []
    assert tracker.stable(now=106.0) == [path]


def test_an_event_without_a_change_does_not_restart_the_clock(tmp_path: Path) -> None:
    path = write(tmp_path / "scan.png")
    tracker = SettleTracker(SETTLE_S)
    tracker.touch(path, now=100.0)
    tracker.touch(path, now=104.0)  # e.g. a close event, same size and mtime
    assert tracker.stable(now=105.5) == [path]


def test_a_file_found_by_scan_counts_as_quiet_since_its_mtime(tmp_path: Path) -> None:
    old = write(tmp_path / "old.yaml")
    move_mtime(old, -60)
    recent = write(tmp_path / "recent.yaml")
    move_mtime(recent, -2)
    tracker = SettleTracker(SETTLE_S)
    tracker.touch(old, now=100.0)
    tracker.touch(recent, now=100.0)
    assert tracker.stable(now=100.0) == [old]  # left from before a restart: no delay
    assert tracker.stable(now=102.0) == [old]
    assert tracker.stable(now=103.5) == [old, recent]  # oldest first


def test_a_deleted_file_disappears_from_pending(tmp_path: Path) -> None:
    kept = write(tmp_path / "kept.yaml")
    gone = write(tmp_path / "gone.yaml")
    tracker = SettleTracker(SETTLE_S)
    tracker.touch(kept, renamed=True, now=100.0)
    tracker.touch(gone, renamed=True, now=100.0)
    gone.unlink()
    assert tracker.stable(now=100.0) == [kept]
    assert list(tracker) == [kept]


def test_touching_a_deleted_file_forgets_it(tmp_path: Path) -> None:
    path = write(tmp_path / "job.yaml")
    tracker = SettleTracker(SETTLE_S)
    tracker.touch(path, now=100.0)
    path.unlink()
    tracker.touch(path, now=101.0)  # the delete event
    assert list(tracker) == []


def test_forget_drops_a_claimed_file(tmp_path: Path) -> None:
    path = write(tmp_path / "job.yaml")
    tracker = SettleTracker(SETTLE_S)
    tracker.touch(path, renamed=True, now=100.0)
    tracker.forget(path)
    assert list(tracker) == []
    assert tracker.stable(now=200.0) == []


def test_the_real_clock_is_used_without_now(tmp_path: Path) -> None:
    path = write(tmp_path / "job.yaml")
    tracker = SettleTracker(0.05)
    tracker.touch(path, renamed=True)
    assert tracker.stable() == [path]


# --- Pairing -----------------------------------------------------------------------------------

PAIR_WAIT_S = 2.0
RULES = Rules(models={"test": ModelKind.SD1}, defaults={"all": {"model": "test", "size": "64x64", "steps": 4}})
PROFILES = {"sketches": {"task": "img2img", "prompt": "a watercolor", "strength": 0.75}}


class Inbox:
    """A real inbox folder and a Pairing reading from it."""

    def __init__(self, root: Path, *, has_sketch_job: bool = False) -> None:
        self.root = root
        self.pairing = Pairing(
            parse=job_file_reader(root, rules=RULES, profiles=PROFILES),
            profiles=PROFILES,
            has_sketch_job=has_sketch_job,
            pair_wait_s=PAIR_WAIT_S,
        )

    def drop(self, relative: str, data: str | bytes = b"\x89PNG not decoded here") -> str:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return relative

    def decide(
        self, stable: list[str], now: float, present: list[str] | None = None, limit: int | None = None
    ) -> list[Intent]:
        present = stable if present is None else present
        return self.pairing.decide(
            stable, present, now, stamp=lambda rel: (self.root / rel).stat().st_mtime_ns, limit=limit
        )


@pytest.fixture
def inbox(tmp_path: Path) -> Inbox:
    return Inbox(tmp_path)


def test_a_job_file_waits_for_its_image_then_fails_with_missing_input(inbox: Inbox) -> None:
    job = inbox.drop("hamster.yaml", "task: img2img\nprompt: a hamster\n")
    assert inbox.decide([job], now=10.0) == []
    assert inbox.decide([job], now=10.0 + PAIR_WAIT_S - 0.1) == []
    [intent] = inbox.decide([job], now=10.0 + PAIR_WAIT_S)
    assert intent.source == job and intent.files == (job,)
    assert not intent.bare_image
    assert intent.problem is not None
    assert intent.problem["code"] == "missing_input"
    assert intent.problem["file"] == job
    assert intent.problem["field"] == "image"
    assert intent.problem["fix"]


def test_a_named_image_that_never_comes_is_named_in_the_problem(inbox: Inbox) -> None:
    job = inbox.drop("hamster.yaml", "task: img2img\nimage: bird.png\n")
    assert inbox.decide([job], now=0.0) == []
    [intent] = inbox.decide([job], now=PAIR_WAIT_S)
    assert intent.problem is not None and intent.problem["value"] == "bird.png"
    assert "bird.png" in intent.problem["error"]


def test_job_file_and_image_stable_together_are_one_intent(inbox: Inbox) -> None:
    job = inbox.drop("hamster.yaml", "task: img2img\nprompt: a hamster\n")
    image = inbox.drop("hamster.png")
    assert inbox.decide([job, image], now=0.0) == [Intent(job, (job, image))]
    # Still one intent later: the image is the job's input, never a bare image of its own.
    assert inbox.decide([image, job], now=PAIR_WAIT_S * 3) == [Intent(job, (job, image))]


def test_a_job_file_waits_while_its_image_is_still_being_written(inbox: Inbox) -> None:
    job = inbox.drop("hamster.yaml", "task: img2img\nprompt: a hamster\n")
    image = inbox.drop("hamster.png")
    assert inbox.decide([job], now=0.0, present=[job, image]) == []
    assert inbox.decide([job, image], now=1.0) == [Intent(job, (job, image))]


def test_an_image_arriving_first_waits_for_its_job_file(inbox: Inbox) -> None:
    image = inbox.drop("hamster.png")
    assert inbox.decide([image], now=0.0) == []
    job = inbox.drop("hamster.yaml", "task: img2img\nprompt: a hamster\n")
    # The job file is there but still settling: the image is not taken as bare.
    assert inbox.decide([image], now=PAIR_WAIT_S + 1, present=[image, job]) == []
    assert inbox.decide([image, job], now=PAIR_WAIT_S + 2) == [Intent(job, (job, image))]


def test_a_bare_image_in_a_profile_folder_takes_the_profile_after_the_wait(inbox: Inbox) -> None:
    image = inbox.drop("sketches/cat.png")
    assert inbox.decide([image], now=0.0) == []
    assert inbox.decide([image], now=PAIR_WAIT_S - 0.1) == []
    assert inbox.decide([image], now=PAIR_WAIT_S) == [Intent(image, (image,), bare_image=True, problem=None)]


def test_a_bare_image_at_the_root_without_a_sketch_job_has_no_job(inbox: Inbox) -> None:
    image = inbox.drop("cat.png")
    assert inbox.decide([image], now=0.0) == []
    [intent] = inbox.decide([image], now=PAIR_WAIT_S)
    assert intent.source == image and intent.files == (image,) and intent.bare_image
    assert intent.problem is not None
    assert intent.problem["code"] == "no_job_for_image"
    assert intent.problem["file"] == image
    assert "cat.yaml" in intent.problem["fix"]


def test_a_bare_image_at_the_root_with_a_sketch_job_has_no_problem(tmp_path: Path) -> None:
    inbox = Inbox(tmp_path, has_sketch_job=True)
    image = inbox.drop("cat.png")
    assert inbox.decide([image], now=0.0) == []
    assert inbox.decide([image], now=PAIR_WAIT_S) == [Intent(image, (image,), bare_image=True)]


def test_a_bare_image_in_a_folder_without_a_profile_names_the_folder(inbox: Inbox) -> None:
    image = inbox.drop("misc/cat.png")
    assert inbox.decide([image], now=0.0) == []
    [intent] = inbox.decide([image], now=PAIR_WAIT_S)
    assert intent.problem is not None and intent.problem["code"] == "no_job_for_image"
    assert "misc" in intent.problem["error"] and "misc" in intent.problem["fix"]


def test_an_image_named_by_another_job_file_is_not_claimed_as_bare(inbox: Inbox) -> None:
    job = inbox.drop("hamster.yaml", "task: img2img\nimage: bird.png\nprompt: a bird\n")
    image = inbox.drop("bird.png")
    later = PAIR_WAIT_S * 3
    assert inbox.decide([job, image], now=0.0) == [Intent(job, (job, image))]
    assert inbox.decide([image, job], now=later) == [Intent(job, (job, image))]


def test_a_txt2img_job_file_is_claimed_at_once(inbox: Inbox) -> None:
    job = inbox.drop("fox.yaml", "prompt: a fox\n")
    assert inbox.decide([job], now=0.0) == [Intent(job, (job,))]


def test_a_job_file_in_a_profile_folder_takes_the_profile_and_its_sketch(inbox: Inbox) -> None:
    job = inbox.drop("sketches/cat.yaml", "prompt: a cat\n")  # the profile makes it img2img
    image = inbox.drop("sketches/cat.png")
    assert inbox.decide([job], now=0.0, present=[job, image]) == []
    assert inbox.decide([job, image], now=0.0) == [Intent(job, (job, image))]


@pytest.mark.parametrize("text", ["prompt: [unclosed\n", "steps: 0\n", "- a list\n", "upscale: 2\n"])
def test_a_wrong_job_file_is_claimed_at_once_so_it_reaches_failed(inbox: Inbox, text: str) -> None:
    job = inbox.drop("bad.yaml", text)
    assert inbox.decide([job], now=0.0) == [Intent(job, (job,))]


def test_an_edited_job_file_is_parsed_again(inbox: Inbox) -> None:
    job = inbox.drop("hamster.yaml", "task: img2img\nprompt: a hamster\n")
    assert inbox.decide([job], now=0.0) == []
    inbox.drop("hamster.yaml", "prompt: now txt2img, needs no image\n")
    path = inbox.root / job
    os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns + 1_000_000_000))
    assert inbox.decide([job], now=0.5) == [Intent(job, (job,))]


@pytest.mark.parametrize("edit", ["rewritten", "replaced with the same size and time"])
def test_a_job_file_changed_after_pairing_runs_as_claimed(spool: Spool, edit: str) -> None:
    """The claim takes pairing's validation only for the very file it read; else the claimed copy is read."""
    config = spool.config
    pairing = Pairing(
        parse=job_file_reader(config.inbox, rules=config.rules(), profiles=config.profiles),
        profiles=config.profiles,
        has_sketch_job=False,
        pair_wait_s=PAIR_WAIT_S,
    )
    path = spool.drop("fox.yaml", "prompt: a fox\nseed: 1\n")
    [intent] = pairing.decide(["fox.yaml"], ["fox.yaml"], 0.0, stamp=lambda rel: file_stamp(config.inbox / rel))
    assert intent.parsed is not None and intent.parsed.result()[0].prompt == "a fox"
    if edit == "rewritten":
        path.write_text("prompt: a red fox in the snow\nseed: 2\n")
        expected = ("a red fox in the snow", 2)
    else:  # an editor's atomic save within the same clock tick: only the inode tells
        mtime_ns = path.stat().st_mtime_ns
        spool.drop("fox.yaml", "prompt: a cat\nseed: 3\n")
        os.utime(path, ns=(mtime_ns, mtime_ns))
        expected = ("a cat", 3)
    make_daemon_folders(config)
    claimed = claim(intent, config)
    assert claimed is not None
    [job] = load_jobs(claimed, config, parsed=intent.parsed)
    assert (job.spec.prompt, job.spec.seed) == expected


def test_a_rename_event_after_a_scan_still_makes_the_file_stable_at_once(tmp_path: Path) -> None:
    """The startup scan can see a dropped file before its rename event is read."""
    path = write(tmp_path / "poster.png")
    tracker = SettleTracker(SETTLE_S)
    tracker.touch(path, now=100.0)  # the scan: the mtime is fresh, so not quiet yet
    assert tracker.stable(now=100.0) == []
    tracker.touch(path, renamed=True, now=100.0)  # then the rename event for the same file
    assert tracker.stable(now=100.0) == [path]


def test_a_txt2img_job_file_waits_for_its_unsettled_sketch_then_goes_without_it(inbox: Inbox) -> None:
    job = inbox.drop("poster.yaml", "prompt: text only\n")
    image = inbox.drop("poster.png")
    assert inbox.decide([job], now=0.0, present=[job, image]) == [], "the sketch is still being written"
    assert inbox.decide([job, image], now=0.5) == [Intent(job, (job, image))]
    # A sketch that never settles does not hold a job that does not need it for ever.
    other = inbox.drop("other.yaml", "prompt: text only\n")
    stuck = inbox.drop("other.png")
    assert inbox.decide([other], now=10.0, present=[other, stuck]) == []
    [intent] = inbox.decide([other], now=10.0 + PAIR_WAIT_S, present=[other, stuck])
    assert intent == Intent(other, (other,))


def test_a_window_of_stable_files_is_the_oldest_ones(tmp_path: Path) -> None:
    tracker = SettleTracker(settle_s=1.0)
    paths = []
    for i in range(1000):
        path = tmp_path / f"job{i:04d}.yaml"
        path.write_text("prompt: x\n")
        tracker.touch(path, renamed=True, now=100.0 + i / 1000)
        paths.append(path)
    assert tracker.stable(now=200.0, limit=10) == paths[:10]
    paths[3].unlink()
    assert tracker.stable(now=200.0, limit=10) == paths[:3] + paths[4:11]
    assert len(tracker.stable(now=200.0)) == 999


def test_a_limited_round_never_takes_a_later_jobs_image_for_a_bare_one(inbox: Inbox) -> None:
    first = inbox.drop("first.yaml", "prompt: one\n")
    second = inbox.drop("second.yaml", "task: img2img\nimage: bird.png\nprompt: two\n")
    bird = inbox.drop("bird.png")
    stable = [first, second, bird]
    assert inbox.decide(stable, now=0.0, limit=1) == [Intent(first, (first,))]
    later = PAIR_WAIT_S * 3  # long past pair_wait_s: bird.png is still second.yaml's image, not a bare one
    assert inbox.decide(stable, now=later, limit=1) == [Intent(first, (first,))]
    assert inbox.decide([second, bird], now=later, limit=1) == [Intent(second, (second, bird))]


def test_a_bug_in_reading_a_job_file_fails_that_file_not_the_daemon(tmp_path: Path) -> None:
    """Pairing runs on the main loop: whatever the reader raises becomes the file's error (then failed/)."""

    def broken(relative: str) -> list:
        raise RuntimeError(f"a bug reading {relative}")

    pairing = Pairing(parse=broken, profiles={}, has_sketch_job=False, pair_wait_s=PAIR_WAIT_S)
    job = "odd.yaml"
    (tmp_path / job).write_text("prompt: x\n")
    [intent] = pairing.decide([job], [job], 0.0, stamp=lambda rel: (tmp_path / rel).stat().st_mtime_ns)
    assert intent.files == (job,) and intent.parsed is not None
    with pytest.raises(JobFailed, match=r"internal error: RuntimeError: a bug reading odd\.yaml") as info:
        intent.parsed.result()
    assert info.value.path == job and "diffusiond bug" in info.value.fix
