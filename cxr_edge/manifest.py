"""Manifests: the JSON sidecar that travels with every model and artifact.

``<artifact>.manifest.json`` records what the file is (its sha256), what it expects (classes,
preprocessing) and where it came from (recipe, data fingerprint, toolchain versions). Loading
verifies the hash, so a swapped or half-copied file is refused instead of silently used.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import ManifestError
from .machine import toolchain_versions

SCHEMA_VERSION = 1


class Manifest(Mapping[str, Any]):
    """An artifact's manifest, read-only: typed accessors for what the code relies on, a Mapping for the rest.

    Frozen, because a manifest is evidence (hash, gate, signer): nothing downstream may edit the copy
    it was handed and pass it on as the artifact's. Values are returned as copies, so nested dicts
    cannot be changed through it either; :meth:`with_fields` makes a new one for the few places that
    describe something the file does not (a remote Triton model, a Keras model's implicit outputs).
    """

    __slots__ = ("_doc",)

    def __init__(self, doc: Mapping[str, Any]):
        object.__setattr__(self, "_doc", copy.deepcopy(dict(doc)))

    def __setattr__(self, name, value):
        raise AttributeError("Manifest is read-only; use with_fields() for a changed copy")

    def __getitem__(self, key: str) -> Any:
        value = self._doc[key]
        return copy.deepcopy(value) if isinstance(value, (dict, list)) else value

    def __iter__(self) -> Iterator[str]:
        return iter(self._doc)

    def __len__(self) -> int:
        return len(self._doc)

    def __repr__(self) -> str:
        return f"Manifest({self._doc.get('file')!r}, precision={self.precision!r}, sha256={str(self.sha256)[:12]}...)"

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._doc)

    def with_fields(self, **fields: Any) -> Manifest:
        return Manifest({**self._doc, **fields})

    # ---- what the code reads, typed, with the defaults the exporter implies
    @property
    def sha256(self) -> str | None:
        return self._doc.get("sha256")

    @property
    def classes(self) -> list[str]:
        return list(self._doc["classes"])

    @property
    def preprocess(self) -> dict[str, Any]:
        return dict(self._doc["preprocess"])

    @property
    def precision(self) -> str:
        return self._doc.get("precision") or "fp32"

    @property
    def format(self) -> str | None:
        return self._doc.get("format")

    @property
    def kind(self) -> str | None:
        return self._doc.get("kind")

    @property
    def recipe(self) -> str | None:
        return self._doc.get("recipe")

    @property
    def operating_point(self) -> dict[str, Any]:
        return dict(self._doc.get("operating_point") or {})

    @property
    def threshold(self) -> float | None:
        """The COVID threshold chosen on validation (None: argmax decides)."""
        t = self.operating_point.get("threshold")
        return None if t is None else float(t)

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self._doc.get("outputs") or [{"name": "probs"}]]

    @property
    def gradcam(self) -> dict[str, Any]:
        return copy.deepcopy(self._doc.get("gradcam") or {})

    @property
    def gate(self) -> dict[str, Any]:
        return copy.deepcopy(self._doc.get("gate") or {})

    @property
    def gate_failed(self) -> bool:
        """True only when the export gate ran and failed (kept with --force); missing gate is not failure."""
        return self.gate.get("passed") is False

    @property
    def source_model(self) -> dict[str, Any]:
        return dict(self._doc.get("source_model") or {})

    @property
    def data(self) -> dict[str, Any]:
        return copy.deepcopy(self._doc.get("data") or {})

    @classmethod
    def read(cls, artifact: str | Path, verify: bool = True) -> Manifest:
        return read_manifest(artifact, verify)


#: manifests cxr-edge writes are a few kB; a larger one is not ours
MAX_MANIFEST_BYTES = 4 * 1024 * 1024


def _check_types(doc: dict, path: Path) -> None:
    """The fields the code relies on have the types it relies on: a malformed manifest is a ManifestError
    naming the field, never a TypeError deep inside a backend."""
    def bad(field: str, want: str) -> ManifestError:
        return ManifestError(f"Manifest {path}: {field} must be {want}, got {type(doc.get(field)).__name__}.")

    sha = doc["sha256"]
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        raise bad("sha256", "64 lower-case hex digits")
    classes = doc["classes"]
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) and c for c in classes)
            and len(set(classes)) == len(classes)):
        raise bad("classes", "a list of at least two distinct names")
    if not isinstance(doc["preprocess"], dict):
        raise bad("preprocess", "an object")
    from .errors import ConfigError
    from .preprocess import PreprocessSpec

    try:
        PreprocessSpec.from_dict(doc["preprocess"])
    except (ConfigError, TypeError, ValueError) as exc:
        raise ManifestError(f"Manifest {path}: preprocess is not usable ({exc}).") from None
    for field in ("operating_point", "gradcam", "gate", "source_model", "data", "external_data"):
        if doc.get(field) is not None and not isinstance(doc[field], dict):
            raise bad(field, "an object")
    t = (doc.get("operating_point") or {}).get("threshold")
    if t is not None and not (isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t <= 1):
        raise ManifestError(f"Manifest {path}: operating_point.threshold must be a number in [0, 1], got {t!r}.")
    temp = doc.get("probability_temperature")
    if temp is not None and not (isinstance(temp, (int, float)) and not isinstance(temp, bool) and 0.01 <= temp <= 100):
        raise ManifestError(f"Manifest {path}: probability_temperature must be a number in [0.01, 100], got {temp!r}.")
    mv = doc.get("manifest_version")
    if mv is not None and not (isinstance(mv, int) and not isinstance(mv, bool) and mv >= 1):
        raise bad("manifest_version", "a positive integer")
    outputs = doc.get("outputs")
    if outputs is not None and not (isinstance(outputs, list) and all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                                       for o in outputs)):
        raise bad("outputs", "a list of objects with a name")
    for field in ("format", "kind", "precision", "recipe", "file"):
        if doc.get(field) is not None and not isinstance(doc[field], str):
            raise bad(field, "a string")


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


def read_verified_bytes(artifact: str | Path, manifest: Mapping[str, Any]) -> bytes:
    """The artifact's bytes, read once and hashed: the runtime is given these, never the path again, so a file
    swapped after the check cannot be what runs (a swap between hashing the path and ONNX Runtime reopening it
    once served an unsigned model)."""
    data = Path(artifact).read_bytes()
    _check_sha256(artifact, hashlib.sha256(data).hexdigest(), manifest["sha256"])
    return data


def _check_sha256(artifact: str | Path, actual: str, expected: str) -> None:
    if actual != expected:
        raise ManifestError(
            f"{artifact} does not match its manifest: sha256 is {actual[:16]}..., manifest says "
            f"{expected[:16]}.... The file was modified or replaced; re-export it or restore the original."
        )


def read_manifest(artifact: str | Path, verify: bool = True, data: bytes | None = None) -> Manifest:
    """Read and check the sidecar of ``artifact``; with ``verify`` the file's sha256 must match.

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
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise ManifestError(
            f"Manifest {path} has schema_version {doc.get('schema_version')!r}; this cxr-edge reads {SCHEMA_VERSION}."
        )
    for key in ("sha256", "classes", "preprocess"):
        if key not in doc:
            raise ManifestError(f"Manifest {path} lacks the required field {key!r}.")
    _check_types(doc, path)
    if verify:
        _check_sha256(artifact, sha256_file(artifact), doc["sha256"])
    return Manifest(doc)
