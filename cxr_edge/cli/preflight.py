"""Checks a long-running command makes before it starts anything, so a wrong path or a busy port is one line with
the right exit code, not a traceback from inside the server's start-up after it has logged "ready".
"""

from __future__ import annotations

import socket
from pathlib import Path

from ..errors import ConfigError, ManifestError
from ..manifest import manifest_path, read_manifest, sibling_file

#: what an artifact is on disk, for the messages (README, "What to copy to the kiosk")
WHAT_TO_COPY = ("an artifact is MODEL.onnx (or .engine/.xml) with MODEL.onnx.manifest.json beside it, and the files "
                "its manifest names (the Grad-CAM head model.head.npz, a .sig signature): copy them together")


def artifact(path: str) -> str:
    """The artifact a command was given, checked whole: the file, its manifest, and the files the manifest names
    beside it. A folder holding exactly one artifact stands for it; URLs (triton://) pass through. A wrong path is
    a configuration error (exit 5); an artifact with a piece missing is an integrity error (exit 6)."""
    if "://" in path:
        return path
    p = Path(path)
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
