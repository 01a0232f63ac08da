"""Ed25519 signatures over artifact manifests: a kiosk runs only what its operator signed.

The sha256 in a manifest catches a damaged or half-copied file, but anyone who can swap the
artifact can also rewrite its manifest. A signature closes that gap: the operator signs the manifest
(which holds the artifact's sha256, and the Grad-CAM head's) with a private key kept off the box, and
the box is started with ``--trusted-key`` naming the public half. Signing the manifest rather than
the artifact keeps verification cheap: one hash of the artifact, which loading does anyway.

Files: ``<artifact>.manifest.json.sig`` (JSON: algorithm, key id, base64 signature). Keys are PEM
files (private key written with mode 0600). Needs the ``cryptography`` package (extra ``sign``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ManifestError
from .extras import require
from .manifest import manifest_path, read_manifest

if TYPE_CHECKING:  # cryptography is the optional ``sign`` extra, imported where keys are read
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

ALGORITHM = "ed25519"


class SignatureError(ManifestError):
    """A signature that is missing, malformed, from an untrusted key, or does not match."""


def signature_path(artifact: str | Path) -> Path:
    m = manifest_path(artifact)
    return m.with_name(m.name + ".sig")


@dataclass(frozen=True)
class TrustedKey:
    key_id: str
    source: str
    key: Ed25519PublicKey


def _serialization():
    require("cryptography")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return serialization, ed25519


def _key_id(public_key) -> str:
    serialization, _ = _serialization()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(stem: str | Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``STEM.key`` (private, mode 0600) and ``STEM.pub``; returns their paths."""
    serialization, ed25519 = _serialization()
    stem = Path(stem)
    priv_path, pub_path = stem.with_name(stem.name + ".key"), stem.with_name(stem.name + ".pub")
    if not overwrite and (priv_path.exists() or pub_path.exists()):
        raise SignatureError(f"{priv_path} or {pub_path} already exists; choose another name or pass overwrite.")
    stem.parent.mkdir(parents=True, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv_path, pub_path


def load_private_key(path: str | Path):
    serialization, ed25519 = _serialization()
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"Cannot read the private key {path}: {exc}") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 private key (cxr-edge keygen makes one).")
    return key


def load_trusted_keys(paths) -> list[TrustedKey]:
    """Public keys (PEM) the operator trusts; a bad file is an error, never silently skipped."""
    if not paths:
        return []
    serialization, ed25519 = _serialization()
    keys = []
    for p in paths or ():
        try:
            key = serialization.load_pem_public_key(Path(p).read_bytes())
        except (OSError, ValueError) as exc:
            raise SignatureError(f"Cannot read the trusted key {p}: {exc}") from exc
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise SignatureError(f"Trusted key {p} is not an Ed25519 public key.")
        keys.append(TrustedKey(_key_id(key), str(p), key))
    return keys


def sign_artifact(artifact: str | Path, private_key: str | Path) -> Path:
    """Sign the manifest of ``artifact`` (after checking it still matches the file)."""
    read_manifest(artifact, verify=True)  # never sign a file that already disagrees with its manifest
    key = load_private_key(private_key)
    message = manifest_path(artifact).read_bytes()
    doc = {"algorithm": ALGORITHM, "key_id": _key_id(key.public_key()),
           "signature": base64.b64encode(key.sign(message)).decode()}
    out = signature_path(artifact)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    from .bundle import is_bundle, refresh_index

    if is_bundle(Path(artifact).parent):  # the signature is part of the bundle from now on
        refresh_index(Path(artifact).parent)
    return out


def verify_artifact_signature(artifact: str | Path, trusted: list[TrustedKey], message: bytes | None = None) -> TrustedKey:
    """The trusted key that signed ``artifact``'s manifest, or :class:`SignatureError` saying why not.

    ``message``: the manifest bytes the caller read and will parse (read here when not given), so the bytes
    checked are the bytes used. The caller still verifies the artifact's sha256 against the manifest.
    """
    if not trusted:
        raise SignatureError("No trusted keys were given; pass --trusted-key PATH.pub.")
    require("cryptography")
    from cryptography.exceptions import InvalidSignature

    sig_file = signature_path(artifact)
    if not sig_file.is_file():
        raise SignatureError(
            f"{Path(artifact).name} is not signed ({sig_file.name} missing) and this service only runs signed "
            "artifacts (--trusted-key). Sign it where it was built: cxr-edge sign ARTIFACT --key KEY.key"
        )
    try:
        doc = json.loads(sig_file.read_text())
        signature = base64.b64decode(doc["signature"], validate=True)
        if doc.get("algorithm") != ALGORITHM:
            raise ValueError(f"algorithm {doc.get('algorithm')!r}, expected {ALGORITHM!r}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SignatureError(f"Signature file {sig_file} is malformed: {exc}") from exc
    if message is None:
        message = manifest_path(artifact).read_bytes()
    candidates = [k for k in trusted if k.key_id == doc.get("key_id")] or trusted
    for k in candidates:
        try:
            k.key.verify(signature, message)
            return k
        except InvalidSignature:
            continue
    raise SignatureError(
        f"The signature of {Path(artifact).name} does not verify against the trusted key(s) "
        f"{[k.key_id for k in trusted]} (signed by key id {doc.get('key_id')!r}): the manifest was changed after "
        "signing, or it was signed by a key this box does not trust. Re-sign with the operator's key."
    )
