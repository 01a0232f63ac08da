"""TensorRT's QDQ rules on hand-built graphs: each rule fires on its bad case and stays quiet on the good one."""

import numpy as np
import pytest
import tiny_models as tiny
from onnx import TensorProto, helper, numpy_helper

from cxr_edge.export.trt_lint import lint_qdq


def _graph(nodes, inits, outputs=("y",)):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _conv(zp=np.int8(0), axis=0, bias_dq=False, w_scale=None, consumer="Conv"):
    inits = {"s": np.array(0.1, np.float32), "zp": np.array(zp),
             "wq": np.ones((2, 4, 3, 3), np.int8), "ws": w_scale if w_scale is not None else np.full(2, 0.01, np.float32),
             "wzp": np.zeros(2, np.int8), "b": np.zeros(2, np.float32)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q_x"),
             helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], name="dq_x"),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wzp"], ["wd"], axis=axis, name="dq_w")]
    bias = "b"
    if bias_dq:
        inits.update({"bq": np.zeros(2, np.int32), "bs": np.full(2, 0.001, np.float32)})
        nodes.append(helper.make_node("DequantizeLinear", ["bq", "bs"], ["bd"], axis=0, name="dq_bias"))
        bias = "bd"
    if consumer == "Conv":
        nodes.append(helper.make_node("Conv", ["xd", "wd", bias], ["y"], name="conv"))
    else:
        nodes.append(helper.make_node(consumer, ["xd"], ["y"], name="odd"))
        nodes.append(helper.make_node("Conv", ["x", "wd", bias], ["y2"], name="conv"))
    return _graph(nodes, inits, ("y",) if consumer == "Conv" else ("y", "y2"))


def test_clean_graph_has_no_violations():
    assert lint_qdq(_conv()) == []


@pytest.mark.parametrize("kw, rule, node", [
    ({"bias_dq": True}, "int32-bias-dq", "dq_bias"),
    ({"zp": np.uint8(128)}, "asymmetric", "q_x"),
    ({"zp": np.int8(3)}, "asymmetric", "q_x"),
    ({"axis": 1}, "weight-axis", "dq_w"),
    ({"w_scale": np.array([0.01, -0.01], np.float32)}, "scale", "dq_w"),
    ({"consumer": "Softmax"}, "unfused-dq", "dq_x"),
])
def test_each_rule_names_the_offending_node(kw, rule, node):
    found = {(v.rule, v.node) for v in lint_qdq(_conv(**kw))}
    assert (rule, node) in found, found


def test_gemm_weight_axis_follows_transB():
    def gemm(trans_b, axis):
        inits = {"wq": np.ones((3, 4) if trans_b else (4, 3), np.int8), "ws": np.full(3, 0.1, np.float32),
                 "wzp": np.zeros(3, np.int8)}
        nodes = [helper.make_node("Flatten", ["x"], ["f"]),
                 helper.make_node("DequantizeLinear", ["wq", "ws", "wzp"], ["wd"], axis=axis, name="dq_w"),
                 helper.make_node("Gemm", ["f", "wd"], ["y"], transB=trans_b)]
        return _graph(nodes, inits)

    assert lint_qdq(gemm(1, 0)) == [] and lint_qdq(gemm(0, 1)) == []
    assert [v.rule for v in lint_qdq(gemm(0, 0))] == ["weight-axis"]


def test_exported_trt_graph_is_clean_and_the_cpu_one_is_not(tmp_path):
    trt = tiny.write_artifact(tmp_path, "int8-trt")
    cpu = tiny.write_artifact(tmp_path, "int8-cpu")
    assert lint_qdq(trt) == []
    from cxr_edge.manifest import read_manifest

    assert read_manifest(trt).quantization.tensorrt_lint == ()
    assert {v.rule for v in lint_qdq(cpu)} >= {"asymmetric", "int32-bias-dq"}
