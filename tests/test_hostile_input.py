"""Hostile and broken input, through a real daemon on the stand-in generator.

Whatever lands in the inbox ends one of two ways: in failed/ with a report that names the file
and the reason, or left alone by a rule README.md documents (then it is not touched at all).
Either way the daemon goes on, and the next good job is done (`after`). Each test checks what a
user checks: where the file went, the report's `code`, `file`, `error` and `fix`.

Pipes named like a job file or an image are in tests/test_lifecycle.py; the file-size and
latin-1 cases there too.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import stat
import struct
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from diffusiond.daemon.claim import claim, load_jobs
from diffusiond.daemon.inbox import SettleTracker
from diffusiond.daemon.lifecycle import Ending, end_claim
from diffusiond.daemon.pairing import Pairing, file_stamp
from diffusiond.daemon.service import Daemon
from diffusiond.daemon.status import StatusBoard
from diffusiond.pipeline.errors import JobRejected
from tests.conftest import Spool, make_daemon_folders, wait_for
from tests.test_end_to_end import sketch_png
from tests.test_lifecycle import after

IMG2IMG = "task: img2img\nprompt: x\nimage: {image}\n"


def report_on(spool: Spool, file: str) -> dict[str, Any]:
    """The report whose `file` is `file` (every report in failed/ must load as YAML)."""
    return wait_for(
        lambda: next((r for r in spool.reports() if r.get("file") == file), None), what=f"the report on {file!r}"
    )


def in_failed(spool: Spool, name: str) -> bool:
    return os.path.lexists(spool.failed / name)


def untouched(spool: Spool) -> None:
    """The daemon still runs, and wrote no report about anything (what was dropped was left alone)."""
    after(spool)
    assert spool.reports() == []


# Non-regular files --------------------------------------------------------------------------


@contextlib.contextmanager
def unix_socket(target: Path) -> Iterator[None]:
    """A live unix socket at `target`: bound under a short name (paths of sockets are limited to 108
    bytes), then renamed into place as any careful tool drops a file."""
    with tempfile.TemporaryDirectory(dir="/tmp") as short, socket.socket(socket.AF_UNIX) as sock:
        sock.bind(os.path.join(short, "s"))
        os.rename(os.path.join(short, "s"), target)
        yield


def char_device(target: Path) -> None:
    """A character device like /dev/null (root only)."""
    null = os.stat("/dev/null").st_rdev
    try:
        os.mknod(target, stat.S_IFCHR | 0o600, os.makedev(os.major(null), os.minor(null)))
    except PermissionError:
        pytest.skip("making a device node needs root")


def test_a_unix_socket_named_like_a_job_file_lands_in_failed(spool: Spool, standin_daemon: Daemon) -> None:
    with unix_socket(spool.inbox / "sock.yaml"):
        report = report_on(spool, "sock.yaml")
        assert report["code"] == "not_a_job"
        assert report["error"] == "the job file is a socket, not a plain file"
        assert "plain job file" in report["fix"]
        assert stat.S_ISSOCK(os.lstat(spool.failed / "sock.yaml").st_mode)
        after(spool)


def test_a_device_named_like_a_job_file_lands_in_failed(spool: Spool, standin_daemon: Daemon) -> None:
    char_device(spool.inbox / "dev.yaml")
    report = report_on(spool, "dev.yaml")
    assert report["code"] == "not_a_job"
    assert report["error"] == "the job file is a character device, not a plain file"
    assert stat.S_ISCHR(os.lstat(spool.failed / "dev.yaml").st_mode)
    after(spool)


@pytest.mark.parametrize("kind", ["socket", "device"])
def test_a_socket_or_device_named_like_an_image_is_a_bad_image(spool: Spool, standin_daemon: Daemon, kind: str) -> None:
    with contextlib.ExitStack() as stack:
        if kind == "socket":
            stack.enter_context(unix_socket(spool.inbox / "odd.png"))
        else:
            char_device(spool.inbox / "odd.png")
        spool.drop("odd.yaml", IMG2IMG.format(image="odd.png"))
        report = report_on(spool, "odd.yaml")
        assert (report["code"], report["field"], report["value"]) == ("bad_image", "image", "odd.png")
        described = "a socket" if kind == "socket" else "a character device"
        assert report["error"] == f"the image is {described}, not a plain file"
        assert in_failed(spool, "odd.png") and in_failed(spool, "odd.yaml")
        after(spool)


@pytest.mark.parametrize("name", ["dir.yaml", "dir.png"])
def test_an_empty_folder_named_like_a_job_or_image_is_left_alone(
    spool: Spool, standin_daemon: Daemon, name: str
) -> None:
    (spool.inbox / name).mkdir()
    untouched(spool)
    assert (spool.inbox / name).is_dir()


def test_a_folder_named_like_a_job_file_is_a_hot_folder_like_any_other(spool: Spool, standin_daemon: Daemon) -> None:
    """Documented: a folder is never a job or image, whatever its name; its files are a hot folder's."""
    spool.drop("dir.yaml/inner.yaml", "prompt: from inside a folder named dir.yaml\n")
    spool.drop("dir.png/bare.png", sketch_png())
    [manifest] = wait_for(spool.manifests, what="the inner job")
    assert manifest["source"] == "dir.yaml/inner.yaml"
    report = report_on(spool, "dir.png/bare.png")
    assert report["code"] == "no_job_for_image" and "hot folder 'dir.png' has no profile" in report["error"]
    assert (spool.inbox / "dir.yaml").is_dir() and (spool.inbox / "dir.png").is_dir()
    after(spool)


