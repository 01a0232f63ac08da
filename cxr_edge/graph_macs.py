"""Multiply-accumulates per image of an ONNX model, from its Conv / Gemm / MatMul shapes."""

from __future__ import annotations

import numpy as np

from .extras import require
from .onnx_graph import attr


def macs_per_image(path) -> int:
    return sum(macs_per_node(path).values())


def macs_per_node(path_or_model) -> dict[str, int]:
    """MACs of each conv/gemm/matmul node for one image, keyed by the node's first output (unique in a
    graph, where node names may be empty or repeated).

    Per node, so that a QDQ graph can say which share of the work it really runs in INT8: a node count
    weighs a 64x3 classifier like a 3x3x512 convolution.
    """
    onnx = require("onnx")
    if isinstance(path_or_model, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(path_or_model)
    else:
        model = onnx.load(str(path_or_model), load_external_data=False)
    # fix the batch to 1 so shape inference gives concrete sizes
    for vi in model.graph.input:
        d = vi.type.tensor_type.shape.dim
        if d:
            d[0].Clear()
            d[0].dim_value = 1
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        shapes[vi.name] = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    out: dict[str, int] = {}
    size = lambda dims: int(np.prod([d or 1 for d in dims]))
    for n in model.graph.node:
        name = n.output[0]
        if n.op_type == "Conv" and len(n.input) > 1 and name in shapes and n.input[1] in shapes:
            w = shapes[n.input[1]]  # (M, C/group, kh, kw)
            o = shapes[name]
            if len(w) == 4 and len(o) == 4:
                out[name] = size(o) * int(np.prod(w[1:]))
        elif n.op_type in ("Gemm", "MatMul") and n.input[1] in shapes and name in shapes:
            w, o = shapes[n.input[1]], shapes[name]
            if len(w) == 2 and o:
                out[name] = size(o) * int(w[0] if n.op_type == "MatMul" or attr(n, "transB", 0) != 1 else w[1])
    return out
