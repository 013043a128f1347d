"""Deciding what to claim: a job file with all its images, or a bare image with its profile.

Pure bookkeeping over inbox-relative paths; nothing here moves a file. A job file
waits up to `pair_wait_s` for the images it needs; a bare image waits as long for
a job file of the same stem, then takes its hot folder's profile.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Callable, Collection, Container, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from diffusiond.daemon.config import Config

from diffusiond.pipeline.errors import Code, DiffusiondError, JobRejected, internal_error
from diffusiond.pipeline.job import (
    IMAGE_SUFFIXES,
    JOB_SUFFIXES,
    Rules,
    Spec,
    Task,
    file_kind,
    inbox_relative,
    name_problem,
    read_job_file,
)

log = logging.getLogger(__name__)
Parse = Callable[[str], list[Spec]]
"""Reads and validates a job file by its inbox-relative path; raises JobRejected."""


@dataclass(frozen=True)
class Intent:
    """Files to claim together; `source` is the job file, or the image for a bare image."""

    source: str
    files: tuple[str, ...]
    bare_image: bool = False
    problem: dict[str, Any] | None = None
    """An error found before claiming (missing image, no job for an image): the claim goes to failed/."""
    parsed: Parsed | None = field(default=None, compare=False, repr=False)
    """The job file as pairing validated it, so the claim does not read and validate it again."""


@dataclass(frozen=True)
class Parsed:
    """A job file's validation (its specs, or why it is wrong), and the `file_stamp` of the file read."""

    stamp: object
    outcome: tuple[Spec, ...] | DiffusiondError

    def result(self) -> list[Spec]:
        """The specs; the rejection is raised."""
        if isinstance(self.outcome, DiffusiondError):
            raise self.outcome
        return list(self.outcome)


def job_file_reader(root: Path, *, rules: Rules, profiles: Mapping[str, Mapping[str, Any]]) -> Parse:
    """How the daemon reads an inbox-relative job file under `root` (the inbox, or a claim's copy of it):
    with its hot folder's profile, against the config's rules."""

    def parse(relative: str) -> list[Spec]:
        profile = profiles.get(profile_of(relative) or "")
        return read_job_file(root / relative, label=relative, rules=rules, profile=profile)

    return parse


class ParseCache:
    """Each job file's latest validation by stamp: pairing looks at a waiting file every round and
    reads it again only when it changed (or was replaced: a rename changes the inode)."""

    def __init__(self, parse: Parse) -> None:
        self._parse = parse
        self._by_path: dict[str, Parsed] = {}

    def get(self, path: str, stamp: object) -> Parsed:
        cached = self._by_path.get(path)
        if cached is not None and cached.stamp == stamp:
            return cached
        try:
            outcome: tuple[Spec, ...] | DiffusiondError = tuple(self._parse(path))
        except JobRejected as exc:
            outcome = exc
        except Exception as exc:  # a bug must not stop the daemon: the file is claimed and fails with it
            log.exception("internal error reading %s", path)
            outcome = internal_error(exc, path=path)
        self._by_path[path] = parsed = Parsed(stamp, outcome)
        return parsed

    def forget(self, path: str) -> None:
        self._by_path.pop(path, None)


class Stamp(NamedTuple):
    """What `file_stamp` says of a file: enough to tell it changed, and what kind of file it is."""

    size: int
    mtime_ns: int
    inode: int
    mode: int
    """`st_mode` of the path itself (a link is a link, not its target)."""


def file_stamp(path: str | os.PathLike[str]) -> Stamp | None:
    """Size, modification time and inode: a file with the same stamp still holds what was read.

    A rename keeps all three, so the claimed copy of a job file can be matched to its parse.
    A link is stamped as itself, never followed. None where there is no such file.
    """
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return Stamp(st.st_size, st.st_mtime_ns, st.st_ino, st.st_mode)


def is_job_file(name: str) -> bool:
    return name.lower().endswith(JOB_SUFFIXES)


def profile_of(relative: str) -> str | None:
    """The hot folder a path is in, or None for the inbox root."""
    parts = PurePosixPath(relative).parts
    return parts[0] if len(parts) > 1 else None