def test_a_job_whose_image_is_a_folder_fails_at_once(spool: Spool, standin_daemon: Daemon) -> None:
    (spool.inbox / "sketch.png").mkdir()
    spool.drop("paint.yaml", IMG2IMG.format(image="sketch.png"))
    report = report_on(spool, "paint.yaml")
    assert (report["code"], report["field"], report["value"]) == ("bad_image", "image", "sketch.png")
    assert report["error"] == "the image 'sketch.png' is a folder, not an image file"
    assert "plain image file" in report["fix"]
    assert (spool.inbox / "sketch.png").is_dir(), "the folder is not the daemon's to move"
    after(spool)


# Symbolic and hard links ----------------------------------------------------------------------


def test_a_symlinked_job_file_is_never_read_nor_moved(spool: Spool, standin_daemon: Daemon, tmp_path: Path) -> None:
    outside = tmp_path / "secret.yaml"
    outside.write_text("prompt: a job outside the inbox\n")
    os.symlink(outside, spool.inbox / "link.yaml")
    untouched(spool)
    assert (spool.inbox / "link.yaml").is_symlink()
    assert outside.read_text() == "prompt: a job outside the inbox\n"
    assert [m["source"] for m in spool.manifests()] == ["after.yaml"]


def test_a_symlinked_hot_folder_is_never_looked_into(spool: Spool, standin_daemon: Daemon, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "job.yaml").write_text("prompt: a job outside the inbox\n")
    os.symlink(outside, spool.inbox / "linked")
    untouched(spool)
    assert (outside / "job.yaml").exists() and (spool.inbox / "linked").is_symlink()


def test_a_job_whose_image_is_a_symlink_out_of_the_inbox_fails_and_the_link_stays(
    spool: Spool, standin_daemon: Daemon, tmp_path: Path
) -> None:
    outside = tmp_path / "private.png"
    outside.write_bytes(sketch_png())
    os.symlink(outside, spool.inbox / "link.png")
    spool.drop("paint.yaml", IMG2IMG.format(image="link.png"))
    report = report_on(spool, "paint.yaml")
    assert (report["code"], report["field"], report["value"]) == ("bad_image", "image", "link.png")
    assert report["error"] == "the image 'link.png' is a symbolic link, which the daemon does not follow"
    assert "not a link" in report["fix"]
    assert report["inputs"] == ["paint.yaml"]
    assert (spool.inbox / "link.png").is_symlink() and outside.read_bytes() == sketch_png()
    after(spool)


@pytest.mark.parametrize("image", ["../../etc/passwd.png", "/etc/passwd", "../outside.png", "hot/../../x.png"])
def test_an_image_path_out_of_the_inbox_is_refused(spool: Spool, standin_daemon: Daemon, image: str) -> None:
    spool.drop("escape.yaml", IMG2IMG.format(image=image))
    report = report_on(spool, "escape.yaml")
    assert (report["code"], report["field"], report["value"]) == ("path_escapes", "image", image)
    assert report["error"] == f"image path {image!r} leaves the inbox"
    assert "relative to the job file" in report["fix"]
    after(spool)


