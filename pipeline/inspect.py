"""What an image file says about how it was made, ours or another tool's (`diffusiond inspect`).

`inspect_image` reads, without trusting any of it: the AUTOMATIC1111 infotext
(and its parsed parts), diffusiond's JSON record, the XMP source type, creator
tool and description, EXIF Software/ImageDescription, the invisible
watermark decoded with each known method, and the C2PA credentials. Nothing here needs torch.

A copy stripped of all metadata (what a social site serves) still carries the `tiled` mark:
its mark id names the image. `find_credentials` looks it up in the manifests of the
folders it is given (an outbox), and in the C2PA soft binding of the original it finds
there, so inspect can say which job made the image and whose credentials signed it.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import struct
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path, PurePath
from typing import Any, BinaryIO

from PIL import Image, UnidentifiedImageError

from diffusiond.pipeline.metadata import parse_infotext, read_parameters, read_record, read_xmp

__all__ = ["UnreadableImage", "find_credentials", "format_report", "inspect_image", "watermark_found"]

_SOURCE_TYPES = "http://cv.iptc.org/newscodes/digitalsourcetype/"
_MANIFEST_MAX_BYTES = 4 << 20
"""A manifest of a job with many images is tens of KB; anything far larger is not one of ours."""


class UnreadableImage(Exception):
    """The file is missing, unreadable, or not an image Pillow can open."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


