"""The int8-ov flavour: activations that can be negative become symmetric S8, the rest stay U8, decided from
the graph; the QDQ graph it gives stays close to FP32 and keeps every conv INT8."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from cxr_edge.export.activation_signs import nonnegative_tensors, signed_activation_overrides  # noqa: E402


def _residual_v2(seed: int = 0, size: int = 16, c: int = 4):
    """A ResNetV2-shaped block: conv -> relu -> conv, a residual Add with no ReLU after it, a pre-activation
    batch-norm (Mul, Add) and ReLU, then pooling and a classifier; plus side branches for the sign rules."""
    rng = np.random.default_rng(seed)
    arrays = {
        "s": np.array(1 / 255, np.float32),
        "w1": rng.normal(0, 0.5, (c, 1, 3, 3)).astype(np.float32), "b1": rng.normal(0, 0.1, c).astype(np.float32),
        "w2": rng.normal(0, 0.3, (c, c, 3, 3)).astype(np.float32), "b2": rng.normal(0, 0.1, c).astype(np.float32),
        "w3": rng.normal(0, 0.3, (c, c, 1, 1)).astype(np.float32), "b3": np.zeros(c, np.float32),
        "gamma": rng.uniform(0.5, 1.5, (1, c, 1, 1)).astype(np.float32),
        "beta": rng.normal(0, 0.2, (1, c, 1, 1)).astype(np.float32),
        "kernel": rng.normal(0, 1.0, (c, 3)).astype(np.float32), "bias": np.zeros(3, np.float32),
        "zero": np.array(0.0, np.float32), "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
        "minus": np.array(-1.0, np.float32),
    }
    inits = [numpy_helper.from_array(v, k) for k, v in arrays.items()]
    n = helper.make_node
    nodes = [
        n("Cast", ["image"], ["f"], to=TensorProto.FLOAT, name="cast"),
        n("Mul", ["f", "s"], ["fs"], name="rescale"),
        n("Transpose", ["fs"], ["x"], perm=[0, 3, 1, 2], name="to_nchw"),
        n("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        n("Relu", ["c1"], ["r1"], name="relu1"),
        n("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
        n("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        n("Relu", ["c2"], ["r2"], name="relu2"),
        n("Conv", ["r2", "w3", "b3"], ["c3"], name="conv3"),
        n("Add", ["c3", "p1"], ["res"], name="residual"),  # no ReLU after it: signed
        n("Mul", ["res", "gamma"], ["bn_m"], name="preact_bn_mul"),
        n("Add", ["bn_m", "beta"], ["bn"], name="preact_bn_add"),
        n("Relu", ["bn"], ["r3"], name="preact_relu"),
        n("Clip", ["bn", "zero"], ["clipped"], name="clip"),  # Clip(min 0): non-negative
        n("Pad", ["r3", "pads", "minus"], ["padded"], mode="constant", name="pad_minus"),  # pads -1: signed
        n("Concat", ["r3", "clipped"], ["cat"], axis=1, name="concat"),
        n("GlobalAveragePool", ["cat"], ["gap2"], name="gap_side"),
        n("GlobalAveragePool", ["r3"], ["gap"], name="gap"),
        n("Flatten", ["gap"], ["flat"], name="flatten"),
        n("Gemm", ["flat", "kernel", "bias"], ["logits"], name="classifier"),
        n("Softmax", ["logits"], ["probs"], axis=1, name="softmax"),
    ]
    graph = helper.make_graph(
        nodes, "residual_v2", [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", size, size, 1])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("padded", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("gap2", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_signs_follow_the_graph():
    nonneg = nonnegative_tensors(_residual_v2())
    for t in ("image", "f", "fs", "x", "r1", "p1", "r2", "r3", "clipped", "cat", "gap", "gap2", "flat", "probs"):
        assert t in nonneg, t
    for t in ("c1", "c2", "c3", "res", "bn_m", "bn", "padded", "logits"):
        assert t not in nonneg, t


def test_overrides_name_only_signed_tensors():
    pytest.importorskip("onnxruntime.quantization")
    over = signed_activation_overrides(_residual_v2())
    assert {"c3", "res", "bn_m", "bn"} <= set(over)
    assert not {"r1", "p1", "r3", "image", "gamma"} & set(over)
    assert all(v[0]["symmetric"] is True for v in over.values())


def _zero_point_types(path):
    m = onnx.load(str(path))
    init = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    return {q.input[0]: (init[q.input[2]].dtype, int(init[q.input[2]].ravel()[0]))
            for q in m.graph.node if q.op_type == "QuantizeLinear" and len(q.input) > 2 and q.input[2] in init}


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_the_openvino_flavour_quantises_signed_tensors_s8_and_stays_close(tmp_path, method):
    pytest.importorskip("sympy")
    from cxr_edge.export.quantize import QuantConfig, quantize
    from cxr_edge.precision import Int8Target

    fp32 = tmp_path / "m.onnx"
    onnx.save(_residual_v2(), str(fp32))
    rng = np.random.default_rng(1)
    calib = rng.integers(0, 256, (64, 16, 16, 1), dtype=np.uint8)
    out_ov, out_cpu = tmp_path / "ov.onnx", tmp_path / "cpu.onnx"
    info = quantize(fp32, out_ov, calib, QuantConfig(Int8Target.OV, method))
    quantize(fp32, out_cpu, calib, QuantConfig(Int8Target.CPU, method))
    assert info["float_compute_nodes"] == 0 and "where the graph allows negatives" in info["activations"]
    ov, cpu = _zero_point_types(out_ov), _zero_point_types(out_cpu)
    signed = [t for t in ov if t in {"c3", "res", "bn_m"}]
    assert signed, ov  # the residual sum and its neighbours are quantised ...
    for t in signed:
        assert ov[t] == (np.int8, 0), (t, ov[t])  # ... as symmetric S8 in the ov flavour
        assert cpu[t][0] == np.uint8  # and as U8 (a zero point) in the cpu flavour
    unsigned = [t for t in ov if t in {"p1", "r1", "r2", "r3"}]
    assert unsigned and all(ov[t][0] == np.uint8 for t in unsigned)
    x = rng.integers(0, 256, (16, 16, 16, 1), dtype=np.uint8)

    def probs(p):
        return ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(["probs"], {"image": x})[0]

    assert np.abs(probs(out_ov) - probs(fp32)).max() < 0.05
