"""C2PA content credentials: signing real PNG, JPEG and WebP files with a throwaway certificate chain.

The chain (an EC P-256 root CA and a leaf with digitalSignature and the emailProtection EKU,
which c2pa-rs requires of a signing certificate) is made here; its root is in no trust list,
so readers say `signingCredential.untrusted`, and everything else must check.
"""

from __future__ import annotations

import datetime as dt
import io
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, PngImagePlugin

from diffusiond import __version__
from diffusiond.pipeline import c2pa_sign
from diffusiond.pipeline.c2pa_sign import C2paConfig, read_manifest, sign

if not c2pa_sign.available():
    pytest.skip("c2pa-python is not installed (the optional `c2pa` extra)", allow_module_level=True)

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
COMPOSITE = "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"
PARAMETERS = "a red fox in snow\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 64x64"
USER_COMMENT = b"UNICODE\x00" + PARAMETERS.encode("utf-16-be")


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "diffusiond tests"),
        ]
    )


def _usage(*, sign_certs: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not sign_certs,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=sign_certs,
        crl_sign=sign_certs,
        encipher_only=False,
        decipher_only=False,
    )


def _certificate(
    subject: str, key: Any, issuer: x509.Name, issuer_key: Any, *, ca: bool, eku: bool = True
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(_usage(sign_certs=ca), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if not ca:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())
        builder = builder.add_extension(aki, critical=False)
    if not ca and eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_chain(folder: Path) -> tuple[Path, Path, bytes]:
    """A throwaway chain: chain.pem (leaf, then root), signer.key, and the root's PEM for a trust list."""
    folder.mkdir(parents=True, exist_ok=True)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _certificate("diffusiond test root", root_key, _name("diffusiond test root"), root_key, ca=True)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = _certificate("diffusiond test signer", leaf_key, root.subject, root_key, ca=False)
    (folder / "chain.pem").write_bytes(_pem(leaf) + _pem(root))
    (folder / "signer.key").write_bytes(_key_pem(leaf_key))
    return folder / "chain.pem", folder / "signer.key", _pem(root)


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> tuple[C2paConfig, bytes]:
    """A signer config (leaf + root in the chain file) and the root's PEM, for a trust list."""
    cert_chain, key, root = make_chain(tmp_path_factory.mktemp("c2pa"))
    return C2paConfig(cert_chain=cert_chain, private_key=key), root


def _image() -> Image.Image:
    image = Image.new("RGB", (64, 64))
    image.putdata([(x * 4, y * 4, 128) for y in range(64) for x in range(64)])
    return image


def _encoded(fmt: str) -> bytes:
    """A small image with its generation parameters already written, as `encode()` leaves it."""
    buffer = io.BytesIO()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", PARAMETERS)
        _image().save(buffer, "PNG", pnginfo=info)
    else:
        exif = Image.Exif()
        exif.get_ifd(0x8769)[0x9286] = USER_COMMENT  # Exif IFD, UserComment
        _image().save(buffer, fmt.upper(), exif=exif, quality=90)
    return buffer.getvalue()


def _written_parameters(data: bytes, fmt: str) -> str | bytes | None:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if fmt == "png":
            return image.text.get("parameters")
        return image.getexif().get_ifd(0x8769).get(0x9286)


def _failure_codes(manifest: dict[str, Any]) -> set[str]:
    return {status["code"] for status in manifest["validation_status"]}


def _flip_pixel_byte(data: bytes, fmt: str) -> bytes:
    """One byte of the compressed image data changed: PNG IDAT payload, JPEG entropy-coded scan."""
    changed = bytearray(data)
    if fmt == "png":
        offset = 8
        while True:
            (length,) = struct.unpack(">I", data[offset : offset + 4])
            if data[offset + 4 : offset + 8] == b"IDAT":
                at = offset + 8 + length // 2
                break
            offset += 12 + length
    else:
        sos = data.rindex(b"\xff\xda")  # the image's scan, after the manifest's thumbnail
        (header,) = struct.unpack(">H", data[sos + 2 : sos + 4])
        at = sos + 2 + header + 16
        while data[at] in (0xFF, 0xFE) or data[at - 1] == 0xFF:
            at += 1
    changed[at] ^= 0x01
    return bytes(changed)


def _created_actions(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        action
        for assertion in manifest["assertions"]
        if assertion["label"].startswith("c2pa.actions")
        for action in assertion["data"]["actions"]
        if action["action"] == "c2pa.created"
    ]


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_signed_file_carries_created_action_and_keeps_metadata(chain: tuple[C2paConfig, bytes], fmt: str) -> None:
    config, _ = chain
    data = _encoded(fmt)
    signed = sign(data, fmt, config=config, title=f"fox.{fmt}", source_type=TRAINED, composite=False)

    manifest = read_manifest(signed, fmt)
    assert manifest is not None
    assert manifest["title"] == f"fox.{fmt}"
    assert manifest["claim_generator_info"][0]["name"] == "diffusiond"
    assert manifest["claim_generator_info"][0]["version"] == __version__
    [created] = _created_actions(manifest)
    assert created["digitalSourceType"] == TRAINED
    assert created["softwareAgent"]["name"] == "diffusiond"
    assert manifest["signature_info"]["common_name"] == "diffusiond test signer"
    # Integrity holds; only trust fails, as the throwaway root is in no trust list.
    assert manifest["validation_state"] == "Valid"
    assert _failure_codes(manifest) == {"signingCredential.untrusted"}
    success = {s["code"] for s in manifest["validation_results"]["activeManifest"]["success"]}
    assert {"claimSignature.validated", "assertion.dataHash.match"} <= success
    # The metadata written before signing is still there, and the image still decodes.
    expected = PARAMETERS if fmt == "png" else USER_COMMENT
    assert _written_parameters(signed, fmt) == expected
    with Image.open(io.BytesIO(signed)) as image:
        assert image.size == (64, 64)


def test_trusted_when_the_root_is_a_trust_anchor(chain: tuple[C2paConfig, bytes]) -> None:
    config, root = chain
    signed = sign(_encoded("png"), "png", config=config, title="fox.png", source_type=TRAINED, composite=False)
    manifest = read_manifest(signed, "png", trust_anchors=root)
    assert manifest is not None
    assert manifest["validation_state"] == "Trusted"
    assert _failure_codes(manifest) == set()


def test_composite_source_type(chain: tuple[C2paConfig, bytes]) -> None:
    config, _ = chain
    signed = sign(_encoded("jpeg"), "jpeg", config=config, title="redrawn.jpg", source_type=COMPOSITE, composite=True)
    manifest = read_manifest(signed, "jpeg")
    assert manifest is not None
    [created] = _created_actions(manifest)
    assert created["digitalSourceType"] == COMPOSITE
    assert "input image" in created["description"]


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_one_changed_pixel_byte_is_a_hash_mismatch(chain: tuple[C2paConfig, bytes], fmt: str) -> None:
    config, _ = chain
    signed = sign(_encoded(fmt), fmt, config=config, title="fox", source_type=TRAINED, composite=False)
    manifest = read_manifest(_flip_pixel_byte(signed, fmt), fmt)
    assert manifest is not None
    assert manifest["validation_state"] == "Invalid"
    assert "assertion.dataHash.mismatch" in _failure_codes(manifest)


def test_metadata_written_after_signing_breaks_it(chain: tuple[C2paConfig, bytes]) -> None:
    """Why signing is the last step: re-saving with new metadata drops or invalidates the manifest."""
    config, _ = chain
    signed = sign(_encoded("png"), "png", config=config, title="fox.png", source_type=TRAINED, composite=False)
    chunk_type = b"tEXt"
    body = b"Comment\x00added later"
    chunk = struct.pack(">I", len(body)) + chunk_type + body + struct.pack(">I", zlib.crc32(chunk_type + body))
    end = signed.rindex(b"IEND") - 4
    manifest = read_manifest(signed[:end] + chunk + signed[end:], "png")
    assert manifest is not None
    assert manifest["validation_state"] == "Invalid"
    assert "assertion.dataHash.mismatch" in _failure_codes(manifest)


def test_unsigned_file_has_no_manifest() -> None:
    assert read_manifest(_encoded("png"), "png") is None
    assert read_manifest(_encoded("jpeg"), "jpeg") is None


def test_missing_or_bad_credentials_are_value_errors(chain: tuple[C2paConfig, bytes], tmp_path: Path) -> None:
    config, _ = chain
    data = _encoded("png")

    def attempt(**changes: Any) -> str:
        bad = C2paConfig(**{"cert_chain": config.cert_chain, "private_key": config.private_key, **changes})
        with pytest.raises(ValueError) as raised:
            sign(data, "png", config=bad, title="x", source_type=TRAINED, composite=False)
        return str(raised.value)

    assert "cannot be read" in attempt(private_key=tmp_path / "missing.key")
    assert "cannot be read" in attempt(cert_chain=tmp_path / "missing.pem")
    (tmp_path / "junk.key").write_text("not a key\n")
    assert "not a PEM file" in attempt(private_key=tmp_path / "junk.key")
    broken = tmp_path / "broken.key"
    broken.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    assert "signing failed" in attempt(private_key=broken)
    assert "not one of" in attempt(algorithm="md5")
    assert "signing failed" in attempt(algorithm="ps256")  # an EC key cannot make RSA-PSS signatures
    with pytest.raises(ValueError, match="cannot sign format"):
        sign(data, "gif", config=config, title="x", source_type=TRAINED, composite=False)


def test_certificates_c2pa_rejects_are_value_errors(tmp_path: Path) -> None:
    """c2pa-rs checks the signing certificate's profile when it signs: no EKU, or a self-signed one, fails."""
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _certificate("root", root_key, _name("root"), root_key, ca=True)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    no_eku = _certificate("no eku", leaf_key, root.subject, root_key, ca=False, eku=False)
    (tmp_path / "no-eku.pem").write_bytes(_pem(no_eku) + _pem(root))
    (tmp_path / "leaf.key").write_bytes(_key_pem(leaf_key))
    (tmp_path / "root.pem").write_bytes(_pem(root))
    (tmp_path / "root.key").write_bytes(_key_pem(root_key))
    for cert, key, why in [
        ("no-eku.pem", "leaf.key", "certificate is invalid"),
        ("root.pem", "root.key", "self-signed"),
    ]:
        config = C2paConfig(cert_chain=tmp_path / cert, private_key=tmp_path / key)
        with pytest.raises(ValueError, match=why):
            sign(_encoded("png"), "png", config=config, title="x", source_type=TRAINED, composite=False)
