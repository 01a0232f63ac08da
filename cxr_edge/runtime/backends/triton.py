"""``triton://host:port/model``: a remote Triton Inference Server as a backend (tritonclient HTTP).

The model's manifest comes from its Triton config (the ``cxr_edge_manifest`` parameter written by
``cxr-edge export-triton``), so classes, threshold and preprocessing match the served artifact.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from ...errors import ConfigError, EngineError, ManifestError
from ...extras import require
from ...manifest import Manifest
from ...manifest_schema import ArtifactFormat, FieldError, TensorSpec, TritonModel
from .base import Backend, BackendInfo

#: the Triton model-config parameter that carries the artifact's manifest (written by export-triton)
MANIFEST_PARAMETER = "cxr_edge_manifest"


def model_name(doc: Manifest, artifact: Path) -> str:
    """The Triton model name for an artifact: shared by the repository export and the PyTriton server."""
    tag = artifact.name.split(".")[1] if artifact.name.count(".") >= 2 else doc.precision.value
    return re.sub(r"[^A-Za-z0-9_]", "_", f"cxr_{doc.recipe or 'model'}_{tag}")


def remote_manifest_json(doc: Manifest) -> str:
    """The part of ``doc`` a triton:// client needs (classes, threshold, preprocessing, outputs, Grad-CAM), as the
    JSON text of the config parameter :func:`remote_manifest` reads."""
    remote = Manifest(classes=doc.classes, preprocess=doc.preprocess, operating_point=doc.operating_point,
                      precision=doc.precision, recipe=doc.recipe, outputs=doc.outputs, gradcam=doc.gradcam,
                      sha256=doc.sha256)
    return json.dumps(remote.to_dict())


def parse_url(url: str) -> tuple[str, str]:
    """``triton://host[:port]/model`` -> ("host:port", model); IPv6 hosts in brackets. ConfigError, never
    a traceback, for anything else (a port over 65535 made urlparse raise ValueError)."""
    try:
        u = urlparse(url)
        port = u.port or 8000
        host = u.hostname
    except ValueError as exc:
        raise ConfigError(f"Expected triton://host:port/model, got {url!r} ({exc}).") from None
    model = u.path.strip("/")
    if u.scheme != "triton" or not host or not model or "/" in model:
        raise ConfigError(f"Expected triton://host:port/model, got {url!r}.")
    return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}"), model


def remote_manifest(url: str, timeout: float = 10.0) -> Manifest:
    http = require("tritonclient.http")
    host, model = parse_url(url)
    client = http.InferenceServerClient(host, connection_timeout=timeout, network_timeout=timeout)
    try:
        if not client.is_model_ready(model):
            raise EngineError(f"Triton at {host} has no ready model {model!r}; check the model name and the server log.")
        cfg = client.get_model_config(model)
    except Exception as exc:
        if isinstance(exc, (ConfigError, EngineError)):
            raise
        raise EngineError(f"Cannot reach Triton model {model!r} at {host}: {exc}") from exc  # remote: not the command
    params = cfg.get("parameters", {})
    raw = params.get(MANIFEST_PARAMETER, {}).get("string_value")
    if not raw:
        raise ConfigError(f"Triton model {model!r} was not exported by cxr-edge (no cxr_edge_manifest parameter).")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ManifestError(f"Triton model {model!r} carries a manifest that is not valid JSON ({str(exc)[:200]}).") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"Triton model {model!r} carries a manifest that is not a JSON object.")
    try:
        manifest = Manifest.from_dict(doc)
        # what the server itself says: where the model is, its batch limit, and its outputs when the manifest has none
        return dataclasses.replace(
            manifest, format=ArtifactFormat.TRITON,
            outputs=manifest.outputs or tuple(TensorSpec(o["name"]) for o in cfg.get("output", [])),
            triton=TritonModel(host, model, cfg.get("max_batch_size")))
    except FieldError as exc:
        raise ManifestError(f"Triton model {model!r} carries a manifest cxr-edge cannot use: {exc}. Re-export the "
                            "repository with this cxr-edge (cxr-edge export-triton).") from None


class TritonBackend(Backend):
    name = "triton"  # takes only the common options, and uses none of them: the server decides how the model runs

    @classmethod
    def tuning_candidates(cls, artifact: Path, manifest: Manifest, *, device: str, batch: int,
                          cores: int) -> list[dict[str, Any]]:
        """None: a remote model's speed is set on its server, not by anything this machine could choose."""
        return []

    def __init__(self, artifact, manifest, **options):
        super().__init__(Path(str(artifact).replace("triton://", "triton:/")), manifest, **options)
        self.url = str(artifact)

    @property
    def remote(self) -> TritonModel:
        """Where the model is served (set by :func:`remote_manifest`)."""
        if self.manifest.triton is None:
            raise ConfigError(f"{self.url} has no Triton address in its manifest; open it with open_backend('triton://...').")
        return self.manifest.triton

    def batch_range(self) -> tuple[int, int]:
        return (1, int(self.remote.max_batch_size or 1 << 30))

    def _load(self) -> BackendInfo:
        http = require("tritonclient.http")
        t = self.remote
        self.client = http.InferenceServerClient(t.host)
        self.http = http
        meta = self.client.get_server_metadata()
        return BackendInfo("triton", f"Triton {meta.get('version', '?')} at {t.host}/{t.model}",
                           self.manifest.precision.value, "remote", {"model": t.model})

    def _infer(self, batch: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]:
        inp = self.http.InferInput("image", list(batch.shape), "UINT8")
        inp.set_data_from_numpy(batch)
        res = self.client.infer(self.remote.model, [inp], outputs=[self.http.InferRequestedOutput(o) for o in outputs])
        return {o: res.as_numpy(o) for o in outputs}

    def _close(self) -> None:
        self.client.close()
