"""Artifact format -> backend classes. Backends register themselves; callers never branch on format."""

from __future__ import annotations

import importlib
from pathlib import Path

from ...errors import ConfigError, ManifestError
from ...manifest import read_manifest

_REGISTRY: dict[str, dict[str, str]] = {}  # format -> {backend name: "module:Class"}, in preference order

_SUFFIX_FORMAT = {".onnx": "onnx", ".plan": "tensorrt", ".engine": "tensorrt", ".keras": "keras"}


def register(fmt: str, name: str, target: str) -> None:
    _REGISTRY.setdefault(fmt, {})[name] = target


# Registered by import path so that listing backends imports no heavy library.
register("onnx", "onnxruntime", "cxr_edge.runtime.backends.onnxruntime:OnnxRuntimeBackend")
register("onnx", "openvino", "cxr_edge.runtime.backends.openvino:OpenVINOBackend")
register("tensorrt", "tensorrt", "cxr_edge.runtime.backends.tensorrt:TensorRTBackend")
register("keras", "keras", "cxr_edge.runtime.backends.keras:KerasBackend")
register("triton", "triton", "cxr_edge.runtime.backends.triton:TritonBackend")


def artifact_format(path: str | Path, manifest: dict | None = None) -> str:
    if manifest and manifest.get("format") in _REGISTRY:
        return manifest["format"]
    if manifest and manifest.get("kind") == "keras-model":
        return "keras"
    fmt = _SUFFIX_FORMAT.get(Path(path).suffix.lower())
    if fmt is None:
        raise ConfigError(f"Cannot tell the format of {path}; expected one of {sorted(_SUFFIX_FORMAT)}.")
    return fmt


def backends_for(fmt: str) -> list[str]:
    return list(_REGISTRY.get(fmt, {}))


def backend_class(fmt: str, name: str | None = None):
    options = _REGISTRY.get(fmt)
    if not options:
        raise ConfigError(f"No backend runs {fmt!r} artifacts.")
    name = name or next(iter(options))
    if name not in options:
        raise ConfigError(f"Backend {name!r} cannot run {fmt!r} artifacts; choose from {list(options)}.")
    module, cls = options[name].split(":")
    return getattr(importlib.import_module(module), cls)


def open_backend(artifact: str | Path, backend: str | None = None, verify: bool = True, **options):
    """Verified manifest + the chosen (or preferred) backend for this artifact, not yet loaded.

    ``triton://host:port/model`` addresses a remote Triton model; its manifest comes from the server.
    """
    if str(artifact).startswith("triton://"):
        from .triton import TritonBackend, remote_manifest

        return TritonBackend(str(artifact), remote_manifest(str(artifact)), **options)
    artifact = Path(artifact)
    if not artifact.is_file():
        raise ManifestError(f"Artifact {artifact} does not exist.")
    manifest = read_manifest(artifact, verify=verify)
    fmt = artifact_format(artifact, manifest)
    return backend_class(fmt, backend)(artifact, manifest, **options)