def resolve_image(spec: Spec, job_path: str, exists: Callable[[str], bool]) -> str | None:
    """The inbox-relative image a job needs: its `image:`, else the job file's same-stem sketch."""
    if not spec.needs_image:
        return None
    if spec.input_image is not None:
        return inbox_relative(job_path, spec.input_image)
    return same_stem_image(job_path, exists)


def resolve_inputs(spec: Spec, job_path: str, exists: Callable[[str], bool]) -> dict[str, str | None]:
    """Every inbox-relative file a job needs, by the field that asks for it (None: not found).

    `image` (for a task or control that reads the job's input), each control's own `image`, and the
    mask: its `mask:`, else the input's `<stem>.mask.png` when one is there (an img2img job only).
    """
    needs: dict[str, str | None] = {}
    if spec.needs_image:
        needs["image"] = resolve_image(spec, job_path, exists)
    for field_name, name in spec.named_inputs().items():
        if field_name != "image":
            needs[field_name] = inbox_relative(job_path, name)
    image = needs.get("image")
    if spec.task is Task.IMG2IMG and "mask" not in needs and image is not None:
        mask = same_stem_mask(image, exists)
        if mask is not None:
            needs["mask"] = mask
    return needs


def same_stem_image(job_path: str, exists: Callable[[str], bool]) -> str | None:
    return _first_existing(posixpath.splitext(job_path)[0], exists)


MASK_INFIX = ".mask"
"""`sketch.mask.png` is the mask of `sketch.png` (or of `sketch.yaml`'s same-stem sketch)."""


def same_stem_mask(image: str, exists: Callable[[str], bool]) -> str | None:
    """The inbox-relative mask beside an image (`a/x.png` -> `a/x.mask.png`, `.jpg`, `.webp`, any case), or None."""
    stem = posixpath.splitext(image)[0]
    for infix in (MASK_INFIX, MASK_INFIX.upper(), MASK_INFIX.title()):
        if (found := _first_existing(stem + infix, exists)) is not None:
            return found
    return None


def mask_partner(path: str) -> str | None:
    """For a mask's name (`x.mask.png`), the stem its image or job file has (`x`); None for other files."""
    stem, suffix = posixpath.splitext(path)
    if suffix.lower() not in IMAGE_SUFFIXES or not stem.lower().endswith(MASK_INFIX):
        return None
    return stem[: -len(MASK_INFIX)]


def _first_existing(stem: str, exists: Callable[[str], bool]) -> str | None:
    for suffix in IMAGE_SUFFIXES:
        for candidate in (stem + suffix, stem + suffix.upper()):
            if exists(candidate):
                return candidate
    return None


def _refused_image(
    specs: Sequence[Spec],
    needs: Sequence[Mapping[str, str | None]],
    stable: Container[str],
    stamp: Callable[[str], object],
) -> JobRejected | None:
    """A named image that is a link or a folder: never tracked, so never stable; waiting for it is pointless."""
    for index, (spec, need) in enumerate(zip(specs, needs, strict=True), start=1):
        for field_name, image in need.items():
            if image is None or image in stable:
                continue
            refused = _refused_kind(spec, index, field_name, image, stamp)
            if refused is not None:
                return refused
    return None


def _refused_kind(
    spec: Spec, index: int, field_name: str, image: str, stamp: Callable[[str], object]
) -> JobRejected | None:
    try:
        stamped = stamp(image)
    except OSError:  # a stamp function may raise for a file that is not there; `file_stamp` says None
        return None
    kind = file_kind(stamped.mode) if isinstance(stamped, Stamp) else None
    if kind == "a symbolic link":
        message, fix = (
            "is a symbolic link, which the daemon does not follow",
            "drop the image itself, not a link to it",
        )
    elif kind == "a folder":
        message, fix = "is a folder, not an image file", f"name a plain image file in `{field_name}:`"
    else:
        return None
    written = spec.named_inputs().get(field_name) or image
    return JobRejected(
        f"the {'image' if field_name == 'image' else field_name} {written!r} {message}",
        code=Code.BAD_IMAGE,
        job_index=index,
        field=field_name,
        value=written,
        fix=fix,
    )


