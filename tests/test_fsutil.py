"""The moves every stage relies on: never replacing, repeatable after a crash, across filesystems, without links."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import pytest

from diffusiond.daemon import fsutil
from diffusiond.daemon.fsutil import move_unique, rename_checked


def test_a_move_takes_the_next_free_name_and_never_replaces(tmp_path: Path) -> None:
    dest = tmp_path / "archive"
    dest.mkdir()
    (dest / "job.yaml").write_text("older")
    (dest / "job-2.yaml").write_text("old")
    src = tmp_path / "job.yaml"
    src.write_text("new")
    assert move_unique(src, dest) == dest / "job-3.yaml"
    assert [(dest / n).read_text() for n in ("job.yaml", "job-2.yaml", "job-3.yaml")] == ["older", "old", "new"]
    assert not src.exists()


def test_a_move_interrupted_after_its_link_is_finished_not_doubled(tmp_path: Path) -> None:
    """A kill between link and unlink leaves one file under two names; moving it again only unlinks."""
    dest = tmp_path / "archive"
    dest.mkdir()
    src = tmp_path / "job.yaml"
    src.write_text("once")
    os.link(src, dest / "job.yaml")  # where the killed move stopped
    assert move_unique(src, dest) == dest / "job.yaml"
    assert sorted(p.name for p in dest.iterdir()) == ["job.yaml"] and not src.exists()


@pytest.mark.parametrize("kind", ["file", "fifo", "socket", "directory", "symlink"])
def test_any_kind_of_file_moves_without_being_opened(tmp_path: Path, kind: str) -> None:
    src, dest = tmp_path / "x.yaml", tmp_path / "failed"
    make(src, kind)
    moved = move_unique(src, dest)
    assert moved == dest / "x.yaml" and not os.path.lexists(src)
    assert kind_of(moved) == kind


@pytest.mark.parametrize("kind", ["file", "fifo", "directory", "symlink"])
def test_a_move_to_another_filesystem_copies_then_removes(tmp_path: Path, small_disk: Path, kind: str) -> None:
    src, dest = tmp_path / "x.yaml", small_disk / "archive"
    make(src, kind)
    assert os.stat(tmp_path).st_dev != os.stat(small_disk).st_dev
    moved = move_unique(src, dest)
    assert moved == dest / "x.yaml" and kind_of(moved) == kind and not os.path.lexists(src)
    if kind == "file":
        assert moved.read_text() == "data"
    assert [p.name for p in dest.iterdir()] == ["x.yaml"], "no temp file left"


def test_where_links_are_refused_a_placeholder_reserves_the_name(tmp_path: Path, monkeypatch) -> None:
    """An SMB share refuses link() (EPERM) and cannot exist here: link is made to refuse as SMB does."""

    def no_links(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    dest = tmp_path / "archive"
    dest.mkdir()
    (dest / "job.yaml").write_text("taken")
    src = tmp_path / "job.yaml"
    src.write_text("new")
    monkeypatch.setattr(fsutil.os, "link", no_links)
    monkeypatch.setattr(fsutil, "_renameat2", None)  # nor renameat2's RENAME_NOREPLACE
    assert move_unique(src, dest) == dest / "job-2.yaml"
    assert (dest / "job.yaml").read_text() == "taken" and (dest / "job-2.yaml").read_text() == "new"


def test_a_rename_reported_missing_after_it_happened_counts_as_done(tmp_path: Path) -> None:
    """NFSv3 retransmits a RENAME whose reply was lost and reports ENOENT: the destination decides."""
    src, dest = tmp_path / "a.yaml", tmp_path / "claimed.yaml"
    dest.write_text("moved by the first RENAME")
    rename_checked(src, dest)  # no source, but the destination is there: done
    assert dest.read_text() == "moved by the first RENAME"
    with pytest.raises(FileNotFoundError):
        rename_checked(src, tmp_path / "never.yaml")  # neither: really missing


def make(path: Path, kind: str) -> None:
    if kind == "file":
        path.write_text("data")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(path))
    elif kind == "directory":
        path.mkdir()
        (path / "inside.txt").write_text("inside")
    else:
        os.symlink("/etc/hostname", path)


def kind_of(path: Path) -> str:
    import stat

    mode = os.lstat(path).st_mode
    for kind, test in [("symlink", stat.S_ISLNK), ("fifo", stat.S_ISFIFO), ("socket", stat.S_ISSOCK)]:
        if test(mode):
            return kind
    return "directory" if stat.S_ISDIR(mode) else "file"
