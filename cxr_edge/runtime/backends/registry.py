"""Artifact format -> backend classes, listed here by import path (so listing them imports no heavy library);
callers never branch on format."""

from __future__ import annotations

import importlib
from pathlib import Path

from ...errors import ConfigError, ManifestError
from ...manifest import Manifest, read_manifest, read_manifest_bytes, read_verified_bytes
from ...precision import Int8Target

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


def artifact_format(path: str | Path, manifest: Manifest | None = None) -> str:
    """A local file's format, from its suffix: never from the manifest, which (unsigned) anyone can edit
    (a manifest saying ``format: triton`` once sent the patient's image to the host it named)."""
    fmt = _SUFFIX_FORMAT.get(Path(path).suffix.lower())
    if fmt is None:
        raise ConfigError(f"Cannot tell the format of {path}; expected one of {sorted(_SUFFIX_FORMAT)}.")
    claimed = manifest.format if manifest is not None else None
    if claimed is not None and claimed.value != fmt:
        raise ManifestError(f"The manifest of {Path(path).name} says format {claimed.value!r}, but the file is {fmt!r} "
                            "by its name; refused. Remote models are addressed as triton://host:port/model.")
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


def preferred_backend(fmt: str, manifest: Manifest) -> str | None:
    """The backend an artifact was made for, when none is named: OpenVINO for the ``int8-ov`` flavour
    (ONNX Runtime runs its mixed S8/U8 graph without fusing half the element-wise ops, much slower than
    OpenVINO); otherwise the format's first."""
    import importlib.util

    if fmt == "onnx" and manifest.int8_target is Int8Target.OV and importlib.util.find_spec("openvino") is not None:
        return "openvino"
    return None


def check_signature(artifact: Path, trusted_keys, message: bytes | None = None) -> dict:
    """With trusted keys, the manifest (``message``: its bytes as read once) must carry a signature from one of
    them; returns the signer."""
    from ...signing import load_trusted_keys, verify_artifact_signature

    keys = [k for k in trusted_keys or () if not isinstance(k, (str, Path))]
    keys += load_trusted_keys([k for k in trusted_keys or () if isinstance(k, (str, Path))])
    return {"signed_by": verify_artifact_signature(artifact, keys, message).key_id if keys else None}


def check_role(artifact: Path, manifest: Manifest, signer: str | None) -> None:
    """A signed manifest names the file it describes; the file must carry that name, so a signed fp16 artifact
    renamed to ``model.int8-cpu.onnx`` (a role it was not signed for) is refused rather than served."""
    named = manifest.file
    if signer is None or named is None or named == artifact.name:
        return
    from ...signing import SignatureError

    raise SignatureError(
        f"{artifact.name} is signed as {named!r} ({manifest.precision.value}"
        + (f", {manifest.int8_target.value}" if manifest.int8_target is not None else "")
        + "): a signature covers the artifact's name and role, and this file was renamed. Restore its name, or "
        "re-sign it under the new one (cxr-edge sign) where it was built."
    )


def check_contents(artifact: Path, fmt: str, manifest: Manifest, signer: str | None,
                   model_bytes: bytes | None = None) -> dict:
    """The load policy for what is inside a (hash-verified) ONNX file.

    An ONNX model with EP-context nodes (a native engine inside the .onnx, also inside model-local
    functions) runs only when signed by a trusted key, and never with its engine in an external file no
    hash covers; weights in external files must be pinned by the manifest (:mod:`..external_data`).
    """
    if fmt != "onnx":
        return {"ep_context_nodes": 0, "external_data": []}
    from ...signing import SignatureError
    from .ep_context import find_ep_context_nodes, load_structure
    from .external_data import check_external_data

    model = load_structure(artifact if model_bytes is None else model_bytes, artifact.name)
    found = find_ep_context_nodes(model)
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
    return {"ep_context_nodes": len(found), "external_data": check_external_data(artifact, manifest, model)}


def open_backend(artifact: str | Path, backend: str | None = None, verify: bool = True, trusted_keys=None,
                 allow_failed_gate: bool = False, **options):
    """Verified manifest + the chosen (or preferred) backend for this artifact, not yet loaded.

    Order matters: the signature (when keys are given) authenticates the manifest, the sha256 then ties
    the file to it, and only a file that matched is parsed (EP-context nodes, external data); an
    artifact whose export gate failed runs only with ``allow_failed_gate`` (benchmarks, investigations).
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
    artifact_format(artifact)  # a file we cannot run is named as such before its manifest is looked for
    # each file is read once: the manifest bytes the signature is checked on are the bytes parsed, and the
    # artifact bytes hashed are the bytes the runtime is given (a file swapped in between is never what runs)
    manifest_bytes = read_manifest_bytes(artifact)
    manifest = read_manifest(artifact, verify=False, data=manifest_bytes)  # parsed once, bounded
    fmt = artifact_format(artifact, manifest)
    trust = check_signature(artifact, trusted_keys, manifest_bytes)  # before hashing: a forged manifest stops here
    check_role(artifact, manifest, trust["signed_by"])
    model_bytes = read_verified_bytes(artifact, manifest) if verify else None  # hash before parse
    trust.update(check_contents(artifact, fmt, manifest, trust["signed_by"], model_bytes))
    if manifest.gate_failed and not allow_failed_gate:
        raise ManifestError(
            f"{artifact.name} failed its accuracy gate at export ({manifest.gate_status or 'gate passed: false'}) "
            "and was kept only with --force; it must not screen patients. Re-export it, or pass --allow-failed-gate "
            "to run it anyway for investigation.")
    backend = backend or preferred_backend(fmt, manifest)
    # trusted: signed-only deployments, where backends must not load natively compiled caches either
    engine = backend_class(fmt, backend)(artifact, manifest, **{"trusted": bool(trusted_keys), **options})
    engine.trust = trust
    # external weights are opened by path by the runtime (their hashes were pinned by check_contents)
    engine.model_bytes = model_bytes if not trust.get("external_data") else None
    return engine
