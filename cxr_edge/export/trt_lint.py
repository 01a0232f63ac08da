"""TensorRT's rules for explicitly quantised (QDQ) ONNX graphs, checked before an engine is ever built.

A QDQ graph that ONNX Runtime runs happily can still be rejected by TensorRT's ONNX parser, or built
into an engine that runs Q/DQ as slow standalone layers. In the spirit of Polygraphy's ``check lint``,
one pass lists every violation with the node that breaks it:

- ``int32-bias-dq``: DequantizeLinear on an int32 tensor (ORT quantises Conv/Gemm biases to int32 by
  default). TensorRT: "only activation types allowed as input to this layer"; bias stays float and
  TensorRT folds it into the quantised convolution itself.
- ``asymmetric``: Q/DQ zero points must be int8 and all zero (TensorRT's INT8 is symmetric); a uint8
  zero point (ORT's U8S8 CPU flavour) is refused by the parser.
- ``weight-axis``: per-channel weight scales must run along the output-channel axis TensorRT expects
  (Conv: 0, ConvTranspose: 1, Gemm: 0 with transB else 1, MatMul: 1).
- ``scale``: scales must be positive and finite.
- ``unfused-q`` / ``unfused-dq``: a QuantizeLinear must feed DequantizeLinear only, and a DQ output must
  feed an op TensorRT fuses with Q/DQ or moves them across (conv, matmul, pooling, add, data movement);
  anywhere else TensorRT runs the Q/DQ as separate layers, or rejects the graph. A DQ that feeds a
  graph output (the Grad-CAM feature map) is allowed: TensorRT dequantises there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..extras import require
from ..onnx_graph import GraphIndex, attr

#: ops TensorRT fuses a preceding DQ into, or propagates Q/DQ across (TensorRT developer guide,
#: "Explicit Quantization": Q/DQ layer placement, commuting and fusion)
FUSES_DQ = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Concat", "MaxPool", "AveragePool",
            "GlobalAveragePool", "GlobalMaxPool", "Relu", "LeakyRelu", "Clip", "Sigmoid", "Reshape", "Flatten",
            "Transpose", "Squeeze", "Unsqueeze", "Slice", "Pad", "Resize", "Identity", "Split",
            "Shape"}  # Shape reads dimensions only
WEIGHT_AXIS = {"Conv": 0, "ConvTranspose": 1, "MatMul": 1}


@dataclass(frozen=True)
class Violation:
    rule: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.node}: {self.message}"


def lint_qdq(model_or_path) -> list[Violation]:
    """Every TensorRT QDQ rule the graph breaks (empty list: TensorRT-clean)."""
    onnx = require("onnx")
    model = model_or_path if not isinstance(model_or_path, (str, Path)) else onnx.load(str(model_or_path))
    G = GraphIndex(model)
    out: list[Violation] = []
    for n in G.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        name = n.name or f"{n.op_type}({n.input[0]})"
        scale = G.array(n.input[1]) if len(n.input) > 1 else None
        if scale is not None and (not np.all(np.isfinite(scale)) or np.any(scale <= 0)):
            out.append(Violation("scale", name, "scale must be positive and finite"))
        int32 = n.op_type == "DequantizeLinear" and G.elem_type(n.input[0]) == onnx.TensorProto.INT32
        if len(n.input) > 2 and n.input[2] and not int32:
            zp = G.array(n.input[2])
            if zp is not None and (zp.dtype != np.int8 or np.any(zp != 0)):
                out.append(Violation("asymmetric", name, f"zero point must be int8 0 for TensorRT, got {zp.dtype} "
                                     f"{np.unique(zp)[:4].tolist()}"))
        if n.op_type == "DequantizeLinear":
            if int32:
                out.append(Violation("int32-bias-dq", name, "DequantizeLinear of an int32 tensor (quantised bias); "
                                     "TensorRT takes only activation types here: keep biases float (QuantizeBias off)"))
            users = G.consumers(n.output[0])
            bad = sorted({u.op_type for u in users if u.op_type not in FUSES_DQ})
            if bad:  # a DQ straight to a graph output is fine: TensorRT dequantises it there
                out.append(Violation("unfused-dq", name, f"feeds {', '.join(bad)}, which TensorRT does not fuse "
                                     "with Q/DQ"))
            if scale is not None and scale.size > 1 and n.input[0] in G.initializers:
                axis = attr(n, "axis", 1)
                for u in users:
                    want = WEIGHT_AXIS.get(u.op_type)
                    if u.op_type == "Gemm":
                        want = 0 if attr(u, "transB", 0) else 1
                    if want is not None and len(u.input) > 1 and u.input[1] == n.output[0]:
                        rank = len(G.initializers[n.input[0]].dims)
                        if axis % rank != want:
                            out.append(Violation("weight-axis", name, f"per-channel axis {axis} on {u.op_type} weights; "
                                                 f"TensorRT needs axis {want}"))
        else:
            users = G.consumers(n.output[0])
            if any(u.op_type != "DequantizeLinear" for u in users) or not users:
                out.append(Violation("unfused-q", name, "QuantizeLinear must feed DequantizeLinear only"))
            src = G.producer(n.input[0])
            if src is not None and src.op_type == "DequantizeLinear":
                out.append(Violation("unfused-q", name, "requantises a DequantizeLinear output directly (DQ->Q)"))
    return out


def lint_summary(violations: list[Violation], limit: int = 8) -> str:
    head = "; ".join(str(v) for v in violations[:limit])
    more = f" (+{len(violations) - limit} more)" if len(violations) > limit else ""
    return f"{len(violations)} TensorRT QDQ rule violation(s): {head}{more}"
