"""Export: ONNX with fused preprocessing, FP16/INT8 gates, manifests, and a TensorFlow-free consumer."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import BLOCK_TENSORFLOW

from cxr_edge.errors import ConfigError
from cxr_edge.precision import Int8Target, Precision, Variant, parse_precisions


def test_parse_precisions():
    tags = [v.tag for v in parse_precisions("fp16,int8")]
    assert tags == ["fp32", "fp16", "int8-trt", "int8-cpu", "int8-ov"]  # fp32 is always the reference
    assert [v.tag for v in parse_precisions("int8-ov")] == ["fp32", "int8-ov"]
    assert [v.tag for v in parse_precisions("int8-cpu")] == ["fp32", "int8-cpu"]
    assert [v.tag for v in parse_precisions("int8", "cpu")] == ["fp32", "int8-cpu"]
    assert Variant(Precision.INT8, Int8Target.TRT).filename() == "model.int8-trt.onnx"
    with pytest.raises(ConfigError, match="Unknown precision 'bf8'"):
        parse_precisions("fp32,bf8")
    with pytest.raises(ConfigError, match="Unknown INT8 target 'gpu'"):
        parse_precisions("int8", "gpu")


# --------------------------------------------------------------------------- with TensorFlow

@pytest.mark.train
def test_all_precisions_export_and_pass_their_gates(exported):
    _, s, _ = exported
    assert s.ok and [a.variant for a in s.artifacts] == ["fp32", "fp16", "int8-trt", "int8-cpu", "int8-ov"]
    assert all(a.kept and a.path.is_file() for a in s.artifacts)
    sizes = {a.variant: a.size_bytes for a in s.artifacts}
    assert sizes["fp16"] < 0.6 * sizes["fp32"] and sizes["int8-trt"] < 0.35 * sizes["fp32"]
    report = json.loads((s.out_dir / "export_report.json").read_text())
    assert report["data"]["same_as_training_data"] and report["data"]["calibration_split"] == "train"
    assert (s.out_dir / "export_report.md").read_text().count("| passed |") == 5


@pytest.mark.train
def test_onnx_contract_fused_preprocessing_and_checker(exported):
    import onnx

    _, s, _ = exported
    for a in s.artifacts:
        m = onnx.load(str(a.path))
        onnx.checker.check_model(m, full_check=True)
        (inp,) = m.graph.input
        assert inp.name == "image" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
        assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["N", 32, 32, 1]
        outs = {o.name: o.type.tensor_type.elem_type for o in m.graph.output}
        assert outs == {"probs": onnx.TensorProto.FLOAT, "features": onnx.TensorProto.FLOAT}
        consumers = [n.op_type for n in m.graph.node if "image" in n.input]
        direct = a.quantization.uint8_input_straight_to_first_dequantize if a.quantization else None
        assert direct or a.variant != "int8-cpu"
        if direct:  # the uint8 pixels are the first convolution's quantised input (exact)
            assert consumers == ["Reshape"]
            reshaped = next(n for n in m.graph.node if n.op_type == "Reshape").output[0]
            assert [n.op_type for n in m.graph.node if reshaped in n.input] == ["DequantizeLinear"]
        else:
            assert consumers == ["Cast"]  # raw bytes in: cast and normalisation happen inside the graph


@pytest.mark.train
def test_manifests_describe_artifacts_and_refuse_tampering(exported, tmp_path):
    import shutil

    from cxr_edge.errors import ManifestError
    from cxr_edge.manifest import manifest_path, read_manifest
    from cxr_edge.manifest_schema import TensorSpec

    r, s, _ = exported
    docs = {a.variant: read_manifest(a.path) for a in s.artifacts}
    fp32 = docs["fp32"]
    assert fp32.precision is Precision.FP32 and fp32.gate.passed and fp32.gate.metrics["max_abs_dprob"] <= 1e-4
    assert fp32.source_model.sha256 is not None and fp32.source_model.sha256 == read_manifest(r.model_path).sha256
    assert fp32.inputs[0] == TensorSpec("image", "uint8", ("N", 32, 32, 1))
    assert fp32.gradcam.engine_native and fp32.gradcam.layer == "conv2"
    assert [o.kind for o in fp32.gradcam.head_ops] == ["maxpool", "flatten", "dense", "dense"]
    for tag in ("fp16", "int8-trt", "int8-cpu"):
        assert docs[tag].parent.sha256 == fp32.sha256
    trt, cpu = docs["int8-trt"], docs["int8-cpu"]
    assert trt.int8_target is Int8Target.TRT and "S8S8" in trt.quantization.activations
    assert cpu.int8_target is Int8Target.CPU and "U8S8" in cpu.quantization.activations
    assert trt.quantization.int8_compute_nodes >= 3
    assert cpu.quantization.ort_cpu_int8_kernels.get("QLinearConv", 0) >= 1
    assert trt.calibration.calibration_split == "train" and trt.calibration.n_calibration > 0
    assert {"auc_drop", "sensitivity_drop", "top_class_agreement"} <= set(trt.gate.metrics)
    bad = tmp_path / "model.fp16.onnx"
    shutil.copy(s.artifacts[1].path, bad)
    shutil.copy(manifest_path(s.artifacts[1].path), manifest_path(bad))
    with open(bad, "r+b") as f:
        f.seek(200)
        f.write(b"\x13\x37")
    with pytest.raises(ManifestError, match="does not match its manifest"):
        read_manifest(bad)


@pytest.mark.train
def test_int8_trt_is_symmetric_and_int8_cpu_unsigned(exported):
    import onnx
    from onnx import numpy_helper

    _, s, _ = exported
    by = {a.variant: onnx.load(str(a.path)) for a in s.artifacts}
    for tag, dtype in (("int8-trt", np.int8), ("int8-cpu", np.uint8)):
        m = by[tag]
        inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
        zps = [inits[n.input[2]] for n in m.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
        assert zps and all(z.dtype == dtype for z in zps)
        if tag == "int8-trt":
            assert all((z == 0).all() for z in zps)


@pytest.mark.train
@pytest.mark.slow  # ~25 s: a second INT8 export of the session model
def test_blank_calibration_is_caught_by_the_gate(exported, tmp_path, monkeypatch):
    from cxr_edge.data.gate_data import load_gate_data
    from cxr_edge.export import pipeline

    r, _, data = exported

    def blank(*a, **kw):
        gd = load_gate_data(*a, **kw)
        gd.calib_x = np.zeros_like(gd.calib_x)
        return gd

    monkeypatch.setattr(pipeline, "load_gate_data", blank)
    s = pipeline.export_model(r.model_path, tmp_path / "a", pipeline.ExportConfig(precisions="int8", int8_targets="cpu"))
    bad = s.artifacts[-1]
    assert not s.ok and not bad.kept and bad.path is None
    assert len(pipeline.opening_attempts(pipeline.Int8Target.CPU, "minmax")) == 1
    assert len(bad.attempts) == 6 and not any(a.passed for a in bad.attempts)  # every remedy was tried
    assert [a.remedy.startswith("mixed precision") for a in bad.attempts] == [False] * 4 + [True] * 2
    assert not (tmp_path / "a" / "model.int8-cpu.onnx").exists()
    forced = pipeline.export_model(r.model_path, tmp_path / "b",
                                   pipeline.ExportConfig(precisions="int8", int8_targets="cpu", force=True))
    from cxr_edge.manifest import read_manifest

    doc = read_manifest(forced.artifacts[-1].path)
    assert doc.gate.passed is False and "do not deploy" in doc.gate_status


@pytest.mark.train
def test_sensitivity_ranks_compute_nodes_and_widens_to_blocks(exported, tmp_path):
    import onnx

    from cxr_edge.export.sensitivity import node_sensitivity, worst_nodes
    from cxr_edge.manifest import read_manifest
    from cxr_edge.preprocess import pack_source

    _, s, data = exported
    fp32 = next(a.path for a in s.artifacts if a.variant == "fp32")
    qdq = next(a.path for a in s.artifacts if a.variant == "int8-trt")

    spec = read_manifest(fp32).preprocess
    x = np.stack([pack_source(f, spec)[0] for f in sorted((data / "COVID").iterdir())[:4]])
    sens = node_sensitivity(fp32, qdq, x)
    from cxr_edge.export.quantize import pre_process_for_quantization

    # names as quantize() sees them: ORT's pre-processing (constant folding) renames some nodes
    model = onnx.load(str(pre_process_for_quantization(fp32, tmp_path / "pre.onnx")))
    compute = [n.name for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")]
    assert sens and set(sens) <= set(compute) and all(np.isfinite(v) for v in sens.values())
    assert len(worst_nodes(sens, 0.01)) == 1
    fake = {"m/conv2_block1_1_conv/Conv": -5.0, "m/conv3_block2_2_conv/Conv": -1.0, "Conv__7": 0.5}

    class G:  # a graph with the names a Keras ResNet export has
        class graph:
            node = [type("N", (), {"name": n})() for n in
                    ["m/conv2_block1_1_conv/Conv", "m/conv2_block1_1_relu/Relu", "m/conv2_block1_out/Add",
                     "m/conv3_block2_2_conv/Conv", "Conv__7"]]

    assert worst_nodes(fake, 0.3, G) == ["m/conv2_block1_1_conv/Conv", "m/conv2_block1_1_relu/Relu",
                                         "m/conv2_block1_out/Add"]


@pytest.mark.train
def test_exported_onnx_runs_without_tensorflow(exported):
    _, s, data = exported
    art = s.out_dir
    code = BLOCK_TENSORFLOW + textwrap.dedent(
        """
        import sys, json
        from pathlib import Path
        import numpy as np
        from cxr_edge.manifest import read_manifest
        from cxr_edge.runtime.backends.ort_session import cpu_session, run_batched
        from cxr_edge.runtime.head import load_head, forward
        from cxr_edge.synthetic import synthetic_parity_images
        art = Path(sys.argv[1])
        for name in ('model.fp32.onnx', 'model.fp16.onnx', 'model.int8-cpu.onnx', 'model.int8-trt.onnx'):
            doc = read_manifest(art / name)
            x = synthetic_parity_images(doc.preprocess, 4)
            out = run_batched(cpu_session(art / name), x)
            assert out['probs'].shape == (4, 2) and np.allclose(out['probs'].sum(1), 1, atol=1e-2)
            g = doc.gradcam
            head = load_head(g.head_ops, art / g.head_file)
            if name == 'model.fp32.onnx':
                assert np.abs(forward(head, out['features']) - out['probs']).max() < 1e-4
        from cxr_edge.runtime import Screener
        imgs = sorted((Path(sys.argv[2]) / 'COVID').iterdir())[:3]
        with Screener(art / 'model.int8-cpu.onnx') as s:
            res = s.predict(imgs + [b'junk'], explain=True, out_dir=art / 'explained')
        assert [r.ok for r in res] == [True, True, True, False]
        assert res[0].explanation.method == 'engine-native' and (art / 'explained').is_dir()
        assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules
        print('OK')
        """
    )
    out = subprocess.run([sys.executable, "-c", code, str(art), str(data)], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("OK")


@pytest.mark.train
@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["resnet50_tl", "resnet152v2_tl"])
def test_backbone_recipes_export_with_parity(tmp_path, recipe):
    from cxr_edge.export.pipeline import ExportConfig, export_model
    from cxr_edge.synthetic import write_synthetic_dataset
    from cxr_edge.train.trainer import TrainConfig, train

    data = write_synthetic_dataset(tmp_path / "d", per_class=12, sizes=(64,), seed=6)
    # precise-BN off: at 32 px conv5 is 1x1, so a batch of 8 gives BN 8 values per channel and the
    # re-estimated variances are degenerate (the FP32 gate then sees 2.5e-4 of float noise); it has its
    # own test, and the real 224 px ResNet152V2 exports with FP32 parity 2.3e-6 (closing note, issue 3)
    r = train(TrainConfig(recipe=recipe, epochs=1, fine_tune_epochs=0, batch_size=8, image_size=32,
                          weights="none", verbose=0, precise_bn=False), data, tmp_path / "m")
    s = export_model(r.model_path, tmp_path / "a", ExportConfig(precisions="fp32,fp16", calib_size=20))
    fp32, fp16 = s.artifacts
    assert fp32.gate.passed and fp32.gate.metrics["max_abs_dprob"] <= 1e-4
    assert fp16.gate.metrics["max_abs_dprob"] <= 1e-2
    from cxr_edge.manifest import read_manifest

    g = read_manifest(fp32.path).gradcam
    assert g.engine_native, g
    assert g.layer == {"resnet50_tl": "conv5_block3_out", "resnet152v2_tl": "post_relu"}[recipe]


def test_calibration_reader_protocol():
    from cxr_edge.export.quantize import ArrayCalibrationReader

    x = np.arange(10 * 2 * 2 * 1, dtype=np.uint8).reshape(10, 2, 2, 1)
    r = ArrayCalibrationReader(x, "image", batch=4)
    batches = list(iter(r.get_next, None))
    assert len(r) == 2 and [b["image"].shape[0] for b in batches] == [4, 4]  # equal sizes, remainder dropped
    r.set_range(1, 2)
    assert np.array_equal(r.get_next()["image"], x[4:8]) and r.get_next() is None
    assert len(ArrayCalibrationReader(x[:3], "image", batch=16)) == 1


@pytest.mark.train
def test_the_float_remedy_keeps_first_conv_and_classifier_in_float(exported, tmp_path):
    """Node names must be those quantize() sees: ORT's pre-processing renames MatMul+Add (a Keras Dense)
    to '.../MatMulAddFusion', and excluding the exported name silently left the classifier in INT8."""
    from cxr_edge.export.pipeline import _int8_attempts
    from cxr_edge.export.quantize import quantize
    from cxr_edge.precision import Int8Target

    _, s, _ = exported
    fp32 = next(a.path for a in s.artifacts if a.variant == "fp32")
    remedy = next(c for c in _int8_attempts(Int8Target.CPU, "minmax", fp32)[1] if c.exclude_nodes)
    assert len(remedy.exclude_nodes) == 2 and any("MatMulAddFusion" in n for n in remedy.exclude_nodes)
    rng = np.random.default_rng(0)
    info = quantize(fp32, tmp_path / "q.onnx", rng.integers(0, 256, (8, 32, 32, 1), dtype=np.uint8), remedy)
    assert info["float_compute_nodes"] >= 2, info  # both really stayed float