def inspect_image(
    path: str | Path, *, payloads: Sequence[str] = ("diffusiond",), credentials: Sequence[Path] = ()
) -> dict[str, Any]:
    """Everything the file says about its making, as a JSON-serialisable dict.

    Keys: `file`, `format`, `size` [w, h], `mode`, `metadata` (False when the image
    carries none of the below), `parameters` (infotext or None), `parsed`
    ({prompt, negative_prompt, settings} or None), `record` (dict or None),
    `xmp` ({digital_source_type, creator_tool, description} or None), `exif`
    ({software, image_description} or None), `problems` (what could not be read),
    `watermark` ({status: found | not found | unavailable | error, payloads, detail, and `tiled`:
    {payload, mark_id, scale, flipped_bits} when that mark was read}), `c2pa` (this file's
    credentials, with their soft bindings), `credentials` (the images in the `credentials`
    folders whose manifests record the mark id read here: see `find_credentials`).
    `payloads` are the texts the keyed marks (tiled, rivaGan) are checked against.
    Raises UnreadableImage when the file cannot be opened as an image.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            return _inspect(path, image, list(payloads), list(credentials))
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError, ValueError) as exc:
        # PIL raises SyntaxError/ValueError for some broken headers.
        raise UnreadableImage(f"{path}: cannot read as an image: {exc}", path=str(path)) from exc


def _inspect(path: Path, image: Image.Image, payloads: list[str], folders: list[Path]) -> dict[str, Any]:
    problems: list[str] = []
    report: dict[str, Any] = {
        "file": str(path),
        "format": image.format,
        "size": list(image.size),
        "mode": image.mode,
    }

    # 1. The AUTOMATIC1111 infotext.
    parameters = _guarded(problems, "parameters", lambda: read_parameters(image))
    report["parameters"] = parameters
    report["parsed"] = parse_infotext(parameters) if parameters else None

    # 2. diffusiond's record.
    report["record"] = _guarded(problems, "record", lambda: read_record(image))

    # 3. XMP.
    xmp = image.info.get("xmp") or image.info.get("XML:com.adobe.xmp")
    fields = _guarded(problems, "XMP", lambda: read_xmp(xmp)) if xmp else None
    report["xmp"] = {k: v for k, v in fields.items() if k != "record"} if fields else None

    # 4. EXIF basics.
    report["exif"] = _guarded(problems, "EXIF", lambda: _exif_basics(image))

    # Generation metadata: a camera's or an editor's EXIF alone does not count.
    report["metadata"] = bool(parameters or report["record"] or (report["xmp"] and any(report["xmp"].values())))
    report["problems"] = problems

    # 5. The invisible watermark.
    report["watermark"] = _decode_watermark(image, payloads)

    # 6. C2PA content credentials, where c2pa-python is installed.
    report["c2pa"] = _guarded(problems, "C2PA", lambda: _c2pa(path, image.format))

    # 7. The credentials the mark ties this copy to (its original's manifest and C2PA), however stripped.
    tiled = report["watermark"].get("tiled")
    report["credentials"] = find_credentials(tiled["mark_id"], tiled["payload"], folders) if tiled else []
    return report


def find_credentials(mark_id: str, payload: str, folders: Iterable[Path]) -> list[dict[str, Any]]:
    """The images whose manifests (in `folders`, searched recursively) record this `tiled` mark id.

    Each: `manifest` (its path), `job_id`, `image` (the original's path), `sha256`, `present` (the
    original is there with that hash) and `c2pa` (the original's credentials: state, signer, and
    whether their soft binding names this mark), or None when it is unsigned or gone.
    """
    found = []
    seen: set[tuple[int, int]] = set()
    for manifest_path in _manifests(folders):
        try:
            identity = os.lstat(manifest_path)
        except OSError:
            continue
        if (identity.st_dev, identity.st_ino) in seen:  # one folder given twice, or inside another
            continue
        seen.add((identity.st_dev, identity.st_ino))
        manifest = _small_json(manifest_path)
        if not isinstance(manifest, dict) or manifest.get("status") != "done":
            continue
        outputs = manifest.get("outputs")
        candidates = list(outputs) if isinstance(outputs, list) else []
        stages = manifest.get("stages")
        for stage in stages if isinstance(stages, list) else []:  # `keep: all` published earlier images too
            kept = _field({"s": stage}, "s").get("outputs")
            candidates += kept if isinstance(kept, list) else []
        for output in candidates:
            mark = _field(_field(output, "watermark"), "invisible")
            if mark.get("method") != "tiled" or mark.get("mark_id") != mark_id or mark.get("payload") != payload:
                continue
            name = output.get("file")
            # Only a file beside the manifest, by its plain name: a manifest is data, not a path to follow.
            if not isinstance(name, str) or not name or PurePath(name).name != name or name in (".", ".."):
                continue
            original = manifest_path.parent / name
            digest = _plain_file_sha256(original)
            present = digest is not None and digest == output.get("sha256")
            found.append(
                {
                    "manifest": str(manifest_path),
                    "job_id": manifest.get("job_id"),
                    "image": str(original),
                    "sha256": output.get("sha256"),
                    "present": present,
                    "c2pa": _original_credentials(original, mark) if present else None,
                }
            )
    return found


def _field(value: Any, key: str) -> dict[str, Any]:
    """`value[key]` when both are dicts, else an empty dict (a foreign or damaged manifest)."""
    inner = value.get(key) if isinstance(value, dict) else None
    return inner if isinstance(inner, dict) else {}


def _manifests(folders: Iterable[Path]) -> Iterable[Path]:
    """`*.json` files under `folders` (no links followed), not the `.failed.json` records or sidecars."""
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.endswith(".json") and not name.endswith(".failed.json") and not name.startswith("."):
                    yield Path(root) / name


def _small_json(path: Path) -> Any:
    """A plain file's JSON, or None (a link, a FIFO, too large, unreadable or not JSON)."""
    with _plain_file(path) as file:
        try:
            data = file.read(_MANIFEST_MAX_BYTES + 1) if file else b""
        except OSError:
            return None
    if not data or len(data) > _MANIFEST_MAX_BYTES:
        return None
    try:
        return json.loads(data)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; "[[[[..." recurses
        return None


def _plain_file_sha256(path: Path) -> str | None:
    """The sha256 of a plain file (not a link, FIFO or device), or None."""
    from diffusiond.pipeline.hashing import stream_sha256

    with _plain_file(path) as file:
        try:
            return stream_sha256(file) if file else None
        except OSError:
            return None