def test_a_hardlink_of_a_file_outside_runs_once_and_leaves_the_outside_file_as_it_was(
    spool: Spool, standin_daemon: Daemon, tmp_path: Path
) -> None:
    """Documented: a hard link is a plain file. The daemon only renames inputs, never writes them,
    so the other name keeps its content; the link is claimed (renamed) once, like any file."""
    outside = tmp_path / "mine.yaml"
    outside.write_text("prompt: a linked job\n")
    before = os.stat(outside)
    os.link(outside, spool.inbox / "linked.yaml")
    [manifest] = wait_for(spool.manifests, what="the linked job")
    assert manifest["source"] == "linked.yaml"
    after(spool)
    assert [m["source"] for m in spool.manifests()].count("linked.yaml") == 1
    now = os.stat(outside)
    assert outside.read_text() == "prompt: a linked job\n"
    assert (now.st_mtime_ns, now.st_size, now.st_nlink) == (before.st_mtime_ns, before.st_size, 2)
    assert os.stat(spool.archive / "linked.yaml").st_ino == before.st_ino
    assert not os.path.lexists(spool.inbox / "linked.yaml")


# YAML -------------------------------------------------------------------------------------------


def laughs(levels: int = 9, mapping: bool = False) -> str:
    """Billion laughs: each level holds the previous one 9 times, so level 9 is 9**9 'lol's once expanded."""
    items = ["lol"] * 9
    parts = [f"&l0 [{', '.join(items)}]"]
    for level in range(1, levels):
        if mapping:
            parts.append(f"&l{level} {{{', '.join(f'k{i}: *l{level - 1}' for i in range(9))}}}")
        else:
            parts.append(f"&l{level} [{', '.join([f'*l{level - 1}'] * 9)}]")
    return "[" + ", ".join(parts) + "]"


@pytest.mark.parametrize(
    ("text", "code", "field", "says"),
    [
        (f"prompt: {laughs()}\n", "invalid_field", "prompt", "valid string"),
        (f"size: {laughs()}\n", "invalid_field", "size", "size must look like"),
        (f"prompt: x\nwatermark: {{visible: {{text: {laughs()}}}}}\n", "invalid_field", "watermark", "valid string"),
        (f"output: {laughs(mapping=True)}\n", "invalid_field", "output", "valid dictionary"),
        (f"{laughs()}\n", "not_a_job", None, "a job must be a mapping of fields, got list"),
    ],
    ids=["prompt", "size", "watermark", "output", "document"],
)
def test_a_billion_laughs_file_is_rejected_without_expanding_it(
    spool: Spool, standin_daemon: Daemon, text: str, code: str, field: str | None, says: str
) -> None:
    spool.drop("laughs.yaml", text)
    report = report_on(spool, "laughs.yaml")
    assert report["code"] == code and report.get("field", "").startswith(field or "")
    assert says in report["error"] and "..." in report["error"] and report["fix"]
    assert len(report["error"]) < 1_000 and len(repr(report.get("value"))) < 1_000, "the report shows it cut short"
    assert in_failed(spool, "laughs.yaml")
    after(spool)


@pytest.mark.parametrize(
    "text", ["prompt: " + "[" * 10_000, "prompt: " + "[" * 10_000 + "]" * 10_000, "- " * 10_000 + "x", "{a: " * 10_000]
)
def test_deeply_nested_yaml_is_a_syntax_error(spool: Spool, standin_daemon: Daemon, text: str) -> None:
    spool.drop("deep.yaml", text)
    report = report_on(spool, "deep.yaml")
    assert report["code"] == "yaml_syntax"
    assert report["error"].startswith("not valid YAML") and "nesting depth" in report["error"]
    assert "YAML syntax" in report["fix"]
    after(spool)


