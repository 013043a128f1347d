"""Every error diffusiond raises on purpose, as one tree.

    DiffusiondError
    ├── JobRejected      the user's file is wrong: fix the file and drop it again
    ├── JobFailed        the file was fine, running it failed (model, device, disk)
    └── ConfigError      the daemon's config is wrong: fix it and restart/reload

Machine codes (`Code`) are separate from the human text, so scripts can branch on
`code` in an error report while people read `message` and `fix`. Foreign
exceptions (torch, diffusers, PIL, YAML) are translated where they are called,
with `raise ... from exc`.

Where an error happened (the job file, the job's position in it, the field) is
attached on the way out by `job_context`, which fills in what the raiser did not
know: the code that reads an image need not know which job file named it.
`report()` writes an error as the fields of `<name>.error.yaml`; `from_report`
reads them back (a claim carries a problem found before it was claimed that way).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from enum import StrEnum
from typing import Any


class Code(StrEnum):
    """Why a job did not finish; written as `code:` in `<name>.error.yaml`."""

    YAML_SYNTAX = "yaml_syntax"
    """The job file is not valid YAML."""
    NOT_A_JOB = "not_a_job"
    """A YAML document is not a mapping of fields, or the file holds no job (or is no plain file to read)."""
    INVALID_FIELD = "invalid_field"
    """A field has a wrong name, type or value."""
    OVER_LIMIT = "over_limit"
    """A value or file is larger than the config's limits allow."""
    MISSING_INPUT = "missing_input"
    """An image the job needs is not in the inbox."""
    PATH_ESCAPES = "path_escapes"
    """An image path points outside the inbox."""
    BAD_IMAGE = "bad_image"
    """A file with an image extension is not a readable image."""
    BAD_NAME = "bad_name"
    """A file's name cannot be carried into reports and outputs: a control character, or not UTF-8."""
    NO_JOB_FOR_IMAGE = "no_job_for_image"
    """A bare image arrived with no YAML, no profile folder and no default sketch job."""
    MODEL_FAILED = "model_failed"
    """The model could not be loaded."""
    GENERATION_FAILED = "generation_failed"
    """The pipeline raised while generating."""
    WATERMARK_FAILED = "watermark_failed"
    """The config requires the invisible watermark and this image could not carry it."""
    OUTPUT_FAILED = "output_failed"
    """The outputs could not be written (disk full, permissions)."""
    CONFIG = "config"
    """The daemon's config is wrong."""
    CRASHED = "crashed"
    """The daemon died while running the job, `limits.max_crashes` times: the job is not tried again."""
    NODE_LOST = "node_lost"
    """The job's daemon stopped answering (its lease ran out) `limits.max_takeovers` times: not tried again."""
    CANCELLED = "cancelled"
    """`diffusiond cancel` stopped it (running, waiting its turn, or still in the inbox)."""


class DiffusiondError(Exception):
    """Base of the tree; `fix` says what the reader should do about it."""

    code: Code = Code.CONFIG

    def __init__(
        self,
        message: str,
        *,
        code: Code | None = None,
        fix: str = "",
        path: str | None = None,
        job_index: int | None = None,
        field: str | None = None,
        value: Any = None,
        stage: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.fix = fix
        self.path = path
        self.job_index = job_index
        self.field = field
        self.value = value
        self.stage = stage
        """Which stage of a multi-stage job (1 is the job's own task, 2 the first of its `then:`)."""

    def __str__(self) -> str:
        position = ", ".join(
            f"{what} {n}" for what, n in (("job", self.job_index), ("stage", self.stage)) if n is not None
        )
        where = " ".join(part for part in (self.path, f"({position})" if position else None) if part)
        if self.field:
            where = f"{where}, field '{self.field}'" if where else f"field '{self.field}'"
        text = f"{where}: {self.message}" if where else self.message
        return f"{text}. Fix: {self.fix}" if self.fix else text

    def add_context(
        self,
        *,
        path: str | None = None,
        job_index: int | None = None,
        field: str | None = None,
        value: Any = None,
        stage: int | None = None,
    ) -> None:
        """Fill in where the error happened, keeping what the raiser already said (a field comes with its value)."""
        if self.path is None:
            self.path = path
        if self.job_index is None:
            self.job_index = job_index
        if self.stage is None:
            self.stage = stage
        if self.field is None and field is not None:
            self.field, self.value = field, value

    @classmethod
    def from_report(cls, report: Mapping[str, Any]) -> DiffusiondError:
        """The error whose `report()` this is, of the class its code belongs to: the inverse of `report()`."""
        code = Code(report["code"])
        return _CLASS_OF_CODE.get(code, JobRejected)(
            report["error"],
            code=code,
            fix=report.get("fix", ""),
            path=report.get("file"),
            job_index=report.get("job"),
            field=report.get("field"),
            value=report.get("value"),
            stage=report.get("stage"),
        )

    def report(self) -> dict[str, Any]:
        """The fields of an error report, in the order a person reads them."""
        out: dict[str, Any] = {"code": str(self.code), "error": self.message}
        if self.path is not None:
            out["file"] = self.path
        if self.job_index is not None:
            out["job"] = self.job_index
        if self.stage is not None:
            out["stage"] = self.stage
        if self.field is not None:
            out["field"] = self.field
            out["value"] = self.value
        if self.fix:
            out["fix"] = self.fix
        return out


class JobRejected(DiffusiondError):
    """The job file (or image) is wrong; running it again unchanged fails again."""

    code = Code.INVALID_FIELD


class JobFailed(DiffusiondError):
    """The job was valid, but the model, device or disk failed while running it."""

    code = Code.GENERATION_FAILED


class ConfigError(DiffusiondError):
    """The daemon's own config is wrong."""

    code = Code.CONFIG


_CLASS_OF_CODE: dict[Code, type[DiffusiondError]] = {
    Code.MODEL_FAILED: JobFailed,
    Code.GENERATION_FAILED: JobFailed,
    Code.WATERMARK_FAILED: JobFailed,
    Code.OUTPUT_FAILED: JobFailed,
    Code.CRASHED: JobFailed,
    Code.NODE_LOST: JobFailed,
    Code.CONFIG: ConfigError,
}
"""Every other code is a rejection of the user's file."""


def internal_error(exc: BaseException, *, path: str | None = None) -> JobFailed:
    """A diffusiond bug, reported like any failure: the input lands in failed/ and the daemon goes on."""
    return JobFailed(
        f"internal error: {type(exc).__name__}: {exc}",
        code=Code.GENERATION_FAILED,
        path=path,
        fix="this is a diffusiond bug: please report it with the daemon's log",
    )


@contextmanager
def job_context(
    *,
    path: str | None = None,
    job_index: int | None = None,
    field: str | None = None,
    value: Any = None,
    stage: int | None = None,
) -> Iterator[None]:
    """Attach where it happened to any DiffusiondError passing through, where the raiser left it unset.

    Like httpx's `request_context`: `with job_context(path=job.source, job_index=job.index): ...`
    """
    try:
        yield
    except DiffusiondError as exc:
        exc.add_context(path=path, job_index=job_index, field=field, value=value, stage=stage)
        raise