@dataclass
class Pairing:
    """Remembers when each file became stable, and turns stable files into intents."""

    parse: Parse
    """How a job file is read (`job_file_reader`); a rejection still makes an intent, which fails."""
    profiles: Mapping[str, Mapping[str, Any]]
    has_sketch_job: bool
    pair_wait_s: float
    reproduce: str | None = None
    """The config's `reproduce:` folder: a bare image there is its own job."""
    _stable_since: dict[str, float] = field(default_factory=dict, init=False)
    _why: dict[str, str] = field(default_factory=dict, init=False)
    """Why a stable file was not claimed when last looked at (`why_waiting`)."""
    _parsed: ParseCache = field(init=False)

    def __post_init__(self) -> None:
        self._parsed = ParseCache(self.parse)

    @classmethod
    def for_config(cls, config: Config) -> Pairing:
        """The pairing the daemon runs with `config` (and runs again after a reload)."""
        return cls(
            parse=job_file_reader(config.inbox, rules=config.rules(), profiles=config.profiles),
            profiles=config.profiles,
            has_sketch_job=config.sketch_job is not None,
            pair_wait_s=config.watch.pair_wait_s,
            reproduce=config.reproduce,
        )

    def decide(
        self,
        stable: Collection[str],
        present: Container[str],
        now: float,
        stamp: Callable[[str], object],
        limit: int | None = None,
    ) -> list[Intent]:
        """Intents for what can be claimed now, at most `limit`. `present` holds every candidate file.

        `stable` may be only the oldest stable files (a window): the others keep their timers.
        """
        stable_set = set(stable)
        for gone in [p for p in self._stable_since if p not in stable_set and p not in present]:
            self._stable_since.pop(gone, None)
            self._why.pop(gone, None)
            self._parsed.forget(gone)
        for path in stable:
            self._stable_since.setdefault(path, now)
        intents: list[Intent] = []
        reserved: set[str] = set()
        stamps = {p: stamp(p) for p in stable if is_job_file(p)}
        job_files = sorted(stamps, key=lambda p: -self._priority(p, stamps[p]))  # a stable sort: then older first
        for path in job_files:
            if limit is not None and len(intents) >= limit:
                return self._taken(intents)  # the images of the files not looked at yet must not pass for bare ones
            if (bad_name := name_problem(path)) is not None:
                bad_name.add_context(path=path)
                intents.append(Intent(path, (path,), problem=bad_name.report()))
                continue
            stamped = stamps[path]
            parsed = self._parsed.get(path, stamped)
            usable = parsed if stamped is not None else None  # a file gone meanwhile: the claim reads it
            if isinstance(parsed.outcome, DiffusiondError):
                intents.append(Intent(path, (path,), parsed=usable))
                continue
            specs = parsed.outcome
            needs = [resolve_inputs(s, path, present.__contains__) for s in specs]
            wanted = [name for need in needs for name in need.values()]
            refused = _refused_image(specs, needs, stable_set, stamp)
            if refused is not None:
                refused.add_context(path=path)
                images = tuple(dict.fromkeys(w for w in wanted if w is not None and w in stable_set))
                intents.append(Intent(path, (path, *images), problem=refused.report()))
                continue
            missing = [
                (field_name, s.named_inputs().get(field_name) or name or "(same-stem image)")
                for s, need in zip(specs, needs, strict=True)
                for field_name, name in need.items()
                if name is None or name not in stable_set
            ]
            # The same-stem sketch (and its mask) always travel with their job file, used or not, so they
            # are archived with it; one that is still being written is waited for like a needed image.
            same_stem = same_stem_image(path, present.__contains__)
            its_mask = same_stem_mask(same_stem, present.__contains__) if same_stem is not None else None
            unsettled_sketch = any(f is not None and f not in stable_set for f in (same_stem, its_mask))
            wanted += [same_stem, its_mask]
            images = tuple(dict.fromkeys(w for w in wanted if w is not None and w in stable_set))
            reserved.update(w for w in wanted if w is not None)
            waited_out = now - self._stable_since[path] >= self.pair_wait_s
            for image in images:
                self._why[image] = f"goes with {posixpath.basename(path)}"
            if missing and not waited_out:
                field_name, name = missing[0]
                self._why[path] = f"waiting for its {field_name} {name!r} (up to {self.pair_wait_s:g} s)"
            elif unsettled_sketch and not waited_out:
                self._why[path] = "waiting for its image to be written"
            if not missing and (not unsettled_sketch or waited_out):
                intents.append(Intent(path, (path, *images), parsed=usable))
            elif missing and waited_out:
                field_name, name = missing[0]
                what = "image" if field_name == "image" else field_name
                problem = JobRejected(
                    f"the {what} {name!r} did not arrive within {self.pair_wait_s:g} s of the job file",
                    code=Code.MISSING_INPUT,
                    path=path,
                    field=field_name,
                    value=name,
                    fix="drop the image into the inbox before (or together with) its job file",
                )
                intents.append(Intent(path, (path, *images), problem=problem.report()))
        claimed = {f for intent in intents for f in intent.files}
        for path in [p for p in stable if not is_job_file(p)]:
            if path in claimed or path in reserved or self._has_job_file(path, present):
                continue
            partner = mask_partner(path)
            if partner is not None and _first_existing(partner, present.__contains__) is not None:
                self._why[path] = "a mask: goes with its image"
                continue
            if now - self._stable_since[path] < self.pair_wait_s:
                self._why[path] = f"waiting up to {self.pair_wait_s:g} s for a job file (or image) of the same stem"
                continue
            mask = same_stem_mask(path, present.__contains__)
            if mask is not None and mask not in stable_set and now - self._stable_since[path] < 2 * self.pair_wait_s:
                continue  # its mask is still being written; one never stable (a link) is left behind after that
            if limit is not None and len(intents) >= limit:
                break
            files = (path, mask) if mask is not None and mask in stable_set else (path,)
            intents.append(Intent(path, files, bare_image=True, problem=self._bare_problem(path)))
        return self._taken(intents)

    def _priority(self, path: str, stamped: object) -> int:
        """A job file's claim priority: its jobs' highest `priority:` (0 when it cannot be read)."""
        if name_problem(path) is not None:
            return 0
        outcome = self._parsed.get(path, stamped).outcome
        return 0 if isinstance(outcome, DiffusiondError) else max((s.priority for s in outcome), default=0)

    def _taken(self, intents: list[Intent]) -> list[Intent]:
        for intent in intents:
            for name in intent.files:
                self._why.pop(name, None)
        return intents

    def why_waiting(self, path: str) -> str | None:
        """Why a settled file was not claimed the last time it was looked at; None: nothing holds it back."""
        return self._why.get(path)

    @staticmethod
    def _has_job_file(image: str, present: Container[str]) -> bool:
        stem = posixpath.splitext(image)[0]
        return any(stem + s in present or stem + s.upper() in present for s in JOB_SUFFIXES)

    def _bare_problem(self, image: str) -> dict[str, Any] | None:
        if (bad_name := name_problem(image)) is not None:
            bad_name.add_context(path=image)
            return bad_name.report()
        if (partner := mask_partner(image)) is not None:
            return JobRejected(
                f"a mask with no image: {posixpath.basename(partner)}.png (or .jpg, .webp) did not arrive "
                f"within {self.pair_wait_s:g} s",
                code=Code.NO_JOB_FOR_IMAGE,
                path=image,
                fix=f"drop the mask together with its image ({posixpath.basename(partner)}.png), or rename it "
                "if it is a sketch of its own (a name ending in .mask.png is a mask)",
            ).report()
        profile = profile_of(image)
        if profile is None and self.has_sketch_job:
            return None
        if profile is not None and (profile in self.profiles or profile == self.reproduce):
            return None
        where = f"hot folder '{profile}' has no profile in the config" if profile else "no job file came with it"
        fix = (
            f"add a profile named '{profile}' to the config, or drop a job file with it"
            if profile
            else f"drop a job file of the same stem with it (e.g. {posixpath.splitext(image)[0]}.yaml), "
            "put it in a profile folder, or set `sketch_job:` in the config"
        )
        return JobRejected(f"bare image and {where}", code=Code.NO_JOB_FOR_IMAGE, path=image, fix=fix).report()
