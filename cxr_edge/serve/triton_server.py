"""``cxr-edge serve-triton``: our runtime inside a real Triton Inference Server, through PyTriton.

Triton brings KServe v2 HTTP/gRPC, its own dynamic batcher and Prometheus metrics; our backend runs the
artifact inside it. Two known catches are handled here: PyTriton pins numpy<2 (so it lives in its own
environment, ``pip install 'cxr-edge[triton-server]'``), and Triton's Python-backend stub links the
system libpython, which crashes against another 3.11 patch release unless LD_LIBRARY_PATH points at
the running interpreter's libpython directory (set below before Triton starts).
"""

from __future__ import annotations

import logging
import os
import sysconfig
from collections.abc import MutableMapping
from pathlib import Path

import numpy as np

from ..errors import ConfigError, MissingExtraError

log = logging.getLogger(__name__)


def fix_libpython_path(env: MutableMapping[str, str] | None = None) -> str | None:
    """Prepend this interpreter's libpython directory to LD_LIBRARY_PATH (in ``env`` or os.environ)."""
    if env is None:
        env = os.environ
    libdir = sysconfig.get_config_var("LIBDIR")
    if not libdir or not any(Path(libdir).glob("libpython3*.so*")):
        return None
    parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]
    if libdir not in parts:
        env["LD_LIBRARY_PATH"] = ":".join([libdir, *parts])
    return libdir


def serve_triton(artifact: str | Path, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, max_batch: int = 32, max_delay_us: int = 5000,
                 model_name: str | None = None) -> None:
    fix_libpython_path()
    try:
        from pytriton.decorators import batch
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig
    except ImportError as exc:
        raise MissingExtraError(
            "serve-triton needs PyTriton (which pins numpy<2): in its own virtual environment, "
            "pip install 'cxr-edge[triton-server]'") from exc
    from ..runtime.backends.registry import open_backend
    from ..runtime.backends.triton import MANIFEST_PARAMETER, remote_manifest_json
    from ..runtime.backends.triton import model_name as default_name

    engine = open_backend(artifact, device="auto").load()
    doc = engine.manifest
    name = model_name or default_name(doc, Path(artifact))
    outputs = engine.outputs
    lo, hi = engine.batch_range()
    max_batch = min(max_batch, hi)

    @batch
    def infer(image):
        res = engine.infer(np.ascontiguousarray(image, dtype=np.uint8), outputs)
        return {k: v.astype(np.float32) for k, v in res.items()}

    unshaped = [o.name for o in doc.outputs if not o.shape]
    if unshaped:
        raise ConfigError(f"The manifest of {Path(artifact).name} gives no shape for {', '.join(unshaped)}; re-export "
                          "the artifact with this cxr-edge.")
    shapes = {o.name: tuple(o.shape[1:]) for o in doc.outputs}
    cfg = TritonConfig(http_address=host, http_port=http_port, grpc_address=host, grpc_port=grpc_port,
                       metrics_port=metrics_port)
    _attach_manifest(name, MANIFEST_PARAMETER, remote_manifest_json(doc))
    with Triton(config=cfg) as triton:
        triton.bind(
            model_name=name, infer_func=infer,
            inputs=[Tensor(name="image", dtype=np.uint8, shape=engine.spec.input_shape)],
            outputs=[Tensor(name=o, dtype=np.float32, shape=shapes[o]) for o in outputs],
            config=ModelConfig(max_batch_size=max_batch, batcher=DynamicBatcher(max_queue_delay_microseconds=max_delay_us)),
            strict=True,
        )
        log.info("Triton serving %s as %r on http://%s:%d (gRPC %d, metrics %d)", Path(artifact).name, name, host,
                 http_port, grpc_port, metrics_port)
        triton.serve()


def _attach_manifest(name: str, key: str, value: str) -> None:
    """Put the manifest into the model's Triton config parameters.

    PyTriton has no public hook for config parameters; its models build their config once, in
    ``Model._get_triton_model_config`` (PyTriton 0.5-0.7), so that method is wrapped for our model
    before it is bound. If the hook moves, the model still serves and triton:// clients say the
    manifest is missing.
    """
    try:
        from pytriton.models import model as pm

        original = pm.Model._get_triton_model_config

        def with_manifest(self):
            cfg = original(self)
            if self.model_name == name:
                cfg.backend_parameters[key] = value
            return cfg

        pm.Model._get_triton_model_config = with_manifest
    except Exception as exc:
        log.warning("could not attach the cxr-edge manifest to the Triton config (%s)", exc)
