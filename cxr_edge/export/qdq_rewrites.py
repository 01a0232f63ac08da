"""Rewrites of a QDQ graph that keep its arithmetic and let CPU runtimes keep every convolution in INT8.

OpenVINO's CPU plugin moves the stride of a 1x1 stride-2 convolution up to the tensor it reads
("strides optimisation"). When that tensor comes through a DequantizeLinear, the stride lands between the
dequantisation and the convolution, the pair no longer matches the INT8 convolution pattern, and the
convolution runs in bf16/f32: in ResNet50 the six stride-2 1x1 convolutions of conv{3,4,5}_block1, ~15% of
the time for ~10% of the MACs (the runtime model says so per layer; ``openvino_runtime_precisions``).

Subsampling the *quantised* tensor first (``Q -> Slice(step 2) -> DQ -> Conv(1x1, stride 1)``) is the same
arithmetic (a 1x1 stride-2 unpadded convolution reads every second pixel, nothing else), moves a quarter of
the bytes, and leaves nothing for the plugin to move: every convolution stays INT8.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from ..extras import require


def _attr(node, name, default=None):
    helper = require("onnx.helper")
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _plain_strided_1x1(conv, dq_out: str, kernel_of) -> tuple[int, ...] | None:
    """The strides of an unpadded, undilated 1x1 Conv reading ``dq_out`` as its data input, else None."""
    if conv.op_type != "Conv" or conv.input[0] != dq_out:
        return None
    kernel = list(_attr(conv, "kernel_shape", []) or kernel_of(conv))
    if kernel != [1, 1] or any(_attr(conv, "pads", [0, 0, 0, 0])):
        return None
    auto_pad = _attr(conv, "auto_pad", b"NOTSET")
    if (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) not in ("NOTSET", "VALID"):
        return None
    if list(_attr(conv, "dilations", [1, 1])) != [1, 1]:
        return None
    return tuple(_attr(conv, "strides", [1, 1]))


def subsample_before_dequantize(model) -> int:
    """Rewrite every DequantizeLinear whose consumers are all strided 1x1 convolutions; returns how many."""
    numpy_helper = require("onnx.numpy_helper")
    helper = require("onnx.helper")
    g = model.graph
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    dims = {i.name: list(i.dims) for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}

    def kernel_of(conv) -> list[int]:
        """kernel_shape is optional in ONNX: read it from the weight (behind its DequantizeLinear, if any)."""
        w = conv.input[1]
        if w in producer and producer[w].op_type == "DequantizeLinear":
            w = producer[w].input[0]
        if w in producer and producer[w].op_type == "QuantizeLinear":
            w = producer[w].input[0]
        return dims.get(w, [0, 0, 0, 0])[2:]

    done = 0
    for dq in [n for n in g.node if n.op_type == "DequantizeLinear"]:
        users = consumers.get(dq.output[0], [])
        if not users or dq.output[0] in outputs:
            continue
        strides = {_plain_strided_1x1(u, dq.output[0], kernel_of) for u in users}
        if len(strides) != 1 or None in strides:
            continue
        (step,) = strides
        if step is None or all(s == 1 for s in step):
            continue
        src = dq.input[0]
        out = f"{src}__subsampled"
        consts = [f"{out}_{k}" for k in ("starts", "ends", "axes", "steps")]
        for name, value in zip(consts, ([0, 0], [np.iinfo(np.int64).max] * 2, [2, 3], list(step))):
            g.initializer.append(numpy_helper.from_array(np.asarray(value, np.int64), name))
        g.node.insert(list(g.node).index(dq), helper.make_node("Slice", [src, *consts], [out], name=out))
        dq.input[0] = out
        for u in users:
            for a in u.attribute:
                if a.name == "strides":
                    a.ints[:] = [1] * len(step)
        done += 1
    return done


def openvino_runtime_precisions(path: str | Path, threads: int = 1) -> dict | None:
    """How OpenVINO's CPU plugin runs each convolution / fully connected layer: counts per precision,
    and the names of those not in INT8. None where OpenVINO is not installed."""
    try:
        import openvino as ov
    except ImportError:
        return None
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_NUM_THREADS": threads})
    counts: Counter = Counter()
    not_int8 = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str) if "layerType" in info else ""
        if kind not in ("Convolution", "FullyConnected", "MatMul", "Deconvolution"):
            continue
        prec = info["runtimePrecision"].astype(str).lower()
        counts[prec] += 1
        if prec not in ("u8", "i8"):
            not_int8.append(f"{op.get_friendly_name()} ({prec})")
    return {"per_precision": dict(sorted(counts.items())), "not_int8": not_int8}
