"""Artifact bundles: one folder (or one archive of it) holding everything a runtime needs for one model.

An artifact is several files (the model, its manifest, the Grad-CAM head the manifest names, a signature, earlier
manifest versions and the calibration reports behind them); a kiosk given some of them fails late and obscurely. A
bundle is a folder with those files and ``bundle.json``, an index of every file with its role and sha256, so a
bundle is checked whole when it is opened and a missing or changed piece is named. ``export``, ``build`` and
``calibrate`` write or refresh bundles; every command accepts a bundle folder, the model file inside one, or a
``.cxrbundle.tar`` archive of one (unpacked once into a cache keyed by the archive's sha256).

Trust stays with the manifest's Ed25519 signature (``signing``): the manifest holds the model's and the head's
sha256, so a signed manifest in a bundle covers what runs; the index adds completeness and integrity of the rest.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, ManifestError
from .manifest import MAX_MANIFEST_BYTES, manifest_path, read_manifest, sha256_file

log = logging.getLogger(__name__)

INDEX = "bundle.json"
FORMAT = "cxr-edge-bundle"
VERSION = 1
ARCHIVE_SUFFIX = ".cxrbundle.tar"
CALIBRATION_DIR = "calibration"
#: the suffixes of files that are models (what a bundle's "model" entry may be)
MODEL_SUFFIXES = (".onnx", ".plan", ".engine", ".keras", ".xml")
#: roles, in the words the messages use
ROLES = {"model": "the model", "manifest": "its manifest", "gradcam-head": "the Grad-CAM head",
         "signature": "the manifest's signature", "model-weights": "the model's weights",
         "manifest-history": "an earlier manifest version", "calibration": "a calibration report"}


@dataclass(frozen=True)
class BundleFile:
    name: str  # a path relative to the bundle folder, "/" separated
    role: str
    sha256: str
    size: int

    def to_dict(self) -> dict:
        return {"name": self.name, "role": self.role, "sha256": self.sha256, "size": self.size}


def _pieces(artifact: Path) -> list[tuple[Path, str, str]]:
    """(source path, name in the bundle, role) for every file that belongs with ``artifact``."""
    from .manifest import sibling_file

    m = read_manifest(artifact, verify=True)  # never bundle a model that disagrees with its manifest
    out = [(artifact, artifact.name, "model"), (manifest_path(artifact), manifest_path(artifact).name, "manifest")]
    head = getattr(getattr(m, "gradcam", None), "head_file", None)
    if head:
        p = sibling_file(artifact, head, "Grad-CAM head")
        out.append((p, p.name, "gradcam-head"))
    if artifact.suffix == ".xml" and artifact.with_suffix(".bin").is_file():  # OpenVINO IR: weights beside the graph
        out.append((artifact.with_suffix(".bin"), artifact.with_suffix(".bin").name, "model-weights"))
    sig = manifest_path(artifact).with_name(manifest_path(artifact).name + ".sig")
    if sig.is_file():
        out.append((sig, sig.name, "signature"))
    for old in sorted(artifact.parent.glob(f"{glob_escape(artifact.name)}.manifest.v*.json")):
        if _recorded_sha(old, "sha256") == m.sha256:  # an earlier export's history is not this model's
            out.append((old, old.name, "manifest-history"))
    in_bundle = is_bundle(artifact.parent)  # calibrate writes a bundle's reports under calibration/
    base = artifact.parent / CALIBRATION_DIR if in_bundle else artifact.parent
    reports = sorted(base.glob(f"calibration-{glob_escape(artifact.name)}-v*")) if base.is_dir() and not base.is_symlink() else []
    for rep in reports:
        if not _is_report_of(rep, m.sha256):
            continue
        prefix = rep.relative_to(artifact.parent).as_posix() if in_bundle else f"{CALIBRATION_DIR}/{rep.name}"
        out += [(f, f"{prefix}/{f.name}", "calibration") for f in sorted(rep.iterdir()) if f.is_file() and not f.is_symlink()]
    return out


def _recorded_sha(path: Path, key: str) -> str | None:
    try:
        doc = json.loads(path.read_bytes()[:MAX_MANIFEST_BYTES])
    except (OSError, ValueError, RecursionError):
        return None
    value = doc.get(key) if isinstance(doc, dict) else None
    return value if isinstance(value, str) else None


def _is_report_of(rep: Path, sha256: str | None) -> bool:
    """A calibration report of this model file (not of an earlier export under the same name), and not a dry run."""
    return (rep.is_dir() and not rep.is_symlink() and "-dry-run-" not in rep.name
            and _recorded_sha(rep / "calibration.json", "artifact_sha256") == sha256)


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def default_bundle_dir(artifact: str | Path) -> Path:
    """``<export folder>/bundles/<model file name>``: beside the export, one folder per artifact (by its whole name:
    ``model.fp16.onnx`` and the engine built from it, ``model.fp16.plan``, are two bundles)."""
    artifact = Path(artifact)
    return artifact.parent / "bundles" / artifact.name


def make_bundle(artifact: str | Path, out_dir: str | Path | None = None, *, replace: bool = False) -> Path:
    """Copy ``artifact`` and every file that belongs with it into ``out_dir`` and index them; returns the folder.

    Files are copied, never linked: an exporter that rewrites a model in place must not change a bundle already
    handed to a kiosk. An existing bundle of another model is refused; one of this model is replaced only with
    ``replace`` (export and build pass it: the bundle follows the artifact they just wrote)."""
    artifact = Path(artifact)
    out = Path(out_dir) if out_dir else default_bundle_dir(artifact)
    if (artifact.parent / INDEX).is_file() and out.resolve() == artifact.parent.resolve():
        return refresh_index(out)
    if out.exists() and any(out.iterdir()):
        idx = out / INDEX
        old_model = _read_index(out).get("model") if idx.is_file() else None
        if old_model != artifact.name:
            raise ConfigError(f"{out} already holds other files{f' (a bundle of {old_model})' if old_model else ''}; "
                              "choose an empty or new folder for the bundle.")
        if not replace:
            raise ConfigError(f"{out} already holds a bundle of {artifact.name}; pass --force to replace it.")
    pieces = _pieces(artifact)
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    try:
        for src, name, _role in pieces:
            dst = staging / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        _write_index(staging, artifact.name, [(name, role) for _src, name, role in pieces])
        if out.exists():
            _retire(out)
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out


def _dated(path: Path, tag: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate, k = path.with_name(f"{path.name}.{tag}-{stamp}"), 1
    while candidate.exists():
        candidate, k = path.with_name(f"{path.name}.{tag}-{stamp}.{k}"), k + 1
    return candidate


def _retire(out: Path) -> None:
    """Make room for a new bundle: one that holds a site's calibration is kept under a dated name (its evidence and
    threshold are not ours to delete); a plain one is removed."""
    idx = _read_index(out) if (out / INDEX).is_file() else {"files": []}
    if any(f["role"] in ("calibration", "manifest-history") for f in idx["files"]):
        kept = _dated(out, "previous")
        os.replace(out, kept)
        log.warning("%s held a site calibration; it is kept as %s", out, kept)
    else:
        shutil.rmtree(out)


def _write_index(folder: Path, model: str, files: Iterable[tuple[str, str]]) -> Path:
    entries = [BundleFile(name, role, sha256_file(folder / name), (folder / name).stat().st_size).to_dict()
               for name, role in files]
    doc = {"format": FORMAT, "version": VERSION, "model": model,
           "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "files": entries}
    tmp = folder / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, folder / INDEX)
    return folder / INDEX


def refresh_index(folder: str | Path) -> Path:
    """Re-index a bundle after a command changed it in place (calibrate's new manifest version and report, sign's
    signature); returns the folder. Files the index listed must still be there: refreshing never hides a loss."""
    folder = Path(folder)
    doc = _read_index(folder)
    model = folder / doc["model"]
    check_bundle(folder, hashes=False)
    pieces = _pieces(model)
    _write_index(folder, model.name, [(name, role) for _src, name, role in pieces])
    return folder


def _read_index(folder: Path) -> dict:
    path = folder / INDEX
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
        doc = json.loads(data)
    except OSError as exc:
        raise ManifestError(f"The bundle index {path} cannot be read: {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise ManifestError(f"The bundle index {path} is not valid JSON ({str(exc)[:120]}): re-make the bundle with "
                            "cxr-edge bundle.") from None
    if len(data) > MAX_MANIFEST_BYTES or not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ManifestError(f"{path} is not a cxr-edge bundle index (format {FORMAT!r} expected).")
    if doc.get("version") != VERSION:
        raise ManifestError(f"{path} is bundle format version {doc.get('version')!r}; this cxr-edge reads {VERSION}: "
                            "upgrade cxr-edge or re-make the bundle.")
    files = doc.get("files")
    model = doc.get("model")
    if not isinstance(files, list) or not isinstance(model, str) or not _safe_name(model):
        raise ManifestError(f"{path} has no usable 'model' and 'files' entries; re-make the bundle.")
    for f in files:
        if not (isinstance(f, dict) and isinstance(f.get("name"), str) and _safe_name(f["name"])
                and isinstance(f.get("sha256"), str) and isinstance(f.get("role"), str)):
            raise ManifestError(f"{path} lists a file entry that is not a plain name inside the bundle: {str(f)[:120]}.")
    return doc


def _safe_name(name: str) -> bool:
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and all(p not in ("", ".", "..") and "\\" not in p for p in parts)


def is_bundle(path: str | Path) -> bool:
    return (Path(path) / INDEX).is_file()


def check_bundle(folder: str | Path, hashes: bool = True) -> Path:
    """The bundle's model file, after checking every indexed file is present (and, with ``hashes``, unchanged).

    One :class:`ManifestError` names every missing or changed piece and what it is, so "copy the whole folder" is
    said once with the list, not discovered one restart at a time."""
    folder = Path(folder)
    doc = _read_index(folder)
    missing, changed = [], []
    for f in doc["files"]:
        p = folder / f["name"]
        what = f"{f['name']} ({ROLES.get(f['role'], f['role'])})"
        if p.is_symlink():
            changed.append(f"{what}: a link, not a file")
        elif not p.is_file():
            missing.append(what)
        elif hashes and sha256_file(p) != f["sha256"]:
            changed.append(what)
    if missing:
        raise ManifestError(f"The bundle {folder} is incomplete: {', '.join(missing)} missing. Copy the whole bundle "
                            "folder (or its .cxrbundle.tar archive), not single files.")
    if changed:
        raise ManifestError(f"The bundle {folder} was changed after it was made: {', '.join(changed)} no longer match "
                            f"{INDEX}. Restore the bundle from its source, or re-make it with cxr-edge bundle.")
    if not any(f["name"] == doc["model"] and f["role"] == "model" for f in doc["files"]):
        raise ManifestError(f"{folder / INDEX} does not list its model {doc['model']} among its files; re-make the bundle.")
    return folder / doc["model"]


def cache_root() -> Path:
    env = os.environ.get("CXR_EDGE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cxr-edge"


def write_archive(folder: str | Path, archive: str | Path) -> Path:
    """One file to copy: the bundle folder as an uncompressed tar (models barely compress) with the index first."""
    folder, archive = Path(folder), Path(archive)
    check_bundle(folder)
    if not archive.name.endswith(ARCHIVE_SUFFIX):
        raise ConfigError(f"name the archive *{ARCHIVE_SUFFIX} (got {archive.name}), so every command knows it for one.")
    doc = _read_index(folder)
    tmp = archive.with_name(f".{archive.name}.tmp")
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in [INDEX, *(f["name"] for f in doc["files"])]:
            info = tar.gettarinfo(str(folder / name), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(folder / name, "rb") as fh:
                tar.addfile(info, fh)
    os.replace(tmp, archive)
    return archive


#: what an archive may hold before anything is written (a crafted header can declare any size): a ResNet152V2 bundle
#: with every precision is under 1 GB; CXR_EDGE_MAX_BUNDLE_BYTES raises the cap
MAX_ARCHIVE_MEMBERS = 4096
DEFAULT_MAX_BUNDLE_BYTES = 8 << 30


def is_archive(path: str | Path) -> bool:
    """A bundle archive, by name (what every command and every write refusal tests)."""
    return Path(path).name.endswith(ARCHIVE_SUFFIX)


def _max_bytes() -> int:
    try:
        return int(os.environ.get("CXR_EDGE_MAX_BUNDLE_BYTES", DEFAULT_MAX_BUNDLE_BYTES))
    except ValueError:
        return DEFAULT_MAX_BUNDLE_BYTES


def _checked_members(tar: tarfile.TarFile, archive: Path) -> list[tarfile.TarInfo]:
    """The members, refused as a whole when one is not a plain file or folder inside the bundle, or when together
    they would be larger than the cap (checked on the headers, before a byte is written)."""
    members: list[tarfile.TarInfo] = []
    total = 0
    for m in tar:
        members.append(m)
        if len(members) > MAX_ARCHIVE_MEMBERS:
            raise ManifestError(f"{archive.name} holds over {MAX_ARCHIVE_MEMBERS} entries; a bundle has a few. Refused.")
        if not (m.isreg() or m.isdir()) or m.issparse() or not _safe_name(m.name.rstrip("/")):
            raise ManifestError(f"{archive.name} holds an entry a bundle never has ({m.name!r}: a link, a device, a sparse "
                                "file or a name outside the bundle). Refused.")
        total += max(0, m.size)
        if total > _max_bytes():
            raise ManifestError(f"{archive.name} declares more than {_max_bytes():,} bytes of content; refused "
                                "(CXR_EDGE_MAX_BUNDLE_BYTES raises the cap for a larger model).")
    return members


def unpack_archive(archive: str | Path) -> Path:
    """The bundle folder of ``archive``, unpacked once under the cache (keyed by the archive's sha256) and checked.

    Only an uncompressed tar of regular files with plain relative names, within the size cap, is taken (tarfile's
    ``data`` filter, and checks of our own on the headers first): an archive is input from elsewhere. The cache is
    keyed by content, so two processes unpacking the same archive at once keep whichever copy landed first, and a
    cached copy that no longer matches its index is unpacked again."""
    archive = Path(archive)
    if not archive.is_file():
        raise ConfigError(f"bundle archive {archive} does not exist: check the path.")
    digest = sha256_file(archive)
    dest = cache_root() / "bundles" / digest[:32]
    if (dest / INDEX).is_file():
        try:
            check_bundle(dest)
            return dest
        except ManifestError as exc:  # the cached copy was changed on disk: the archive itself is the truth
            log.warning("the unpacked copy of %s no longer matches its index (%s); unpacking it again", archive.name, exc)
            shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        try:
            with tarfile.open(archive, "r:") as tar:
                members = _checked_members(tar, archive)
                tar.extractall(staging, members=members, filter="data")
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ManifestError(f"{archive.name} is not a readable bundle archive ({exc}): it is damaged, compressed or "
                                "not a bundle; copy it again from where it was made.") from None
        try:
            check_bundle(staging)
        except ManifestError as exc:
            raise ManifestError(f"{archive.name} does not match its own index: it is damaged or was altered; copy it "
                                f"again from where it was made. ({str(exc).split(': ', 1)[-1]})") from None
        try:
            os.replace(staging, dest)
        except OSError:
            if not (dest / INDEX).is_file():  # not another process's finished copy of the same content
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return dest


def bundle_of(path: str | Path) -> Path | None:
    """The bundle folder ``path`` is or lies in (an archive is unpacked), or None for a plain artifact."""
    p = Path(path)
    if is_archive(p):
        return unpack_archive(p)
    if p.is_dir() and is_bundle(p):
        return p
    if p.is_file() and is_bundle(p.parent) and p.suffix in MODEL_SUFFIXES:
        return p.parent
    return None


def resolve(path: str | Path) -> Path:
    """The model file to run for ``path``: a bundle (folder, archive, or its model file) is checked whole first;
    anything else is returned as given, for the caller's own checks."""
    folder = bundle_of(path)
    if folder is None:
        return Path(path)
    model = check_bundle(folder)
    p = Path(path)
    if p.is_file() and p.parent == folder and p.name != model.name:
        raise ConfigError(f"{p.name} is not the model of the bundle {folder} (its model is {model.name}).")
    return model


def describe(folder: str | Path) -> str:
    """One line per file, for ``cxr-edge bundle``'s output."""
    doc = _read_index(Path(folder))
    def size(f) -> str:
        return f"{f['size']:,} bytes" if isinstance(f.get("size"), int) else "size not recorded"

    return "\n".join(f"  {f['name']:48s} {ROLES.get(f['role'], f['role'])}, {size(f)}" for f in doc["files"])

