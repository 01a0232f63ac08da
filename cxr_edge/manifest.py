"""Manifests: the JSON sidecar that travels with every model and artifact.

``<artifact>.manifest.json`` records what the file is (its sha256), what it expects (classes,
preprocessing) and where it came from (recipe, data fingerprint, toolchain versions). Loading
verifies the hash, so a swapped or half-copied file is refused instead of silently used.

This module handles the files: one writer (:func:`write_manifest`, which measures the file's facts itself), one
reader (:func:`read_manifest`, which migrates older schema versions step by step and returns the typed
:class:`~cxr_edge.manifest_schema.ArtifactManifest`), the size cap, the hash checks and the files a manifest names
beside its artifact. The fields and their checks live in :mod:`cxr_edge.manifest_schema`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .errors import ManifestError
from .manifest_schema import SCHEMA_VERSION, ArtifactFormat, ArtifactManifest, FieldError, Toolchain
from .precision import Precision

#: the name the runtime used before the manifest was typed; the same class
Manifest = ArtifactManifest

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "ArtifactManifest", "Manifest", "manifest_path", "migrate", "migrate_v1_to_v2",
           "migrate_v2_to_v3",
           "read_manifest", "read_manifest_bytes", "read_verified_bytes", "sha256_file", "sibling_file", "write_manifest"]


#: manifests cxr-edge writes are a few kB; a larger one is not ours
MAX_MANIFEST_BYTES = 4 * 1024 * 1024


def migrate_v1_to_v2(doc: dict[str, Any]) -> dict[str, Any]:
    """A schema-1 manifest (cxr-edge 0.1) as schema 2: what v1 readers assumed when a field was absent is written out.

    v1 left the defaults to its readers: a manifest without ``precision`` was FP32, and a Keras model's manifest
    named neither its ``format`` nor its ``outputs`` (the Keras backend added ``probs``, and ``features`` when the
    model names a Grad-CAM layer). Every other field has the same name and meaning in v2.
    """
    out = {**doc, "schema_version": 2}
    if out.get("precision") is None:
        out["precision"] = Precision.FP32.value
    if out.get("kind") == "keras-model":
        out.setdefault("format", ArtifactFormat.KERAS.value)
        if not out.get("outputs"):
            layer = out.get("last_conv_layer")
            out["outputs"] = [{"name": "probs"}] + ([{"name": "features"}] if layer else [])
    return out


def migrate_v2_to_v3(doc: dict[str, Any]) -> dict[str, Any]:
    """Schema 3 adds ``decode_gate`` (reduced-resolution decoding measured against full decoding). A v2 manifest
    has none, which means "not measured": the runtime then decodes at full resolution, as it must."""
    return {**doc, "schema_version": 3}


#: schema version -> the step that brings a manifest of that version one version up
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: migrate_v1_to_v2, 2: migrate_v2_to_v3}


def migrate(doc: dict[str, Any], where: object) -> dict[str, Any]:
    """``doc`` brought to :data:`SCHEMA_VERSION` one step at a time; a version this cxr-edge does not know is refused."""
    version = doc.get("schema_version")
    while version != SCHEMA_VERSION:
        step = MIGRATIONS.get(version) if isinstance(version, int) and not isinstance(version, bool) else None
        if step is None:
            raise ManifestError(
                f"Manifest {where} has schema_version {version!r}; this cxr-edge reads {SCHEMA_VERSION} (and migrates "
                f"{', '.join(map(str, sorted(MIGRATIONS)))}). Upgrade cxr-edge to read it, or re-export the artifact.")
        doc = step(doc)
        version = doc.get("schema_version")
    return doc


def manifest_path(artifact: str | Path) -> Path:
    p = Path(artifact)
    return p.with_name(p.name + ".manifest.json")


def sibling_file(artifact: str | Path, name: object, what: str) -> Path:
    """A file the manifest names beside its artifact, checked before anything reads it.

    It must be a bare file name (no path parts), and a regular file in the artifact's own folder (a
    link is followed only when it stays in that folder): a FIFO or a link to ``/dev/zero`` would block
    or never end a read, and a path elsewhere is not part of the artifact.
    """
    import stat

    artifact = Path(artifact)
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise ManifestError(f"Manifest of {artifact.name}: {what} {name!r} must be a file name beside the artifact.")
    path = artifact.parent / name
    try:
        real = path.resolve(strict=True)
        mode = real.stat().st_mode
    except (OSError, RuntimeError) as exc:
        raise ManifestError(f"The {what} {name} of {artifact.name} is missing ({exc}); copy it with the artifact.") from exc
    if real.parent != artifact.parent.resolve():
        raise ManifestError(f"The {what} {name} of {artifact.name} links outside the artifact's folder; refused.")
    if not stat.S_ISREG(mode):
        raise ManifestError(f"The {what} {name} of {artifact.name} is not a regular file; refused.")
    return path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _parse(doc: Mapping[str, Any], where: object) -> ArtifactManifest:
    """The typed manifest of a v2 JSON object; a bad field is a ManifestError saying which manifest and which field."""
    try:
        return ArtifactManifest.from_dict(doc)
    except FieldError as exc:
        raise ManifestError(f"Manifest {where}: {exc}.") from None


def write_manifest(artifact: str | Path, manifest: ArtifactManifest | Mapping[str, Any], *, name: str | None = None,
                   stamp: bool = True) -> Path:
    """Write the sidecar of the existing file ``artifact``; returns the sidecar's path.

    With ``stamp``, the file's facts (name, sha256, size, time, toolchain versions) are measured here and replace any
    the manifest carries, so a manifest always describes the bytes beside it; ``name`` is the name the file will have
    when it is written under a temporary one. Without ``stamp`` (a new revision of an existing manifest, the file
    untouched) its facts are kept and its sha256 must still match the file. A mapping is taken as the v2 JSON fields
    (tests write deliberately odd manifests this way) and checked like a typed manifest. The text is parsed back
    before it is written: a manifest a reader would refuse is never written.
    """
    artifact = Path(artifact)
    path = manifest_path(artifact)
    if not isinstance(manifest, ArtifactManifest):
        manifest = _parse({k: v for k, v in manifest.items() if k != "schema_version"}, f"for {artifact.name}")
    if stamp:
        manifest = dataclasses.replace(
            manifest, file=name or artifact.name, sha256=sha256_file(artifact), size_bytes=artifact.stat().st_size,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), versions=Toolchain.current())
    else:
        _check_sha256(artifact, sha256_file(artifact), manifest.sha256 or "(none)")
    text = json.dumps(manifest.to_dict(), indent=2, default=str) + "\n"
    _parse(json.loads(text), path)
    path.write_text(text)
    return path


def read_manifest_bytes(artifact: str | Path) -> bytes:
    """The sidecar's bytes, read once (bounded): what a signature is checked on is what gets parsed."""
    artifact = Path(artifact)
    path = manifest_path(artifact)
    if not path.is_file():
        raise ManifestError(
            f"{artifact} has no manifest ({path.name} expected beside it). Artifacts must be produced "
            "by cxr-edge train/export, which write one."
        )
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise ManifestError(f"Manifest {path} cannot be read: {exc}") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"Manifest {path} is over {MAX_MANIFEST_BYTES:,} bytes; not a manifest cxr-edge wrote.")
    return data


