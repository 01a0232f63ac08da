"""Which layers INT8 hurts most: per-layer quantisation noise, to choose what to keep in float.

When the usual remedies (another calibration method, first conv and classifier in float) do not
bring an INT8 model through its gate, the standard next step (TensorRT's and ONNX Runtime's
accuracy-debugging guides) is mixed precision: find the layers whose quantisation adds the most
noise and leave only those in float. This uses ONNX Runtime's own ``qdq_loss_debug`` tools: both
models are run with every intermediate tensor exposed and compared tensor by tensor, giving the
signal-to-quantisation-noise ratio (SQNR, dB) of the INT8 model's activations against FP32 along
the network. Each compute node is charged with how much SQNR is lost between its input and the next
compute node's input (in graph order): on a deep ResNet the error does not come from one culprit
but accumulates block by block, and this finds the blocks where it accumulates fastest.
(ORT's per-tensor ``qdq_err`` was no use here: the debugging session fuses each Q/DQ pair, so the
"before" and "after" tensors it compares are identical.)
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np

from ..extras import require
from .quantize import COMPUTE_OPS, ArrayCalibrationReader, pre_process_for_quantization


def node_sensitivity(fp32_path: str | Path, qdq_path: str | Path, x: np.ndarray, max_images: int = 4,
                     numerics: str = "kernels") -> dict[str, float]:
    """Compute node name -> SQNR change (dB) from its input to the next compute node's; lower is worse.

    ``fp32_path`` is the exported FP32 artifact ``qdq_path`` was quantised from; it is put through the
    same pre-processing as :func:`.quantize.quantize` first, so node and tensor names line up.
    ``numerics="tensorrt"`` runs the QDQ graph as TensorRT computes it (the int8-trt gate's arithmetic),
    so the layers charged are those that lose signal on the target, not on this CPU's INT8 kernels.
    """
    onnx = require("onnx")
    dbg = require("onnxruntime.quantization.qdq_loss_debug")
    x = x[:max_images]
    with tempfile.TemporaryDirectory() as tmp:
        pre = pre_process_for_quantization(fp32_path, Path(tmp) / "pre.onnx")
        model = onnx.load(str(pre))
        input_name = model.graph.input[0].name
        aug_f, aug_q = Path(tmp) / "float.onnx", Path(tmp) / "qdq.onnx"
        dbg.modify_model_output_intermediate_tensors(str(pre), str(aug_f))
        dbg.modify_model_output_intermediate_tensors(str(qdq_path), str(aug_q))
        float_acts = dbg.collect_activations(str(aug_f), ArrayCalibrationReader(x, input_name, batch=1))
        so = None
        if numerics == "tensorrt":
            so = require("onnxruntime").SessionOptions()
            so.add_session_config_entry("session.disable_quant_qdq", "1")
        qdq_acts = dbg.collect_activations(str(aug_q), ArrayCalibrationReader(x, input_name, batch=1),
                                           session_options=so)
    errors = _sqnr_vs_float(dbg, dbg.create_activation_matching(qdq_acts, float_acts))
    curve = []  # (node, SQNR of its input in the INT8 model vs FP32), in graph order
    for node in model.graph.node:
        if node.op_type not in COMPUTE_OPS or not node.input:
            continue
        err = errors.get(node.input[0])
        if err is not None and np.isfinite(err):
            curve.append((node.name, float(min(err, 200.0))))
    return {name: curve[k + 1][1] - sqnr for k, (name, sqnr) in enumerate(curve[:-1])}


def _sqnr_vs_float(dbg, matching: dict) -> dict[str, float]:
    """Tensor name -> SQNR (dB) of the INT8 model's dequantised tensor against FP32's.

    Only tensors of one shape in both models are compared: the CPU rewrites subsample a quantised tensor
    before its DequantizeLinear (``qdq_rewrites.subsample_before_dequantize``), so on ResNet50 a stride-2
    block input is a quarter of its FP32 namesake. ORT's ``compute_activation_error`` compares them anyway
    and raised, which took the whole export down at the mixed-precision rung. A compute node fed by such a
    tensor drops out of the curve, so its loss is charged to the node before it; :func:`worst_nodes` widens
    a choice to the whole residual block, which keeps the strided convolutions with their neighbours.
    """
    out = {}
    for name, match in matching.items():
        ref, got = match.get("float"), match.get("post_qdq")
        if ref and got and len(ref) == len(got) and all(np.shape(a) == np.shape(b) for a, b in zip(ref, got)):
            out[name] = float(dbg.compute_signal_to_quantization_noice_ratio(ref, got))
    return out


_BLOCK = re.compile(r"(conv\d+_block\d+|head_[a-z]+\d*|probs)_")


def worst_nodes(sensitivity: dict[str, float], fraction: float, model=None) -> list[str]:
    """The ``fraction`` of compute nodes that lose the most SQNR (at least one), widened to their blocks.

    ONNX Runtime leaves an excluded conv's weights in float but still feeds it the quantised tensor
    its neighbours share, and quantises the Adds and activations around it; so with ``model`` every
    node of the same residual block (``convN_blockM_...`` in Keras names) is kept in float together.
    """
    ranked = sorted(sensitivity, key=sensitivity.__getitem__)
    chosen = ranked[: max(1, int(round(fraction * len(ranked))))]
    if model is None:
        return chosen
    blocks = {m.group(1) for name in chosen if (m := _BLOCK.search(name))}
    widened = {n.name for n in model.graph.node if (m := _BLOCK.search(n.name)) and m.group(1) in blocks}
    return sorted(widened | set(chosen))
