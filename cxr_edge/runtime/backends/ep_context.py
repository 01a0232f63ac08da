"""Find ONNX Runtime EP-context nodes: compiled native engines hidden inside an ordinary-looking .onnx.

An ``EPContext`` node (domain ``com.microsoft``) carries a serialized TensorRT/QNN/OpenVINO engine
in its ``ep_cache_context`` attribute (``embed_mode=1``) or the path of one on disk
(``embed_mode=0``). ONNX Runtime hands that blob straight to the vendor runtime, which deserializes
native code paths from it: loading one is as trusting as loading a ``.plan`` file, so the loader
refuses such models unless their manifest is signed by a trusted key, and refuses external
(``embed_mode=0``) blobs outright because no manifest hash covers them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...extras import require
from ...onnx_graph import all_nodes, attr

EP_CONTEXT_OP = "EPContext"


@dataclass(frozen=True)
class EpContextNode:
    name: str
    embed_mode: int
    source: str  # the EP that wrote it, when recorded
    external_path: str | None


def load_structure(path: str | Path | bytes, name: str | None = None):
    """The model's graph without external data (from a path, or from the verified bytes the runtime will get),
    or a ManifestError when it is not a parseable ONNX file."""
    from ...errors import ManifestError

    onnx = require("onnx")
    name = name or (Path(path).name if not isinstance(path, bytes) else "model")
    try:
        if isinstance(path, bytes):
            return onnx.load_model_from_string(path)
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise ManifestError(f"{name} is not a readable ONNX model ({type(exc).__name__}: {exc}).") from exc


def find_ep_context_nodes(path_or_model) -> list[EpContextNode]:
    """Every EPContext node in the model (empty for a plain ONNX graph). Reads no external data."""
    model = load_structure(path_or_model) if isinstance(path_or_model, (str, Path)) else path_or_model
    out = []
    for node in all_nodes(model):  # control-flow subgraphs and model-local functions could hide one too
        if node.op_type != EP_CONTEXT_OP:
            continue
        mode = attr(node, "embed_mode")
        mode = 1 if mode is None else int(mode)
        ctx = attr(node, "ep_cache_context")
        src = attr(node, "source")
        ext = None
        if mode == 0 and ctx is not None:
            ext = ctx.decode(errors="replace") if isinstance(ctx, bytes) else str(ctx)
        out.append(EpContextNode(node.name, mode, src.decode(errors="replace") if isinstance(src, bytes) else str(src or ""),
                                 ext))
    return out