def test_nesting_within_the_parser_limit_still_gets_a_short_report(spool: Spool, standin_daemon: Daemon) -> None:
    spool.drop("nested.yaml", "prompt: " + "[" * 900 + "]" * 900 + "\n")
    report = report_on(spool, "nested.yaml")
    assert (report["code"], report["field"]) == ("invalid_field", "prompt")
    assert len(report["error"]) < 1_000 and isinstance(report["value"], str) and len(report["value"]) <= 200
    after(spool)


def test_a_job_file_over_the_default_size_limit_is_not_read_whole(spool: Spool, standin_daemon: Daemon) -> None:
    limit = spool.config.limits.max_file_bytes
    spool.drop("huge.yaml", b"prompt: " + b"x" * limit)
    report = report_on(spool, "huge.yaml")
    assert report["code"] == "over_limit"
    assert report["error"] == f"job file is {limit + 8} bytes, over the limit of {limit}"
    assert "split the file" in report["fix"] and "limits.max_file_bytes" in report["fix"]
    assert (spool.failed / "huge.yaml").stat().st_size == limit + 8
    after(spool)


@pytest.mark.parametrize(
    ("data", "code", "says"),
    [
        (b"", "not_a_job", "the job file is empty (0 bytes)"),
        (b"# only a comment\n---\n", "not_a_job", "the file holds no job"),
        (b"- a\n- b\n", "not_a_job", "a job must be a mapping of fields, got list ['a', 'b']"),
        (b"just a sentence\n", "not_a_job", "a job must be a mapping of fields, got str 'just a sentence'"),
        (b"42\n", "not_a_job", "a job must be a mapping of fields, got int 42"),
        (b"prompt: a\x00b\n", "yaml_syntax", "control characters are not allowed"),
        ("prompt: a fox\n".encode("utf-16"), "yaml_syntax", "not UTF-8 text"),
        (b"\xff\xfe\xfd", "yaml_syntax", "not UTF-8 text"),
    ],
    ids=["empty", "comment-only", "list", "string", "number", "nul", "utf-16", "binary"],
)
def test_a_file_that_is_no_job_gets_one_clear_report(
    spool: Spool, standin_daemon: Daemon, data: bytes, code: str, says: str
) -> None:
    spool.drop("odd.yaml", data)
    report = report_on(spool, "odd.yaml")
    assert report["code"] == code and says in report["error"] and report["fix"]
    assert (spool.failed / "odd.yaml").read_bytes() == data
    after(spool)


def test_a_utf8_file_with_a_byte_order_mark_runs(spool: Spool, standin_daemon: Daemon) -> None:
    """Windows Notepad starts UTF-8 files with a BOM."""
    spool.drop("bom.yaml", "\ufeffprompt: a fox\n".encode())
    [manifest] = wait_for(spool.manifests, what="the job")
    assert manifest["job"]["prompt"] == "a fox"


def test_200_jobs_in_one_file_are_within_the_limits_and_all_run(spool: Spool, standin_daemon: Daemon) -> None:
    """The config limits each job (steps, count, pixels) and the file's bytes, not its number of jobs."""
    spool.drop("many.yaml", "\n---\n".join(f"prompt: job {n}\nsteps: 1" for n in range(200)))
    manifests = wait_for(lambda: len(spool.manifests()) == 200 and spool.manifests(), what="200 manifests")
    assert sorted(m["index"] for m in manifests) == list(range(1, 201))
    after(spool)


def test_too_many_jobs_in_one_file_is_over_the_limit(spool: Spool, standin_daemon: Daemon) -> None:
    """Tiny documents could pack millions of jobs into the byte limit: the file is refused unread past the cap."""
    spool.drop("flood.yaml", "prompt: x\n---\n" * 100_000)
    report = report_on(spool, "flood.yaml")
    assert report["code"] == "over_limit"
    assert report["error"] == "the file holds more than 1000 jobs (YAML documents), the limit per job file"
    assert "split" in report["fix"]
    after(spool)


# Images -----------------------------------------------------------------------------------------


