"""What an image file says about how it was made, ours or another tool's (`diffusiond inspect`).

`inspect_image` reads, without trusting any of it: the AUTOMATIC1111 infotext
(and its parsed parts), diffusiond's JSON record, the XMP source type, creator
tool and description, EXIF Software/ImageDescription, and the invisible
watermark decoded with each known method. Nothing here needs torch.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from diffusiond.pipeline.metadata import parse_infotext, read_parameters, read_record, read_xmp

__all__ = ["UnreadableImage", "format_report", "inspect_image", "watermark_found"]

_SOURCE_TYPES = "http://cv.iptc.org/newscodes/digitalsourcetype/"


class UnreadableImage(Exception):
    """The file is missing, unreadable, or not an image Pillow can open."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


def inspect_image(path: str | Path) -> dict[str, Any]:
    """Everything the file says about its making, as a JSON-serialisable dict.

    Keys: `file`, `format`, `size` [w, h], `mode`, `metadata` (False when the image
    carries none of the below), `parameters` (infotext or None), `parsed`
    ({prompt, negative_prompt, settings} or None), `record` (dict or None),
    `xmp` ({digital_source_type, creator_tool, description} or None), `exif`
    ({software, image_description} or None), `problems` (what could not be read),
    `watermark` ({status: found | not found | unavailable | error, payloads, detail}).
    Raises UnreadableImage when the file cannot be opened as an image.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            return _inspect(path, image)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError, ValueError) as exc:
        # PIL raises SyntaxError/ValueError for some broken headers.
        raise UnreadableImage(f"{path}: cannot read as an image: {exc}", path=str(path)) from exc


def _inspect(path: Path, image: Image.Image) -> dict[str, Any]:
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
    report["watermark"] = _decode_watermark(image)

    # 6. C2PA content credentials, where c2pa-python is installed.
    report["c2pa"] = _guarded(problems, "C2PA", lambda: _c2pa(path, image.format))
    return report


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


def _watermark_decoder() -> Any:
    """`diffusiond.pipeline.watermark.decode_invisible`, or None when it cannot be imported.

    Imported here, not at the top: the module needs invisible-watermark and OpenCV,
    which an install for reading metadata may lack.
    """
    try:
        from diffusiond.pipeline import watermark
    except ImportError:
        return None
    return getattr(watermark, "decode_invisible", None)


def _decode_watermark(image: Image.Image) -> dict[str, Any]:
    decode = _watermark_decoder()
    if decode is None:
        return {"status": "unavailable", "payloads": {}, "detail": "the watermark decoder is not installed"}
    try:
        payloads = decode(image.convert("RGB"))
    except Exception as exc:  # a foreign module; its failure is reported, the metadata still printed
        return {"status": "error", "payloads": {}, "detail": f"{type(exc).__name__}: {exc}"}
    payloads = {str(method): (str(value) if value else None) for method, value in dict(payloads).items()}
    status = "found" if any(payloads.values()) else "not found"
    return {"status": status, "payloads": payloads, "detail": None}


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
        lines.append(f"  C2PA: {c2pa['state']} ({c2pa['action']}; failed checks: {failures})")
    mark = report["watermark"]
    if mark["status"] in ("unavailable", "error"):
        lines.append(f"  watermark: {mark['status']} ({mark['detail']})")
    else:
        decoded = ", ".join(f"{m}: {v!r}" if v else f"{m}: none" for m, v in mark["payloads"].items())
        lines.append(f"  watermark: {mark['status']}" + (f" ({decoded})" if decoded else ""))
    return "\n".join(lines)