@contextlib.contextmanager
def _plain_file(path: Path) -> Iterator[BinaryIO | None]:
    """`path` open for reading if it is a regular file (opened without following a link or blocking on a
    FIFO: a folder given to inspect is anybody's), else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        yield None
        return
    with os.fdopen(fd, "rb") as file:
        yield file if stat.S_ISREG(os.fstat(fd).st_mode) else None


def _original_credentials(original: Path, mark: dict[str, Any]) -> dict[str, Any] | None:
    """The original's C2PA state and signer, and whether its soft binding holds the mark's bits."""
    from diffusiond.pipeline import c2pa_sign

    fmt = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}.get(original.suffix.lower())
    if fmt is None or not c2pa_sign.available():
        return None
    try:
        manifest = c2pa_sign.read_manifest(original.read_bytes(), fmt)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if manifest is None:
        return None
    expected = c2pa_sign.soft_binding_value(mark)
    bindings = c2pa_sign.soft_bindings(manifest)
    signature = manifest.get("signature_info") or {}
    return {
        "state": manifest.get("validation_state"),
        "signer": signature.get("common_name") or signature.get("issuer"),
        "issuer": signature.get("issuer"),
        "soft_binding": any(
            b["alg"] == c2pa_sign.SOFT_BINDING_ALG.format(method="tiled") and b["value"] == expected for b in bindings
        ),
    }


def _c2pa(path: Path, image_format: str | None) -> dict[str, Any] | None:
    """The active C2PA manifest's state and first action, or None (none there, or c2pa not installed)."""
    from diffusiond.pipeline import c2pa_sign

    fmt = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}.get(image_format or "")
    if fmt is None or not c2pa_sign.available():
        return None
    manifest = c2pa_sign.read_manifest(path.read_bytes(), fmt)
    if manifest is None:
        return None
    actions = [
        action
        for assertion in manifest.get("assertions", [])
        if str(assertion.get("label", "")).startswith("c2pa.actions")
        for action in assertion.get("data", {}).get("actions", [])
    ]
    return {
        "state": manifest.get("validation_state"),
        "failures": [
            item.get("code") if isinstance(item, dict) else item for item in manifest.get("validation_status", [])
        ],
        "action": actions[0].get("action") if actions else None,
        "digital_source_type": actions[0].get("digitalSourceType") if actions else None,
        "signer": (manifest.get("signature_info") or {}).get("common_name"),
        "soft_bindings": [
            {"alg": b["alg"], "name": b["name"], "value": b["value"].hex()} for b in c2pa_sign.soft_bindings(manifest)
        ],
    }


def _guarded(problems: list[str], what: str, read: Any) -> Any:
    """Run one reader; a broken part of a foreign file is reported, not fatal."""
    try:
        return read()
    except (ValueError, KeyError, TypeError, SyntaxError, OSError, struct.error) as exc:
        problems.append(f"{what}: {exc}")
        return None


def _exif_basics(image: Image.Image) -> dict[str, str] | None:
    exif = image.getexif()
    found = {}
    for key, tag in (("software", 0x0131), ("image_description", 0x010E)):
        value = exif.get(tag)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if value:
            found[key] = str(value).rstrip("\x00")
    return found or None


def _watermark_module() -> Any:
    """`diffusiond.pipeline.watermark`, or None when it cannot be imported.

    Imported here, not at the top: the module needs numpy, SciPy and OpenCV, which an
    install for reading metadata may lack.
    """
    try:
        from diffusiond.pipeline import watermark
    except ImportError:
        return None
    return watermark


def _decode_watermark(image: Image.Image, payloads: list[str]) -> dict[str, Any]:
    watermark = _watermark_module()
    if watermark is None:
        return {"status": "unavailable", "payloads": {}, "detail": "the watermark decoder is not installed"}
    try:
        decoded, tiled = watermark.decode_marks(image.convert("RGB"), known_payloads=payloads)
    except Exception as exc:  # a foreign module; its failure is reported, the metadata still printed
        return {"status": "error", "payloads": {}, "detail": f"{type(exc).__name__}: {exc}"}
    found = {str(method): (str(value) if value else None) for method, value in dict(decoded).items()}
    status = "found" if any(found.values()) else "not found"
    report: dict[str, Any] = {"status": status, "payloads": found, "detail": None}
    if tiled is not None:
        report["tiled"] = {
            "payload": tiled.payload,
            "mark_id": f"{tiled.mark_id:08x}",
            "scale": round(tiled.scale, 3),
            "flipped_bits": tiled.flipped_bits,
        }
    return report


