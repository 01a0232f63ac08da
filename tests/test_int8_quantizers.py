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
from cxr_edge.export.artifacts import Int8Target  # noqa: E402
from cxr_edge.export.quantize import QuantConfig, quantize  # noqa: E402


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
        ladder = pipeline._int8_attempts(target, "minmax", fp32)
        assert all(c.quantizer == "onnxruntime" for c in ladder)
        assert len(pipeline.opening_attempts(target, "minmax")) == 1


def test_the_closer_of_two_passing_attempts_wins():
    from cxr_edge.export.gates import GateResult
    from cxr_edge.export.pipeline import Int8Attempt

    def attempt(n, dprob, agree=1.0, passed=True, int8=4):
        g = GateResult("int8", passed, 100, {"top_class_agreement": agree, "max_abs_dprob": dprob}, {}, [])
        return Int8Attempt(n, QuantConfig(Int8Target.CPU), None, g, {"int8_compute_nodes": int8})

    a, b = attempt(1, 0.05), attempt(2, 0.004)
    assert max([a, b], key=lambda t: t.score) is b
    assert max([attempt(1, 0.5), attempt(2, 0.001, agree=0.98)], key=lambda t: t.score).number == 1
    assert max([attempt(1, 0.001, passed=False), attempt(2, 0.3)], key=lambda t: t.score).number == 2
    # closer to FP32 by leaving two layers in float does not win over a fully INT8 graph that passes
    assert max([attempt(1, 0.014, int8=4), attempt(2, 0.013, int8=2)], key=lambda t: t.score).number == 1
