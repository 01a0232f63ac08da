"""Artifact format -> backend classes, listed here by import path (so listing them imports no heavy library);
callers never branch on format."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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


def artifact_format(path: str | Path, manifest: Mapping[str, Any] | None = None) -> str:
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


def all_backends() -> list[str]:
    """Every backend name, in registration order (the CLI's ``--backend`` choices)."""
    return list(dict.fromkeys(name for names in _REGISTRY.values() for name in names))


def backend_class(fmt: str, name: str | None = None):
    options = _REGISTRY.get(fmt)
    if not options:
        raise ConfigError(f"No backend runs {fmt!r} artifacts.")
    name = name or next(iter(options))
    if name not in options:
        raise ConfigError(f"Backend {name!r} cannot run {fmt!r} artifacts; choose from {list(options)}.")
    module, cls = options[name].split(":")
    return getattr(importlib.import_module(module), cls)


def check_trust(artifact: Path, fmt: str, trusted_keys) -> dict:
    """Apply the load policy; returns what was established (signer, native engine blobs).

    With trusted keys, every artifact must carry a manifest signature from one of them. Whatever the
    keys, an ONNX model with EP-context nodes (a native engine inside the .onnx) runs only when signed
    by a trusted key, and never with its engine in an external file no hash covers.
    """
    from ...signing import SignatureError, load_trusted_keys, verify_artifact_signature

    keys = [k for k in trusted_keys or () if not isinstance(k, (str, Path))]
    keys += load_trusted_keys([k for k in trusted_keys or () if isinstance(k, (str, Path))])
    signer = verify_artifact_signature(artifact, keys).key_id if keys else None
    found = []
    if fmt == "onnx":
        from ..ep_context import find_ep_context_nodes

        found = find_ep_context_nodes(artifact)
        external = [n for n in found if n.embed_mode == 0]
        if external:
            raise SignatureError(
                f"{artifact.name} is an ONNX Runtime EP-context model whose engine lives in an external file "
                f"({external[0].external_path!r}) that no manifest hash or signature covers; refusing to load it. "
                "Re-dump the EP-context model with embed mode 1 and sign it."
            )
        if found and signer is None:
            raise SignatureError(
                f"{artifact.name} is an ONNX Runtime EP-context model: {len(found)} EPContext node(s) embed a compiled "
                f"native engine ({found[0].source or 'unknown EP'}) that ONNX Runtime would deserialize without checks. "
                "Such models run only when signed by a trusted key: cxr-edge sign ARTIFACT --key KEY.key where it was "
                "built, then start with --trusted-key KEY.pub."
            )
    return {"signed_by": signer, "ep_context_nodes": len(found)}


def open_backend(artifact: str | Path, backend: str | None = None, verify: bool = True, trusted_keys=None,
                 **options):
    """Verified manifest + the chosen (or preferred) backend for this artifact, not yet loaded.

    ``trusted_keys``: public key paths (or loaded keys); when given, only signed artifacts load.
    ``triton://host:port/model`` addresses a remote Triton model; its manifest comes from the server.
    """
    if str(artifact).startswith("triton://"):
        if trusted_keys:
            from ...signing import SignatureError

            raise SignatureError(
                "Signatures cannot be checked for a remote triton:// model (the server holds the files); verify "
                "artifacts on the Triton host, or drop --trusted-key for this backend."
            )
        from .triton import TritonBackend, remote_manifest

        return TritonBackend(str(artifact), remote_manifest(str(artifact)), **options)
    artifact = Path(artifact)
    if not artifact.is_file():
        raise ManifestError(f"Artifact {artifact} does not exist.")
    if trusted_keys and not verify:
        raise ConfigError("verify=False cannot be combined with trusted keys: the signature covers the sha256.")
    fmt = artifact_format(artifact, read_manifest(artifact, verify=False))
    trust = check_trust(artifact, fmt, trusted_keys)  # before hashing: a forged manifest stops here
    manifest = read_manifest(artifact, verify=verify)
    # trusted: signed-only deployments, where backends must not load natively compiled caches either
    engine = backend_class(fmt, backend)(artifact, manifest, **{"trusted": bool(trusted_keys), **options})
    engine.trust = trust
    return engine
