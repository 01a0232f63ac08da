"""Rewrites of a QDQ graph that keep its arithmetic and let CPU runtimes keep every convolution in INT8.

OpenVINO's CPU plugin moves the stride of a 1x1 stride-2 convolution up to the tensor it reads
("strides optimisation"). When that tensor comes through a DequantizeLinear, the stride lands between the
dequantisation and the convolution, the pair no longer matches the INT8 convolution pattern, and the
convolution runs in bf16/f32 (in ResNet50, the six stride-2 1x1 convolutions of conv{3,4,5}_block1, which then
take a larger share of the time than of the MACs; ``openvino_runtime_precisions`` lists them per layer).

Subsampling the *quantised* tensor first (``Q -> Slice(step 2) -> DQ -> Conv(1x1, stride 1)``) is the same
arithmetic (a 1x1 stride-2 unpadded convolution reads every second pixel, nothing else), moves a quarter of
the bytes, and leaves nothing for the plugin to move: every convolution stays INT8.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from ..extras import require
from ..onnx_graph import GraphIndex, attr, drop_unused_initializers


def _plain_strided_1x1(conv, dq_out: str, kernel_of) -> tuple[int, ...] | None:
    """The strides of an unpadded, undilated 1x1 Conv reading ``dq_out`` as its data input, else None."""
    if conv.op_type != "Conv" or conv.input[0] != dq_out:
        return None
    kernel = list(attr(conv, "kernel_shape", []) or kernel_of(conv))
    if kernel != [1, 1] or any(attr(conv, "pads", [0, 0, 0, 0])):
        return None
    auto_pad = attr(conv, "auto_pad", b"NOTSET")
    if (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) not in ("NOTSET", "VALID"):
        return None
    if list(attr(conv, "dilations", [1, 1])) != [1, 1]:
        return None
    return tuple(attr(conv, "strides", [1, 1]))


def subsample_before_dequantize(model) -> int:
    """Rewrite every DequantizeLinear whose consumers are all strided 1x1 convolutions; returns how many."""
    helper = require("onnx.helper")
    G = GraphIndex(model)
    g = G.graph
    dims = {name: list(t.dims) for name, t in G.initializers.items()}  # before the Slice constants join them

    def kernel_of(conv) -> list[int]:
        """kernel_shape is optional in ONNX: read it from the weight (behind its DequantizeLinear, if any)."""
        w = conv.input[1]
        for op in ("DequantizeLinear", "QuantizeLinear"):
            src = G.producer(w)
            if src is not None and src.op_type == op:
                w = src.input[0]
        return dims.get(w, [0, 0, 0, 0])[2:]

    done = 0
    for dq in [n for n in g.node if n.op_type == "DequantizeLinear"]:
        users = G.consumers(dq.output[0])
        if not users or dq.output[0] in G.outputs:
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
            G.add_initializer(name, np.asarray(value, np.int64))
        g.node.insert(list(g.node).index(dq), helper.make_node("Slice", [src, *consts], [out], name=out))
        dq.input[0] = out
        for u in users:
            for a in u.attribute:
                if a.name == "strides":
                    a.ints[:] = [1] * len(step)
        done += 1
    return done


_MOVES = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten")  # data movement that works on uint8 as on float


def quantised_input(model) -> bool:
    """Feed the uint8 pixels straight into the first DequantizeLinear: ``image -> [Reshape] -> DQ(1, 0)``.

    The graph starts ``uint8 -> Cast -> [Reshape] -> Q -> DQ -> Conv``; when nothing but data movement sits
    between the cast and the quantiser, quantising the cast pixels with scale 1 and zero point 0 gives back
    the pixels themselves, so the Cast and the Q are dropped and the DQ reads the input (exact: DQ(x; 1, 0) is
    the float pixel value the FP32 graph sees). Without it OpenVINO converts, reorders in bf16 and re-quantises
    the whole input every call and runs the first convolution in bf16. Only where the input's quantiser is uint8
    (the cpu and ov targets: pixels are never negative); returns whether it applied.
    """
    G = GraphIndex(model)
    g = G.graph
    inp = g.input[0]
    if inp.type.tensor_type.elem_type != 2:  # uint8
        return False
    users = G.consumers(inp.name)
    if len(users) != 1 or users[0].op_type != "Cast":
        return False
    cast, chain, node = users[0], [], users[0]
    while True:
        nxt = G.consumers(node.output[0])
        if len(nxt) != 1 or node.output[0] in G.outputs:
            return False
        node = nxt[0]
        if node.op_type in _MOVES:
            chain.append(node)
            continue
        break
    q = node
    if q.op_type != "QuantizeLinear" or len(q.input) < 3 or q.input[2] not in G.initializers:
        return False
    zero_point = G.array(q.input[2])
    if zero_point is None or zero_point.dtype != np.uint8:
        return False
    dqs = G.consumers(q.output[0])
    if not dqs or any(d.op_type != "DequantizeLinear" for d in dqs):
        return False
    one = f"{q.name}__unit_scale"
    zero = f"{q.name}__zero_point"
    G.add_initializer(one, np.asarray(1.0, np.float32))
    G.add_initializer(zero, np.asarray(0, np.uint8))
    if chain:
        chain[0].input[0] = inp.name
        head = chain[-1].output[0]
    else:
        head = inp.name
    for d in dqs:
        d.input[0], d.input[1] = head, one
        if len(d.input) > 2:
            d.input[2] = zero
        else:
            d.input.append(zero)
    G.remove_nodes([q, cast])
    moved = {n.output[0] for n in chain}  # now uint8: their recorded float types are stale
    stale = [v for v in g.value_info if v.name in moved]
    for v in stale:
        g.value_info.remove(v)
    drop_unused_initializers(g)
    return True


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