def read_verified_bytes(artifact: str | Path, manifest: ArtifactManifest) -> bytes:
    """The artifact's bytes, read once and hashed: the runtime is given these, never the path again, so a file
    swapped after the check cannot be what runs (a swap between hashing the path and ONNX Runtime reopening it
    once served an unsigned model)."""
    data = Path(artifact).read_bytes()
    _check_sha256(artifact, hashlib.sha256(data).hexdigest(), manifest.sha256 or "(none)")
    return data


def _check_sha256(artifact: str | Path, actual: str, expected: str) -> None:
    if actual != expected:
        raise ManifestError(
            f"{artifact} does not match its manifest: sha256 is {actual[:16]}..., manifest says "
            f"{expected[:16]}.... The file was modified or replaced; re-export it or restore the original."
        )


def read_manifest(artifact: str | Path, verify: bool = True, data: bytes | None = None) -> ArtifactManifest:
    """Read, migrate (:data:`MIGRATIONS`) and check the sidecar of ``artifact``; with ``verify`` the file's sha256
    must match.

    ``data``: the sidecar's bytes already read (and signature-checked) by the caller, parsed instead of the file.
    """
    artifact = Path(artifact)
    path = manifest_path(artifact)
    if data is None:
        data = read_manifest_bytes(artifact)
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: thousands of nested brackets
        raise ManifestError(f"Manifest {path} is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"Manifest {path} is a JSON {type(doc).__name__}, not an object.")
    doc = migrate(doc, path)
    for key in ArtifactManifest.REQUIRED_IN_FILES:
        if key not in doc:
            raise ManifestError(f"Manifest {path} lacks the required field {key!r}.")
    manifest = _parse(doc, path)
    if verify:
        _check_sha256(artifact, sha256_file(artifact), manifest.sha256 or "(none)")
    return manifest
