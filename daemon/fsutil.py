"""The file operations every stage relies on: an atomic write, a move that never replaces, durable renames.

Written by hand because no well-kept library moves a file without replacing what is
there: `os.rename` and `shutil.move` replace silently, and `renameat2(RENAME_NOREPLACE)`
is Linux-only and refused by NFS and SMB. A hard link, in contrast, fails with EEXIST
on every filesystem that has links, atomically, on the server (NFS included).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}
"""What `link()` reports where a filesystem has no hard links (SMB, FAT, some FUSE) or the
file cannot have one more (a directory is EPERM on Linux)."""
DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON object from a file, or None when it is missing, unreadable, half-written or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def atomic_write(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write to a hidden temp name in the same folder, fsync, then rename over `path`.

    A reader (or a crash) sees the old file or the whole new one, never a part.
    Temp names start with a dot, which every inbox filter (ours too) ignores.
    `durable=False` skips the fsyncs, for files rewritten all the time whose
    loss in a power cut does not matter (status.json): readers still never see a part.
    On any error the temp file is removed (a full disk leaves nothing behind).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable:
        fsync_dir(path.parent)


def write_new(path: Path, data: bytes) -> None:
    """Create `path` (it must not exist: FileExistsError), write and fsync it; removed again on error."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        with open(fd, "wb", closefd=True) as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise


def fsync_dir(folder: Path) -> None:
    """Make renames in `folder` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


NAME_MAX = 255


def candidates(folder: Path, name: str) -> Iterator[Path]:
    """`folder/name`, then `folder/stem-2.ext`, `-3`, ...: the names a move may take.

    A name at the filesystem's limit (255 bytes) has its stem cut to make room for the number.
    """
    yield folder / name
    stem, dot, suffix = name.partition(".")
    if len(os.fsencode(dot + suffix)) > NAME_MAX // 2:  # `a.<250 bytes>.yaml`: number the whole name
        stem, dot, suffix = name, "", ""
    n = 2
    while True:
        tail = f"-{n}{dot}{suffix}"
        room = NAME_MAX - len(os.fsencode(tail))
        yield folder / (os.fsdecode(os.fsencode(stem)[:room]) + tail)
        n += 1


def same_file(a: Path, b: Path) -> bool:
    try:
        sa, sb = os.lstat(a), os.lstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def move_unique(src: Path, folder: Path, name: str | None = None, *, keep_source: bool = False) -> Path:
    """Move `src` into `folder` under a free name, never replacing anything there; returns the new path.

    One `renameat2(RENAME_NOREPLACE)` where the filesystem has it (ext4, xfs, btrfs, tmpfs):
    atomic, and EEXIST when the name is taken, even by another daemon in the same instant;
    then the next name is tried. Where it has not (NFS): link the new name, then unlink the
    old; a crash between the two leaves both names on one file, and moving it again finds
    the name that is already this very file and only unlinks the old one. Without links
    (SMB, FAT) an `O_EXCL` placeholder (an empty folder for a folder) reserves the name and
    the rename replaces only that; a crash in between can leave an empty placeholder. Across
    filesystems (EXDEV) the file is copied to a hidden temp name in `folder` and moved into
    a free name. Both folders are fsynced: the move survives a power cut.

    With `keep_source` the old name stays too (a link): a repeat finds the new name again,
    so a file is delivered once even when the caller dies right after delivering it.
    """
    folder.mkdir(parents=True, exist_ok=True)  # archive/, failed/, inbox/<profile>/: never a claim's path
    for dest in candidates(folder, name or src.name):
        try:
            if keep_source:
                os.link(src, dest, follow_symlinks=False)
            elif not _rename_noreplace(src, dest):
                os.link(src, dest, follow_symlinks=False)
                os.unlink(src)
        except FileExistsError:
            if not same_file(src, dest):  # taken by another file: try the next name
                continue
            if not keep_source:  # an earlier move of this very file stopped after its link: finish it
                os.unlink(src)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                return _copy_across(src, folder, name or src.name, keep_source=keep_source)
            if exc.errno not in NO_LINKS:
                raise
            if not _reserve(dest, is_dir=stat.S_ISDIR(os.lstat(src).st_mode)):
                continue
            os.rename(src, dest)  # replaces only the placeholder this call made
        _sync_both(src, dest)
        return dest
    raise AssertionError("unreachable: candidates() never ends")


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)  # glibc 2.28+; Python's os.rename takes no flags


def _rename_noreplace(src: Path, dest: Path) -> bool:
    """rename(2) that fails with EEXIST instead of replacing; False where the filesystem lacks it."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dest), _RENAME_NOREPLACE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # NFS, SMB, FUSE: the link-then-unlink way
    raise OSError(code, os.strerror(code), str(src), None, str(dest))


