"""The OpenVINO INT8 artifact is quantised by ONNX Runtime (min-max and percentile) and by NNCF, and the one
closest to FP32 on the gate images is kept; all come out as QDQ ONNX with every convolution INT8 and the
CPU rewrites applied. Its activations are S8 where the graph allows negatives and U8 elsewhere."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("sympy")

from cxr_edge.errors import ConfigError  # noqa: E402
from cxr_edge.export.quantize import QuantConfig, quantize  # noqa: E402
from cxr_edge.manifest_schema import Quantization  # noqa: E402
from cxr_edge.precision import Int8Target  # noqa: E402


def _fp32(tmp_path):
    from tiny_models import gradcam_model

    model, _, _ = gradcam_model(seed=4, size=32, filters=8)
    path = tmp_path / "model.fp32.onnx"
    onnx.save(model, str(path))
    return path


def _probs(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["probs"], {"image": x})[0]


def test_nncf_quantiser_writes_a_qdq_graph_close_to_fp32(tmp_path):
    pytest.importorskip("nncf")
    fp32 = _fp32(tmp_path)
    rng = np.random.default_rng(0)
    calib = rng.integers(0, 256, (48, 32, 32, 1), dtype=np.uint8)
    out = tmp_path / "nncf.onnx"
    info = quantize(fp32, out, calib, QuantConfig(Int8Target.OV, quantizer="nncf"))
    assert info["quantizer"] == "nncf" and info["int8_compute_nodes"] >= 1
    assert "strided_1x1_subsampled_before_dequantize" in info  # the CPU rewrites run for either quantiser
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    x = rng.integers(0, 256, (16, 32, 32, 1), dtype=np.uint8)
    assert np.abs(_probs(out, x) - _probs(fp32, x)).max() < 0.1


def test_nncf_is_refused_outside_the_openvino_target():
    for target in (Int8Target.TRT, Int8Target.CPU):
        with pytest.raises(ConfigError, match="ov target only"):
            QuantConfig(target, quantizer="nncf")
    with pytest.raises(ConfigError, match="Unknown quantizer"):
        QuantConfig(Int8Target.OV, quantizer="tflite")


def test_the_openvino_ladder_measures_its_rivals_before_keeping_one(tmp_path):
    """The first attempt passing does not end the ladder while percentile calibration and NNCF are unmeasured."""
    import importlib.util

    from cxr_edge.export import pipeline

    fp32 = _fp32(tmp_path)
    ov = pipeline.opening_attempts(Int8Target.OV, "minmax")
    want = [("onnxruntime", "minmax"), ("onnxruntime", "percentile")]
    want += [("nncf", "minmax")] if importlib.util.find_spec("nncf") else []
    assert [(c.quantizer, c.method) for c in ov] == want
    ort_methods = [c.method for c in pipeline.opening_attempts(Int8Target.OV, "percentile") if c.quantizer == "onnxruntime"]
    assert ort_methods == ["percentile"]  # asked for percentile: no second percentile attempt
    for target in (Int8Target.TRT, Int8Target.CPU):
        opening, remedies = pipeline._int8_attempts(target, "minmax", fp32)
        assert all(c.quantizer == "onnxruntime" for c in opening + remedies)
        assert len(pipeline.opening_attempts(target, "minmax")) == 1


def test_the_closer_of_two_passing_attempts_wins():
    from cxr_edge.export.gates import GateResult
    from cxr_edge.export.pipeline import Int8Attempt

    def attempt(n, dprob, agree=1.0, passed=True, int8=4):
        g = GateResult("int8", passed, 100, {"top_class_agreement": agree, "max_abs_dprob": dprob}, {}, [])
        return Int8Attempt(n, QuantConfig(Int8Target.CPU), None, g,
                           Quantization(Int8Target.CPU, int8_compute_nodes=int8, int8_mac_share=int8 / 4))

    a, b = attempt(1, 0.05), attempt(2, 0.004)
    assert max([a, b], key=lambda t: t.score) is b
    assert max([attempt(1, 0.5), attempt(2, 0.001, agree=0.98)], key=lambda t: t.score).number == 1
    assert max([attempt(1, 0.001, passed=False), attempt(2, 0.3)], key=lambda t: t.score).number == 2
    # closer to FP32 by leaving two layers in float does not win over a fully INT8 graph that passes
    assert max([attempt(1, 0.014, int8=4), attempt(2, 0.013, int8=2)], key=lambda t: t.score).number == 1


def test_the_openvino_ladder_also_measures_percentile_with_the_classifier_head_in_float(tmp_path):
    """ResNet152V2's worst layer by SQNR was its head's first Dense: the ov target measures keeping the
    head (everything after the global pool) float; the cpu and trt targets do not."""
    from cxr_edge.export import pipeline
    from cxr_edge.export.quantize import classifier_head, pre_process_for_quantization

    fp32 = _fp32(tmp_path)
    head = classifier_head(onnx.load(str(pre_process_for_quantization(fp32, tmp_path / "pre.onnx"))))
    assert head and "gap" not in head and "conv" not in head and any("classifier" in n for n in head)
    opening, _ = pipeline._int8_attempts(Int8Target.OV, "minmax", fp32)
    floated = [c for c in opening if c.exclude_nodes]
    assert len(floated) == 1 and floated[0].method == "percentile" and floated[0].exclude_nodes == tuple(head)
    for target in (Int8Target.CPU, Int8Target.TRT):
        assert not any(c.exclude_nodes for c in pipeline._int8_attempts(target, "minmax", fp32)[0])
    rng = np.random.default_rng(0)
    info = quantize(fp32, tmp_path / "q.onnx", rng.integers(0, 256, (16, 32, 32, 1), dtype=np.uint8), floated[0])
    assert info["int8_compute_nodes"] == 1 and info["float_compute_nodes"] == 1  # conv INT8, classifier float
    assert 0.9 < info["int8_mac_share"] < 1.0  # the 8x2 classifier is a sliver of the conv's work


def test_no_classifier_head_without_a_global_pool_or_compute_after_it():
    from onnx import TensorProto, helper, numpy_helper

    from cxr_edge.export.quantize import classifier_head

    def graph(pool, *, dense=True, opset=17):
        inits = [numpy_helper.from_array(np.ones((4, 1, 3, 3), np.float32), "w"),
                 numpy_helper.from_array(np.ones((4, 2), np.float32), "fw"),
                 numpy_helper.from_array(np.array([2, 3], np.int64), "axes")]
        nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv")]
        if pool == "reducemean":
            attrs = {"axes": [2, 3]} if opset < 18 else {}
            nodes.append(helper.make_node("ReduceMean", ["c"] + (["axes"] if opset >= 18 else []), ["p"],
                                          keepdims=0, name="pool", **attrs))
        else:
            nodes.append(helper.make_node("Flatten", ["c"], ["p"], name="pool"))
        nodes.append(helper.make_node("MatMul" if dense else "Relu", ["p", "fw"] if dense else ["p"], ["y"], name="head"))
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])

    assert classifier_head(graph("reducemean")) == ["head"]
    assert classifier_head(graph("reducemean", opset=18)) == ["head"]  # axes as an input from opset 18
    assert classifier_head(graph("flatten")) == []  # a Flatten head is much of a small CNN's work
    assert classifier_head(graph("reducemean", dense=False)) == []


def test_a_sliver_of_float_work_does_not_count_against_a_closer_attempt():
    """The INT8 share of MACs, in 0.1% steps, orders passing attempts before their closeness to FP32."""
    from cxr_edge.export.gates import GateResult
    from cxr_edge.export.pipeline import Int8Attempt

    def attempt(n, dprob, share):
        g = GateResult("int8", True, 100, {"top_class_agreement": 1.0, "max_abs_dprob": dprob}, {}, [])
        return Int8Attempt(n, QuantConfig(Int8Target.OV), None, g, Quantization(Int8Target.OV, int8_mac_share=share))

    # ResNet152V2's head: 0.011% of the MACs float, and closer to FP32 -> it wins
    assert max([attempt(1, 0.08, 1.0), attempt(2, 0.05, 0.99989)], key=lambda t: t.score).number == 2
    # ResNet50's first conv is ~2.9% of its MACs: closer by leaving that undone does not win
    assert max([attempt(1, 0.08, 1.0), attempt(2, 0.01, 0.971)], key=lambda t: t.score).number == 1


def test_a_passing_opening_attempt_is_kept_when_the_last_one_fails():
    """Remedies run only while nothing has passed: a failing rival measured last does not reopen the ladder."""
    from types import SimpleNamespace

    from cxr_edge.export.gates import GateResult
    from cxr_edge.export.pipeline import Int8Attempt, climb_ladder

    def run(passes):
        def attempt(number, qc):
            g = GateResult("int8", passes[number - 1], 100, {"top_class_agreement": 1.0, "max_abs_dprob": 0.1}, {}, [])
            return Int8Attempt(number, qc, None, g, Quantization(qc.target, int8_mac_share=1.0))
        opening = [QuantConfig(Int8Target.OV), QuantConfig(Int8Target.OV, "percentile")]
        remedies = [QuantConfig(Int8Target.OV, exclude_nodes=("a",)), QuantConfig(Int8Target.OV, "entropy")]
        cfg = SimpleNamespace(mixed_precision=False)
        return climb_ladder(opening, remedies, cfg, None, None, attempt)

    attempts, best = run([True, False, True, True])
    assert len(attempts) == 2 and best.number == 1
    attempts, best = run([False, False, False, True])  # nothing passed: remedies until one does
    assert len(attempts) == 4 and best.number == 4
    attempts, best = run([False, False, True, True])
    assert len(attempts) == 3 and best.number == 3


def test_per_node_macs_count_every_node_even_unnamed_or_repeated_names():
    from onnx import TensorProto, helper, numpy_helper

    from cxr_edge.graph_macs import macs_per_image, macs_per_node

    inits = [numpy_helper.from_array(np.ones((4, 1, 3, 3), np.float32), "w1"),
             numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),  # unnamed
             helper.make_node("Conv", ["a", "w2"], ["b"], name="c"),
             helper.make_node("Conv", ["b", "w2"], ["y"], name="c")]  # same name again
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert macs_per_node(m) == {"a": 4 * 64 * 9, "b": 4 * 64 * 4, "y": 4 * 64 * 4}
    assert macs_per_image(m) == 4 * 64 * 17
