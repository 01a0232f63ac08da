"""Multiply-accumulates per image of an ONNX model, from its Conv / Gemm / MatMul shapes."""

from __future__ import annotations

import numpy as np

from .extras import require


def macs_per_image(path) -> int:
    onnx = require("onnx")
    model = onnx.load(str(path), load_external_data=False)
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
    total = 0
    size = lambda dims: int(np.prod([d or 1 for d in dims]))
    for n in model.graph.node:
        if n.op_type == "Conv" and len(n.input) > 1 and n.output[0] in shapes and n.input[1] in shapes:
            w = shapes[n.input[1]]  # (M, C/group, kh, kw)
            out = shapes[n.output[0]]
            if len(w) == 4 and len(out) == 4:
                total += size(out) * int(np.prod(w[1:]))
        elif n.op_type in ("Gemm", "MatMul") and n.input[1] in shapes and n.output[0] in shapes:
            w, out = shapes[n.input[1]], shapes[n.output[0]]
            if len(w) == 2 and out:
                total += size(out) * int(w[0] if n.op_type == "MatMul" or not _transposed_b(n) else w[1])
    return total


def _transposed_b(node) -> bool:
    return any(a.name == "transB" and a.i == 1 for a in node.attribute)