def png_declaring(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose header then says `width` x `height` (its CRC made right), as a bomb does."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data[12:29]  # type (4) + fields (13) after the 8-byte signature and the length
    assert ihdr[:4] == b"IHDR"
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def jpeg(size: tuple[int, int] = (64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "data", "code", "says"),
    [
        ("bomb.png", png_declaring(100_000, 100_000), "over_limit", "10000000000 pixels"),
        ("big.png", png_declaring(10_000, 10_000), "over_limit", "100000000 pixels"),
        ("cut.png", sketch_png()[:-40], "bad_image", "truncated"),
        ("cut.jpg", jpeg()[:200], "bad_image", "truncated"),
        ("text.png", b"this is not an image\n", "bad_image", "Pillow cannot identify 'text.png' as an image"),
        ("empty.png", b"", "bad_image", "the image is empty (0 bytes)"),
    ],
    ids=["100000x100000", "10000x10000", "truncated-png", "truncated-jpeg", "text", "empty"],
)
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's, at 10000x10000
def test_a_broken_or_hostile_image_fails_before_any_model_runs(
    spool: Spool, standin_daemon: Daemon, name: str, data: bytes, code: str, says: str
) -> None:
    spool.drop(name, data)
    spool.drop("paint.yaml", IMG2IMG.format(image=name))
    report = report_on(spool, "paint.yaml")
    assert (report["code"], report["field"], report["value"]) == (code, "image", name)
    assert says.lower() in report["error"].lower() and report["fix"]
    assert sorted(report["inputs"]) == sorted(["paint.yaml", name])
    assert (spool.failed / name).read_bytes() == data
    after(spool)


def test_a_png_named_jpg_is_read_for_what_it_is(spool: Spool, standin_daemon: Daemon) -> None:
    """Documented: an image is what its bytes say, whatever its extension (Pillow reads the content)."""
    spool.drop("photo.jpg", sketch_png())
    spool.drop("paint.yaml", IMG2IMG.format(image="photo.jpg"))
    [manifest] = wait_for(spool.manifests, what="the job")
    assert manifest["input_image"]["file"] == "photo.jpg"
    assert (spool.archive / "photo.jpg").read_bytes() == sketch_png()


# Names ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["new\nline.yaml", "bell\x01.yaml", "esc\x1b[31mred.yaml", "tab\there.yaml", "del\x7f.yaml"],
    ids=["newline", "x01", "escape", "tab", "del"],
)
def test_a_name_with_control_characters_fails_with_a_readable_report(
    spool: Spool, standin_daemon: Daemon, name: str
) -> None:
    spool.drop(name, "prompt: a fox\n")
    report = report_on(spool, name)
    assert report["code"] == "bad_name"
    assert report["error"].startswith("the file name holds a control character")
    assert "rename the file" in report["fix"]
    assert in_failed(spool, name) and spool.manifests() == []
    after(spool)


def drop_raw(spool: Spool, name: bytes, data: bytes) -> bytes:
    """Drop a file whose name is bytes (not UTF-8, or too long for `Spool.drop`'s temp name)."""
    inbox = os.fsencode(spool.inbox)
    with open(inbox + b"/.drop.part", "wb") as handle:
        handle.write(data)
    os.rename(inbox + b"/.drop.part", inbox + b"/" + name)
    return inbox + b"/" + name


def test_a_name_that_is_not_utf8_lands_in_failed_with_a_readable_report(spool: Spool, standin_daemon: Daemon) -> None:
    """Through the running daemon: status, events, the claim's log and the report all take the name."""
    drop_raw(spool, b"caf\xe9.yaml", b"prompt: a cafe\n")
    name = os.fsdecode(b"caf\xe9.yaml")
    report = report_on(spool, name)
    assert report["code"] == "bad_name" and "not UTF-8" in report["error"]
    assert os.path.lexists(os.fsencode(spool.failed) + b"/caf\xe9.yaml")
    after(spool)


