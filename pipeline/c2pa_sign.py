"""Optional C2PA content credentials (c2pa-python): a signed manifest embedded in the image file.

Signing comes last, on the bytes `encode()` wrote: the manifest's data hash covers the
whole file except the manifest itself, so metadata written afterwards would break it.
The manifest says the image was made (`c2pa.created`) by diffusiond, with the IPTC
digital source type the caller gives (trainedAlgorithmicMedia for txt2img). When the image
carries an invisible mark that verified, the manifest also says so (`c2pa.watermarked.bound`)
and binds itself to the mark (`c2pa.soft-binding`, C2PA 2.4 section 18.10): the algorithm,
and the bits the mark holds, so a copy stripped of its metadata can be tied back to these
credentials by reading the mark (`diffusiond inspect`). The algorithm names are ours
(`io.github.diffusiond.<method>.1`): the C2PA list of soft-binding algorithms recommends
registered names, and c2pa-rs accepts any. c2pa-rs takes the block's value as a base64 string
(its JSON definitions cannot write the CBOR byte string the spec asks for: c2pa-rs issue 2689).

No timestamp authority is asked by default (the daemon runs offline), so the signature
is only as good as the certificate's validity period. A reader without the signer's
root in its trust list reports `signingCredential.untrusted`; that is a trust verdict,
not damage: the hashes and the signature still check (validation_state "Valid").
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffusiond import __version__

try:
    import c2pa as _c2pa
except ImportError:  # the optional extra is not installed
    _c2pa = None

MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "jpg": "image/jpeg", "webp": "image/webp"}
ALGORITHMS = ("es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519")
CREATED = "c2pa.created"
WATERMARKED = "c2pa.watermarked.bound"
SOFT_BINDING = "c2pa.soft-binding"
SOFT_BINDING_ALG = "io.github.diffusiond.{method}.1"
_IPTC_CODES = "http://cv.iptc.org/newscodes/digitalsourcetype/"
TRAINED = _IPTC_CODES + "trainedAlgorithmicMedia"
COMPOSITE = _IPTC_CODES + "compositeWithTrainedAlgorithmicMedia"


@dataclass(frozen=True)
class C2paConfig:
    """The signer: a PEM certificate chain (leaf first, then intermediates) and its PEM private key."""

    cert_chain: Path
    private_key: Path
    algorithm: str = "es256"
    tsa_url: str | None = None
    """A timestamp authority (RFC 3161) URL; none by default, as the daemon has no network."""
    thumbnail: bool = False
    """Embed the thumbnail Content Credentials viewers show. Off: c2pa-rs keeps images up to 1024 px at
    full size, so for diffusiond's outputs it is a second copy of the image (a 512 px noisy PNG grew by
    0.9 MB, a WebP by 2.4 MB); without it the manifest adds about 3 KB."""


def available() -> bool:
    """Whether c2pa-python can be imported (the `c2pa` extra)."""
    return _c2pa is not None


def _mime(fmt: str) -> str:
    try:
        return MIME_TYPES[fmt.lower()]
    except KeyError:
        raise ValueError(f"C2PA: cannot sign format {fmt!r}; one of png, jpeg, webp") from None


def _read_pem(path: Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"C2PA {what} {str(path)!r} cannot be read: {e.strerror or e}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"C2PA {what} {str(path)!r} is not a PEM file (no -----BEGIN line)")
    return data


def _require() -> Any:
    if _c2pa is None:
        raise ValueError("C2PA signing is configured but c2pa-python is not installed (pip install 'diffusiond[c2pa]')")
    return _c2pa


def soft_binding_value(mark: dict[str, Any]) -> bytes:
    """The bits an invisible mark (a manifest's `watermark.invisible`) holds, as the soft binding records them."""
    from diffusiond.pipeline import watermark, watermark_tiled

    bits: Any
    if mark["method"] == "tiled":
        bits = watermark_tiled.frame_bits(mark["payload"], int(mark["mark_id"], 16))
    elif mark["method"] == "rivaGan":
        bits = watermark._fingerprint_bits(mark["payload"])
    else:
        bits = watermark.frame_bits(mark["payload"])
    return bytes(np.packbits(np.asarray(bits, dtype=np.uint8)))


def manifest_definition(
    *, title: str, source_type: str, composite: bool, mark: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The manifest diffusiond signs: `c2pa.created` with its digital source type; with a verified
    invisible `mark` (a manifest's `watermark.invisible`), `c2pa.watermarked.bound` and its soft binding."""
    source_type = source_type or (COMPOSITE if composite else TRAINED)
    agent = {"name": "diffusiond", "version": __version__}
    actions: list[dict[str, Any]] = [
        {
            "action": CREATED,
            "digitalSourceType": source_type,
            "softwareAgent": agent,
            "description": "made from an input image" if composite else "made from a text prompt",
        }
    ]
    assertions: list[dict[str, Any]] = [{"label": "c2pa.actions", "data": {"actions": actions}}]
    if mark is not None:
        described = f"{mark['method']} mark, payload {mark['payload']!r}" + (
            f", mark id {mark['mark_id']}" if mark.get("mark_id") else ""
        )
        actions.append({"action": WATERMARKED, "softwareAgent": agent, "description": f"invisible {described}"})
        value = base64.b64encode(soft_binding_value(mark)).decode("ascii")
        assertions.append(
            {
                "label": SOFT_BINDING,
                "data": {
                    "alg": SOFT_BINDING_ALG.format(method=mark["method"]),
                    "blocks": [{"scope": {}, "value": value}],  # an empty scope: the whole image
                    "name": f"diffusiond invisible watermark: {described}",
                },
            }
        )
    return {
        "claim_generator_info": [{"name": "diffusiond", "version": __version__}],
        "title": title,
        "assertions": assertions,
    }


def soft_bindings(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """A read manifest's soft bindings: each one's `alg`, `name` and `value` (the first block's, decoded bytes)."""
    found = []
    for assertion in manifest.get("assertions", []):
        if assertion.get("label") != SOFT_BINDING or not isinstance(assertion.get("data"), dict):
            continue
        data = assertion["data"]
        blocks = data.get("blocks")
        first = blocks[0] if isinstance(blocks, list) and blocks and isinstance(blocks[0], dict) else {}
        try:
            value = base64.b64decode(str(first.get("value", "")), validate=True)
        except ValueError:
            value = b""
        found.append({"alg": data.get("alg"), "name": data.get("name"), "value": value})
    return found


def sign(
    data: bytes,
    fmt: str,
    *,
    config: C2paConfig,
    title: str,
    source_type: str,
    composite: bool,
    mark: dict[str, Any] | None = None,
) -> bytes:
    """The file `data` (already with its metadata) with a signed C2PA manifest embedded.

    `mark` is the image's verified invisible mark (the manifest's `watermark.invisible`), or None.

    Raises ValueError for an unreadable certificate or key, an unknown algorithm, or any signing failure.
    """
    c2pa = _require()
    mime = _mime(fmt)
    algorithm = config.algorithm.lower()
    if algorithm not in ALGORITHMS:
        raise ValueError(f"C2PA algorithm {config.algorithm!r} is not one of {', '.join(ALGORITHMS)}")
    chain = _read_pem(config.cert_chain, "certificate chain")
    key = _read_pem(config.private_key, "private key")
    definition = manifest_definition(title=title, source_type=source_type, composite=composite, mark=mark)
    try:
        settings = c2pa.Settings.from_dict({"builder": {"thumbnail": {"enabled": config.thumbnail}}})
        context = c2pa.Context(settings)
        info = c2pa.C2paSignerInfo(algorithm, chain, key, config.tsa_url)
        with c2pa.Signer.from_info(info) as signer, c2pa.Builder(definition, context) as builder:
            out = io.BytesIO()
            builder.sign(signer, mime, io.BytesIO(data), out)
    except c2pa.C2paError as e:
        raise ValueError(
            f"C2PA signing failed with certificate {str(config.cert_chain)!r} and key {str(config.private_key)!r}: {e}"
        ) from e
    return out.getvalue()


def read_manifest(data: bytes, fmt: str, *, trust_anchors: bytes | str | None = None) -> dict[str, Any] | None:
    """The file's active C2PA manifest as a dict, or None when it carries none.

    Adds `validation_state` ("Invalid", "Valid", or "Trusted" when `trust_anchors`, PEM root
    certificates, include the signer's root) and `validation_status` (the failure codes, e.g.
    `signingCredential.untrusted`, `assertion.dataHash.mismatch`). Raises ValueError when the
    file cannot be parsed at all.
    """
    c2pa = _require()
    mime = _mime(fmt)
    try:
        context = None
        if trust_anchors is not None:
            pem = trust_anchors.decode() if isinstance(trust_anchors, bytes) else trust_anchors
            context = c2pa.Context(c2pa.Settings.from_dict({"trust": {"trust_anchors": pem}}))
        reader = c2pa.Reader.try_create(mime, io.BytesIO(data), None, context)
        if reader is None:
            return None
        with reader:
            store = json.loads(reader.json())
    except c2pa.C2paError as e:
        raise ValueError(f"C2PA manifest cannot be read: {e}") from e
    active = store.get("active_manifest")
    manifest = dict(store.get("manifests", {}).get(active) or {})
    manifest["validation_state"] = store.get("validation_state")
    manifest["validation_status"] = store.get("validation_status", [])
    manifest["validation_results"] = store.get("validation_results")
    return manifest
