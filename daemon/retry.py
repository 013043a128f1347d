"""`diffusiond retry`: a failed job's inputs back into the inbox, and its report gone.

A report in failed/ (`<stem>.error.yaml`) lists the inputs it failed with (`inputs:`, their
names in failed/) and where each came from (`inbox_paths:`, older reports lack it: those go to
the inbox's top). Each input moves back to its place (the images first, the job file last, so
the daemon finds them together), then the report is removed: a crash in between leaves the
inputs in the inbox and a report that names inputs no longer in failed/, which the next retry
removes. An input whose name is taken in the inbox is not moved over it: that failure stays.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path

import yaml

from diffusiond.daemon.fsutil import move_unique
from diffusiond.daemon.pairing import is_job_file

REPORT_SUFFIX = ".error.yaml"


class RetryError(Exception):
    """A failure that cannot go back (its name is taken in the inbox, its report unreadable)."""


@dataclass(frozen=True)
class Failure:
    """One report in failed/ and the inputs it names."""

    report: Path
    code: str
    source: str
    inputs: dict[str, str]
    """Name in failed/ → path in the inbox."""

    def present(self) -> list[str]:
        return [name for name in self.inputs if (self.report.parent / name).exists()]


def failures(failed: Path) -> list[Failure]:
    """Every readable report in `failed`, oldest first (unreadable ones are skipped)."""
    found: list[Failure] = []
    paths = [p for p in failed.glob(f"*{REPORT_SUFFIX}") if p.is_file()] if failed.is_dir() else []
    for path in sorted(paths, key=lambda p: (p.stat().st_mtime, p.name)):
        try:
            found.append(read_failure(path))
        except RetryError:
            continue
    return found


def read_failure(path: Path) -> Failure:
    try:
        report = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise RetryError(f"{path}: cannot read the report: {exc}") from exc
    if not isinstance(report, dict) or not isinstance(report.get("inputs"), list):
        raise RetryError(f"{path}: not a diffusiond report (no `inputs:` list)")
    known = report.get("inbox_paths")
    known = known if isinstance(known, dict) else {}
    inputs = {str(name): str(known.get(name) or name) for name in report["inputs"]}
    source = str(report.get("file") or (next(iter(inputs.values()), "")))
    return Failure(path, str(report.get("code", "")), source.split(" (job ")[0], inputs)


def find(failed: Path, name: str) -> Failure:
    """The failure of an input (its name in failed/, or its inbox path) or of a report."""
    wanted = posixpath.basename(name.rstrip("/"))
    for failure in reversed(failures(failed)):  # the newest, when a file failed twice
        if wanted == failure.report.name or wanted in failure.inputs or name in failure.inputs.values():
            return failure
    raise RetryError(f"no report in {failed} names {name!r}; `ls {failed}` lists what failed")


def retry(failure: Failure, inbox: Path) -> list[Path]:
    """Move the failure's inputs back into the inbox, then remove its report; returns where they went."""
    present = failure.present()
    folder = failure.report.parent
    for name in present:
        target = inbox / failure.inputs[name]
        if not _inside(inbox, target):
            raise RetryError(f"{failure.report}: inbox path {failure.inputs[name]!r} is outside the inbox")
        if target.exists() or target.is_symlink():
            raise RetryError(f"{target} exists already; move it away first, then retry {name}")
    moved: list[Path] = []
    for name in sorted(present, key=is_job_file):  # images first: the job file finds them there
        target = inbox / failure.inputs[name]
        target.parent.mkdir(parents=True, exist_ok=True)
        moved.append(move_unique(folder / name, target.parent, target.name))
    failure.report.unlink(missing_ok=True)
    return moved


def _inside(folder: Path, path: Path) -> bool:
    resolved, root = path.resolve(), folder.resolve()
    return resolved == root or root in resolved.parents
