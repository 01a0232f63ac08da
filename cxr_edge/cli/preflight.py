"""Checks a long-running command makes before it starts anything, so a wrong path or a busy port is one line with
the right exit code, not a traceback from inside the server's start-up after it has logged "ready".
"""

from __future__ import annotations

import socket
from pathlib import Path

from .. import bundle
from ..errors import ConfigError, ManifestError
from ..manifest import manifest_path, read_manifest, sibling_file

#: what an artifact is on disk, for the messages (README, "What to copy to the kiosk")
WHAT_TO_COPY = ("copy the bundle folder cxr-edge export wrote (OUT/bundles/MODEL_FILE) or its .cxrbundle.tar; a bare artifact "
                "is MODEL.onnx with MODEL.onnx.manifest.json beside it and the files its manifest names (the Grad-CAM "
                "head model.head.npz, a .sig signature)")

#: argument names that hold one artifact (checked whole) or several (bundles resolved; folders kept for the command)
ONE_ARTIFACT = ("artifact",)
MANY_ARTIFACTS = ("artifacts",)
#: commands that write beside the artifact (a new manifest version, a signature): never into an unpacked archive
WRITES_MANIFEST = ("calibrate", "sign", "decode-gate")


def artifact(path: str) -> str:
    """The artifact a command was given, checked whole: the file, its manifest, and the files the manifest names
    beside it. A folder holding exactly one artifact stands for it; URLs (triton://) pass through. A wrong path is
    a configuration error (exit 5); an artifact with a piece missing is an integrity error (exit 6)."""
    if "://" in path:
        return path
    p = Path(path)
    if bundle.bundle_of(p) is not None:  # a bundle folder, its model file, or an archive: checked whole by its index
        return str(bundle.resolve(p))
    if p.is_dir():
        found = sorted(f for f in p.iterdir() if f.is_file() and not f.name.endswith((".json", ".npz", ".sig"))
                       and manifest_path(f).is_file())
        if len(found) == 1:
            p = found[0]
        elif not found:
            raise ConfigError(f"{p} is a folder with no artifact in it: give the model file ({WHAT_TO_COPY}).")
        else:
            raise ConfigError(f"{p} is a folder with {len(found)} artifacts; give one of them: "
                              + ", ".join(f.name for f in found))
    if not p.exists():
        raise ConfigError(f"artifact {p} does not exist: check the path ({WHAT_TO_COPY}).")
    if not manifest_path(p).is_file():
        raise ManifestError(f"{p} has no manifest ({manifest_path(p).name} expected beside it): {WHAT_TO_COPY}.")
    m = read_manifest(p, verify=False)
    head = getattr(getattr(m, "gradcam", None), "head_file", None)
    if head:
        try:
            sibling_file(p, head, "Grad-CAM head")
        except ManifestError as exc:
            raise ManifestError(f"{exc} It was not copied with the model: {WHAT_TO_COPY}.") from None
    return str(p)


def resolve_args(a) -> None:
    """Every command's artifact arguments, resolved and checked before the command runs: a bundle (folder, model
    file in it, or archive) becomes its model file, a folder with one artifact stands for it, and a missing piece is
    one line naming it. Commands that take export folders (tune, bench) keep their folders."""
    if getattr(a, "command", None) in WRITES_MANIFEST:
        cache = bundle.cache_root().resolve()
        for value in [getattr(a, "artifact", None), *(getattr(a, "artifacts", None) or [])]:
            if isinstance(value, str) and (bundle.is_archive(value) or Path(value).resolve().is_relative_to(cache)):
                raise ConfigError(f"{a.command} changes the bundle, and an archive (or its unpacked copy in the cache) is "
                                  f"read-only: {a.command} the bundle folder it was made from, then archive it again "
                                  "(cxr-edge bundle FOLDER --archive ...).")
    for name in ONE_ARTIFACT:
        value = getattr(a, name, None)
        if isinstance(value, str):
            setattr(a, name, artifact(value))
    if getattr(a, "command", None) == "evaluate" and isinstance(getattr(a, "model", None), str) and "://" not in a.model:
        a.model = str(bundle.resolve(a.model))  # a .keras model or an artifact: evaluate says which it cannot read
    for name in MANY_ARTIFACTS:
        values = getattr(a, name, None)
        if isinstance(values, list):
            setattr(a, name, [str(bundle.resolve(v)) if "://" not in v else v for v in values])
    if isinstance(getattr(a, "artifact_dir", None), str):  # bench: a bundle archive becomes its folder
        folder = bundle.bundle_of(a.artifact_dir)
        if folder is not None:
            bundle.check_bundle(folder)
            a.artifact_dir = str(folder)


def port_free(host: str, port: int, what: str = "--port") -> None:
    """Refuse a busy port before anything starts (a server that fails to bind after loading the engine has
    already said it was starting)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"{host}:{port} cannot be used ({exc.strerror or exc}): another service (another "
                              f"cxr-edge?) holds it, or the address is not this machine's; choose another {what}") from None