def test_a_name_that_is_not_utf8_fails_with_a_readable_report(spool: Spool) -> None:
    """Pairing, claim and rejection as the daemon runs them, past the inbox's filter."""
    config = spool.config
    drop_raw(spool, b"caf\xe9.yaml", b"prompt: a cafe\n")
    name = os.fsdecode(b"caf\xe9.yaml")
    pairing = Pairing.for_config(config)
    [intent] = pairing.decide([name], [name], 0.0, stamp=lambda rel: file_stamp(config.inbox / rel))
    make_daemon_folders(config)
    claimed = claim(intent, config)
    assert claimed is not None
    board = StatusBoard(config.state)
    board.claimed(claimed.claim_id, intent.source)  # what the daemon does next: this raises today
    with pytest.raises(JobRejected) as caught:
        load_jobs(claimed, config, parsed=intent.parsed)
    end_claim(claimed, Ending.REJECTED, config=config, board=board, error=caught.value)
    report = report_on(spool, name)
    assert report["code"] == "bad_name" and "not UTF-8" in report["error"]
    assert report["error"] == "the file name is not UTF-8 text (byte 0xe9 at position 4)"
    assert "rename the file" in report["fix"]
    assert os.path.lexists(os.fsencode(spool.failed) + b"/caf\xe9.yaml")


def test_a_name_of_255_bytes_runs_and_is_archived_under_its_name(spool: Spool, standin_daemon: Daemon) -> None:
    """The longest name a file can have: ids and output names use a shortened stem, the input keeps it."""
    name = "n" * 250 + ".yaml"
    drop_raw(spool, name.encode(), b"prompt: a long name\n")
    [manifest] = wait_for(spool.manifests, what="the long name's manifest")
    assert manifest["source"] == name and manifest["job_id"].startswith("n" * 64 + "-")
    wait_for(lambda: (spool.archive / name).exists(), what="the input archived under its name")


@pytest.mark.parametrize("name", ["my fox.yaml", "füchse im schnee.yaml", "狐 🦊.yaml", "n" * 195 + ".yaml"])
def test_names_with_spaces_unicode_or_near_the_length_limit_run(
    spool: Spool, standin_daemon: Daemon, name: str
) -> None:
    spool.drop(name, "prompt: a fox\n")
    [manifest] = wait_for(spool.manifests, what="the job")
    assert manifest["source"] == name
    assert (spool.archive / name).exists()
    assert all(os.path.exists(spool.outbox / output["file"]) for output in manifest["outputs"])


# A job file rewritten while it is claimed -------------------------------------------------------


def test_a_job_file_rewritten_between_stable_and_claim_runs_as_claimed(spool: Spool) -> None:
    """The tracker said stable, then the file changed before pairing read it and again before the claim:
    what runs is what was claimed, never an older read (a variant of test_inbox's rewrite-after-pairing)."""
    config = spool.config
    tracker = SettleTracker(config.watch.settle_s)
    pairing = Pairing.for_config(config)
    path = spool.drop("fox.yaml", "prompt: a fox\nseed: 1\n")
    tracker.touch(path, renamed=True)
    assert tracker.stable() == [path]
    path.write_text("prompt: a cat\nseed: 2\n")  # after `stable`, before pairing reads it
    [intent] = pairing.decide(["fox.yaml"], ["fox.yaml"], 0.0, stamp=lambda rel: file_stamp(config.inbox / rel))
    assert intent.parsed is not None and intent.parsed.result()[0].prompt == "a cat"
    with open(path, "a", encoding="utf-8") as handle:  # after pairing, before the claim
        handle.write("negative_prompt: dogs\n")
    make_daemon_folders(config)
    claimed = claim(intent, config)
    assert claimed is not None
    [job] = load_jobs(claimed, config, parsed=intent.parsed)
    assert (job.spec.prompt, job.spec.seed, job.spec.negative_prompt) == ("a cat", 2, "dogs")
    assert tracker.stable() == [], "the tracker saw the file change and starts its settle time again"


def test_a_job_file_rewritten_into_garbage_after_pairing_fails_as_claimed(spool: Spool) -> None:
    config = spool.config
    pairing = Pairing.for_config(config)
    path = spool.drop("fox.yaml", "prompt: a fox\n")
    [intent] = pairing.decide(["fox.yaml"], ["fox.yaml"], 0.0, stamp=lambda rel: file_stamp(config.inbox / rel))
    path.write_bytes(b"prompt: [unclosed\n")
    make_daemon_folders(config)
    claimed = claim(intent, config)
    assert claimed is not None
    with pytest.raises(JobRejected, match="not valid YAML") as caught:
        load_jobs(claimed, config, parsed=intent.parsed)
    assert (caught.value.code, caught.value.path) == ("yaml_syntax", "fox.yaml")
