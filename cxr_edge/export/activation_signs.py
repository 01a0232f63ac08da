"""Which activations can be negative, read from the graph rather than from the calibration images.

Why it matters: the CPU target quantises activations as U8 with a zero point. After a ReLU that costs
nothing (the zero point is 0), but a tensor that can be negative (ResNetV2's residual sums have no ReLU
after them, nor do its pre-activation batch-norm products) gets a non-zero zero point. OpenVINO cannot
fuse such a FakeQuantize into its INT8 kernels and runs a float FakeQuantize + bf16 reorder + convert
around it instead; NNCF's models quantise those tensors as symmetric S8 and avoid it. A sign decided
from the graph holds for every image; one decided from the calibration images would not.
"""

from __future__ import annotations

from ..onnx_graph import GraphIndex

# ops whose output is >= 0 whatever their input
_NONNEGATIVE_OPS = {"Relu", "Sigmoid", "Softmax", "Abs", "Exp", "Sqrt"}
# ops that only move, select or average values: the output is >= 0 when every data input is
_PRESERVING_OPS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Reshape", "Flatten",
                   "Transpose", "Squeeze", "Unsqueeze", "Slice", "Concat", "Identity", "Resize", "Pad",
                   "Gather", "Split", "Cast", "DepthToSpace", "SpaceToDepth", "Expand", "Tile", "Max", "Min"}
# which inputs of those carry data (the rest are shapes, indices, pads)
_DATA_INPUTS = {"Reshape": 1, "Squeeze": 1, "Unsqueeze": 1, "Slice": 1, "Resize": 1, "Pad": 1, "Gather": 1,
                "Split": 1, "Expand": 1, "Tile": 1}
_UNSIGNED_TYPES = {2, 4, 12, 13}  # onnx.TensorProto UINT8, UINT16, UINT32, UINT64


def nonnegative_tensors(model) -> set[str]:
    """Tensor names that cannot hold a negative value, by forward propagation in topological order.

    Conservative: anything not proven non-negative counts as signed (Pad's constant value, Max/Min
    mixing a signed operand, Clip's bounds and Mul/Add by constants are followed; everything else is
    treated as signed).
    """
    consts = GraphIndex(model).arrays()
    nonneg = {i.name for i in model.graph.input if i.type.tensor_type.elem_type in _UNSIGNED_TYPES}
    nonneg |= {k for k, v in consts.items() if v.size and (v >= 0).all()}

    def is_nonneg(name: str) -> bool:
        return name in nonneg

    for n in model.graph.node:
        op = n.op_type
        data = [i for i in n.input[: _DATA_INPUTS.get(op, len(n.input))] if i]
        ok = False
        if op in _NONNEGATIVE_OPS:
            ok = True
        elif op == "Clip":
            lo = consts.get(n.input[1]) if len(n.input) > 1 and n.input[1] else None
            ok = (lo is not None and float(lo) >= 0) or (bool(data) and is_nonneg(data[0]))
        elif op == "Max":
            ok = any(is_nonneg(i) for i in data)  # max(x, c >= 0) is >= 0
        elif op in _PRESERVING_OPS:
            ok = bool(data) and all(is_nonneg(i) for i in data)
            if op == "Pad" and ok and len(n.input) > 2 and n.input[2]:
                v = consts.get(n.input[2])
                ok = v is not None and float(v) >= 0
        elif op in {"Mul", "Add", "Div", "MatMul", "Gemm", "Conv"}:
            # sums and products of non-negative operands (weights included) stay non-negative
            ok = bool(n.input) and all(is_nonneg(i) for i in n.input if i)
        if ok:
            nonneg.update(o for o in n.output if o)
    return nonneg


def signed_activation_overrides(model) -> dict[str, list[dict]]:
    """ORT ``TensorQuantOverrides`` that quantise every possibly-negative activation as symmetric S8.

    Non-negative activations keep the U8 default (zero point 0 after a ReLU). Only tensors produced by
    a node are listed: graph inputs and initialisers keep their own rules.
    """
    from onnxruntime.quantization import QuantType

    nonneg = nonnegative_tensors(model)
    s8 = [{"quant_type": QuantType.QInt8, "symmetric": True}]
    out = {}
    for n in model.graph.node:
        for o in n.output:
            if o and o not in nonneg:
                out[o] = s8
    return out
