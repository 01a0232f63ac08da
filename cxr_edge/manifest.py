"""Manifests: the JSON sidecar that travels with every model and artifact.

``<artifact>.manifest.json`` records what the file is (its sha256), what it expects (classes,
preprocessing) and where it came from (recipe, data fingerprint, toolchain versions). Loading
verifies the hash, so a swapped or half-copied file is refused instead of silently used.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import platform
from pathlib import Path

from .errors import ManifestError

SCHEMA_VERSION = 1


def manifest_path(artifact: str | Path) -> Path:
    p = Path(artifact)
    return p.with_name(p.name + ".manifest.json")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def toolchain_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("cxr-edge", "tensorflow", "keras", "numpy", "opencv-python-headless", "onnx", "onnxruntime", "tf2onnx"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def write_manifest(artifact: str | Path, fields: dict) -> Path:
    """Write the sidecar for an existing artifact file, adding hash, size, versions and time."""
    artifact = Path(artifact)
    doc = {
        "schema_version": SCHEMA_VERSION,
        "file": artifact.name,
        "sha256": sha256_file(artifact),
        "size_bytes": artifact.stat().st_size,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": toolchain_versions(),
        **fields,
    }
    path = manifest_path(artifact)
    path.write_text(json.dumps(doc, indent=2, sort_keys=False, default=str) + "\n")
    return path


def read_manifest(artifact: str | Path, verify: bool = True) -> dict:
    """Read and check the sidecar of ``artifact``; with ``verify`` the file's sha256 must match."""
    artifact = Path(artifact)
    path = manifest_path(artifact)
    if not path.is_file():
        raise ManifestError(
            f"{artifact} has no manifest ({path.name} expected beside it). Artifacts must be produced "
            "by cxr-edge train/export, which write one."
        )
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"Manifest {path} is not valid JSON: {exc}") from exc
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise ManifestError(
            f"Manifest {path} has schema_version {doc.get('schema_version')!r}; this cxr-edge reads {SCHEMA_VERSION}."
        )
    for key in ("sha256", "classes", "preprocess"):
        if key not in doc:
            raise ManifestError(f"Manifest {path} lacks the required field {key!r}.")
    if verify:
        actual = sha256_file(artifact)
        if actual != doc["sha256"]:
            raise ManifestError(
                f"{artifact} does not match its manifest: sha256 is {actual[:16]}..., manifest says "
                f"{doc['sha256'][:16]}.... The file was modified or replaced; re-export it or restore the original."
            )
    return doc