def watermark_found(report: dict[str, Any]) -> bool:
    """Whether a diffusiond watermark payload was decoded from the image."""
    return report.get("watermark", {}).get("status") == "found"


def format_report(report: dict[str, Any]) -> str:
    """The human-readable form `diffusiond inspect` prints for one file."""
    lines = [f"{report['file']}: {report['format']} {report['size'][0]}x{report['size'][1]} {report['mode']}"]
    if not report["metadata"]:
        lines.append("  no metadata: no AUTOMATIC1111 parameters, no diffusiond record, no XMP source type")
    if report["parameters"]:
        lines.append("  parameters (AUTOMATIC1111 infotext):")
        lines += [f"    {line}" for line in report["parameters"].splitlines()]
    if report["record"] is not None:
        lines.append("  record (JSON):")
        lines += [f"    {line}" for line in json.dumps(report["record"], indent=2, ensure_ascii=False).splitlines()]
    xmp = report["xmp"]
    if xmp:
        source = xmp.get("digital_source_type")
        short = source.removeprefix(_SOURCE_TYPES) if source else "(none)"
        lines.append(f"  XMP digital source type: {short}" + (f" ({source})" if source and short != source else ""))
        if xmp.get("creator_tool"):
            lines.append(f"  XMP creator tool: {xmp['creator_tool']}")
    if report["exif"]:
        for key, value in report["exif"].items():
            first = value.splitlines()[0] if value else ""
            lines.append(f"  EXIF {key.replace('_', ' ')}: {first}")
    for problem in report["problems"]:
        lines.append(f"  unreadable part: {problem}")
    if report.get("c2pa"):
        c2pa = report["c2pa"]
        failures = ", ".join(c2pa["failures"]) or "none"
        signer = f", signed by {c2pa['signer']}" if c2pa.get("signer") else ""
        lines.append(f"  C2PA: {c2pa['state']} ({c2pa['action']}{signer}; failed checks: {failures})")
        for binding in c2pa.get("soft_bindings", []):
            lines.append(f"  C2PA soft binding: {binding['alg']} = {binding['value']} ({binding['name']})")
    mark = report["watermark"]
    if mark["status"] in ("unavailable", "error"):
        lines.append(f"  watermark: {mark['status']} ({mark['detail']})")
    else:
        decoded = ", ".join(f"{m}: {v!r}" if v else f"{m}: none" for m, v in mark["payloads"].items())
        lines.append(f"  watermark: {mark['status']}" + (f" ({decoded})" if decoded else ""))
    if mark.get("tiled"):
        tiled = mark["tiled"]
        how = f"frame scale {tiled['scale']}" + (
            f", {tiled['flipped_bits']} bit(s) corrected" if tiled["flipped_bits"] else ""
        )
        lines.append(f"  tiled mark id: {tiled['mark_id']} ({how})")
    for match in report.get("credentials", []):
        lines.append(f"  made by diffusiond: job {match['job_id']}, manifest {match['manifest']}")
        if not match["present"]:
            lines.append(f"    its image {match['image']} is not there (or changed): no credentials to show")
        elif match["c2pa"] is None:
            lines.append(f"    original {match['image']}: no C2PA credentials")
        else:
            c2pa = match["c2pa"]
            bound = "their soft binding names this mark" if c2pa["soft_binding"] else "no soft binding to this mark"
            lines.append(
                f"    credentials: C2PA {c2pa['state']}, signed by {c2pa['signer']}; {bound} ({match['image']})"
            )
    if mark.get("tiled") and "credentials" in report and not report["credentials"]:
        lines.append("  no manifest found for this mark id (give the outbox with --credentials DIR)")
    return "\n".join(lines)