def rename_checked(src: Path, dest: Path) -> None:
    """`os.rename`, where an ENOENT is believed only when `dest` did not appear.

    An NFSv3 client retransmits a RENAME whose reply was lost; the retry finds no
    source and reports ENOENT although the first one moved the file. Then `dest` exists
    and the rename counts as done.
    """
    try:
        os.rename(src, dest)
    except FileNotFoundError:
        if os.path.lexists(src) or not os.path.lexists(dest):
            raise


def _reserve(dest: Path, *, is_dir: bool) -> bool:
    """Create an empty placeholder at `dest`; False when the name is taken."""
    try:
        if is_dir:
            dest.mkdir()
        else:
            os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644))
    except FileExistsError:
        return False
    return True


def _copy_across(src: Path, folder: Path, name: str, *, keep_source: bool = False) -> Path:
    """EXDEV: copy to a hidden temp name in `folder`, fsync, move it into a free name, then drop `src`.

    Repeatable: a regular file whose copy is already under one of the names (a crash after the
    copy, before `src` was removed) is not copied again.
    """
    mode = os.lstat(src).st_mode
    if stat.S_ISREG(mode):
        for dest in candidates(folder, name):
            if not os.path.lexists(dest):
                break
            if same_bytes(src, dest):
                if not keep_source:
                    os.unlink(src)
                    fsync_dir(src.parent)
                return dest
    tmp = folder / f".{name}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(tmp) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink()
    if stat.S_ISDIR(mode):
        shutil.copytree(src, tmp, symlinks=True)
    elif stat.S_ISREG(mode):
        copy_synced(src, tmp)  # never opens a FIFO: only regular files are read
    elif stat.S_ISLNK(mode):
        os.symlink(os.readlink(src), tmp)
    else:  # a FIFO, socket or device: made again, empty, with the same type (reading it could block)
        os.mknod(tmp, mode, os.lstat(src).st_rdev)
    dest = move_unique(tmp, folder, name)
    if not keep_source:
        if stat.S_ISDIR(mode):
            shutil.rmtree(src)
        else:
            os.unlink(src)
        fsync_dir(src.parent)
    return dest


def copy_synced(src: Path, dest: Path) -> None:
    """Copy a regular file with its times and mode, and fsync the copy: it is whole before it is named."""
    shutil.copy2(src, dest)
    with open(dest, "rb") as handle:
        os.fsync(handle.fileno())


def same_bytes(a: Path, b: Path) -> bool:
    """`b` is a regular file with the bytes of `a` (a copy that a crash kept from being recorded)."""
    try:
        if not stat.S_ISREG(os.lstat(b).st_mode) or os.path.getsize(a) != os.path.getsize(b):
            return False
        with open(a, "rb") as fa, open(b, "rb") as fb:
            while chunk := fa.read(1 << 20):
                if chunk != fb.read(1 << 20):
                    return False
        return True
    except OSError:
        return False


def _sync_both(src: Path, dest: Path) -> None:
    fsync_dir(dest.parent)
    if src.parent != dest.parent:
        fsync_dir(src.parent)
