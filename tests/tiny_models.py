"""Tiny ONNX artifacts built with onnx.helper (no TensorFlow): the same I/O contract as exported models.

uint8 NHWC image -> Cast -> Transpose -> Conv(3x3, 4) -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> Softmax.
Weights are seeded; each artifact gets a manifest as ``cxr-edge export`` writes them, so the runtime,
the TensorRT build path and the fakes can be driven end to end on a CPU machine in milliseconds.

:func:`write_artifact_set` goes further and writes what ``cxr-edge export`` writes for a model with a
Grad-CAM contract: a ``features`` output (NHWC, like Keras), ``model.head.npz`` with the head as
``gap -> dense(softmax)``, fp32/fp16/int8-trt/int8-cpu variants with gates, an operating point and the
training data's fingerprint, so runtime, serve, bench, trust and fault tests need no TensorFlow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSES = ["COVID", "Normal"]
SIZE = 16


def preprocess(size: int = SIZE) -> dict:
    from cxr_edge.preprocess import PreprocessSpec

    return PreprocessSpec(height=size, width=size, mode="rescale", input_channels=1, model_channels=1).to_dict()


def tiny_model(seed: int = 0, size: int = SIZE):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.5, (4, 1, 3, 3)).astype(np.float32)
    b = rng.normal(0, 0.1, (4,)).astype(np.float32)
    fw = rng.normal(0, 1.0, (4, 2)).astype(np.float32)
    fb = np.zeros(2, np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w, "w"), (b, "b"), (fw, "fw"), (fb, "fb"),
                                                          (np.array(1 / 255, np.float32), "s"))]
    nodes = [
        helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Mul", ["f", "s"], ["fs"], name="rescale"),
        helper.make_node("Transpose", ["fs"], ["nchw"], perm=[0, 3, 1, 2], name="to_nchw"),
        helper.make_node("Conv", ["nchw", "w", "b"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["conv"], ["features"], name="relu"),
        helper.make_node("GlobalAveragePool", ["features"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fw", "fb"], ["logits"], name="classifier"),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1, name="softmax"),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", size, size, 1])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 2])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def manifest_fields(precision: str = "fp32", **extra) -> dict:
    return {"kind": "onnx", "format": "onnx", "precision": precision, "classes": CLASSES, "preprocess": preprocess(),
            "inputs": [{"name": "image", "shape": [None, SIZE, SIZE, 1], "dtype": "uint8"}],
            "outputs": [{"name": "probs", "shape": [None, 2], "dtype": "float32"}],
            "operating_point": {"threshold": 0.5}, "gate": {"passed": True}, **extra}


def write_artifact(out_dir: Path, precision: str = "fp32", seed: int = 0) -> Path:
    """model.fp32.onnx (or .fp16 / .int8-trt / .int8-cpu) with its manifest, in ``out_dir``."""
    import onnx

    from cxr_edge.manifest import write_manifest

    out_dir.mkdir(parents=True, exist_ok=True)
    fp32 = out_dir / "model.fp32.onnx"
    if not fp32.is_file():
        onnx.save(tiny_model(seed), str(fp32))
        write_manifest(fp32, manifest_fields("fp32", parent=None))
    if precision == "fp32":
        return fp32
    from cxr_edge.manifest import read_manifest

    parent = {"file": fp32.name, "sha256": read_manifest(fp32).sha256}
    if precision == "fp16":
        from cxr_edge.export.fp16 import convert_fp16

        path = out_dir / "model.fp16.onnx"
        convert_fp16(fp32, path)
        write_manifest(path, manifest_fields("fp16", parent=parent))
        return path
    from cxr_edge.export.quantize import QuantConfig, quantize

    target = precision.split("-")[1]
    path = out_dir / f"model.{precision}.onnx"
    rng = np.random.default_rng(1)
    calib = rng.integers(0, 256, (32, SIZE, SIZE, 1), dtype=np.uint8)
    info = quantize(fp32, path, calib, QuantConfig(target))
    write_manifest(path, manifest_fields("int8", parent=parent, int8_target=target, quantization=info))
    return path


def images(n: int, seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 1), dtype=np.uint8)


GRADCAM_CLASSES = ["COVID", "Normal"]


def gradcam_model(seed: int = 0, size: int = 32, filters: int = 4):
    """Like :func:`tiny_model`, plus a ``features`` output (NHWC) and a head the runtime can differentiate.

    The conv reads mean brightness and local contrast, so the probabilities vary with the image (a model
    whose output is constant would make batching and ordering tests vacuous).
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.5, (filters, 1, 3, 3)).astype(np.float32)
    b = rng.normal(0, 0.1, (filters,)).astype(np.float32)
    kernel = rng.normal(0, 2.0, (filters, 2)).astype(np.float32)
    bias = np.array([0.0, 0.0], np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((w, "w"), (b, "b"), (kernel, "kernel"), (bias, "bias"), (np.array(1 / 255, np.float32), "s"))]
    nodes = [
        helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Mul", ["f", "s"], ["fs"], name="rescale"),
        helper.make_node("Transpose", ["fs"], ["nchw"], perm=[0, 3, 1, 2], name="to_nchw"),
        helper.make_node("Conv", ["nchw", "w", "b"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["conv"], ["act"], name="relu"),
        helper.make_node("Transpose", ["act"], ["features"], perm=[0, 2, 3, 1], name="to_nhwc"),
        helper.make_node("GlobalAveragePool", ["act"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "kernel", "bias"], ["logits"], name="classifier"),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1, name="softmax"),
    ]
    graph = helper.make_graph(
        nodes, "tiny_gradcam", [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", size, size, 1])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", size, size, filters]),
         helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    head = {"1/kernel": kernel, "1/bias": bias}
    ops = [{"kind": "gap", "layer": "gap", "params": {}},
           {"kind": "dense", "layer": "classifier", "params": {"activation": "softmax"}}]
    return model, ops, head


class TinyArtifact:
    def __init__(self, variant: str, path: Path, gate: dict):
        self.variant, self.path = variant, path
        self.gate = type("Gate", (), {"passed": gate["passed"], "to_dict": lambda self, g=gate: dict(g)})()


class TinyExport:
    """What ``export_model`` returns, as far as the runtime-side tests use it."""

    def __init__(self, out_dir: Path, artifacts: list[TinyArtifact], data: Path | None):
        self.out_dir, self.artifacts, self.data = out_dir, artifacts, data
        self.ok = all(a.gate.passed for a in artifacts)


def write_artifact_set(out_dir: Path, data: Path | None = None, size: int = 32, seed: int = 0,
                       variants=("fp32", "fp16", "int8-trt", "int8-cpu", "int8-ov")) -> TinyExport:
    """An export directory as ``cxr-edge export`` leaves it, for a tiny Grad-CAM-capable model.

    ``data``: a labelled folder (e.g. a synthetic dataset) recorded as the training data, so bench finds
    its test split and the int8 variants are calibrated on its images, as the real exporter does.
    """
    import onnx

    from cxr_edge.export.fp16 import convert_fp16
    from cxr_edge.export.quantize import QuantConfig, quantize
    from cxr_edge.manifest import sha256_file, write_manifest
    from cxr_edge.preprocess import PreprocessSpec

    out_dir.mkdir(parents=True, exist_ok=True)
    model, ops, head = gradcam_model(seed, size)
    spec = PreprocessSpec(height=size, width=size, mode="rescale", input_channels=1, model_channels=1)
    np.savez(out_dir / "model.head.npz", **head)
    gradcam = {"layer": "conv", "feature_output": "features", "probs_output": "probs", "head_file": "model.head.npz",
               "head_sha256": sha256_file(out_dir / "model.head.npz"), "head_ops": ops, "head_check_max_abs": 0.0,
               "engine_native": True, "method": "closed form through the head"}
    data_field, calib = {}, None
    if data is not None:
        from cxr_edge.data import scan_dataset, split_dataset
        from cxr_edge.data.loading import load_images

        ds = scan_dataset(data, classes=GRADCAM_CLASSES)
        fractions, split_seed = (0.7, 0.15, 0.15), 0
        splits = split_dataset(ds, fractions, seed=split_seed)
        data_field = {"root": str(data), "fingerprint": ds.fingerprint(), "split_fractions": list(fractions),
                      "split_seed": split_seed}
        calib = load_images([i.path for i in splits["train"][:48]], spec).x
    if calib is None or not len(calib):
        calib = np.random.default_rng(1).integers(0, 256, (32, size, size, 1), dtype=np.uint8)

    def fields(precision, **extra):
        return {"kind": "onnx", "format": "onnx", "opset": 17, "recipe": "tiny", "precision": precision,
                "classes": GRADCAM_CLASSES, "preprocess": spec.to_dict(),
                "inputs": [{"name": "image", "dtype": "uint8", "shape": ["N", size, size, 1]}],
                "outputs": [{"name": "features", "dtype": "float32", "shape": ["N", size, size, 4]},
                            {"name": "probs", "dtype": "float32", "shape": ["N", 2]}],
                "operating_point": {"threshold": 0.5, "target_sensitivity": 0.95, "chosen_on": "val"},
                "gradcam": gradcam, "data": data_field, **extra}

    fp32 = out_dir / "model.fp32.onnx"
    onnx.save(model, str(fp32))
    gate = {"name": "fp32", "passed": True, "metrics": {"max_abs_dprob": 0.0}, "failures": []}
    write_manifest(fp32, fields("fp32", parent=None, gate=gate,
                                self_check=self_check_record(fp32, fp32, fields("fp32", gate=gate), "fp32")))
    arts = [TinyArtifact("fp32", fp32, gate)]
    parent = {"file": fp32.name, "sha256": sha256_file(fp32)}
    for v in variants:
        if v == "fp32":
            continue
        path = out_dir / f"model.{v}.onnx"
        gate = {"name": v, "passed": True, "metrics": {}, "failures": []}
        if v == "fp16":
            convert_fp16(fp32, path)
            write_manifest(path, fields("fp16", parent=parent, gate=gate,
                                        self_check=self_check_record(fp32, path, fields("fp16", gate=gate), v)))
        else:
            target = v.split("-")[1]
            info = quantize(fp32, path, calib, QuantConfig(target))
            doc = fields("int8", int8_target=target, gate=gate)
            write_manifest(path, fields("int8", parent=parent, int8_target=target, quantization=info, gate=gate,
                                        calibration={"method": "minmax", "n_calibration": len(calib)},
                                        self_check=self_check_record(fp32, path, doc, v)))
        arts.append(TinyArtifact(v, path, gate))
    return TinyExport(out_dir, arts, data)


def self_check_record(fp32: Path, path: Path, doc: dict, variant: str) -> dict:
    """The manifest's load-time self-check block, made as ``cxr-edge export`` makes it: FP32 answers on the
    reference images, and the artifact's own, computed with the arithmetic its export gate uses."""
    from cxr_edge.decision import borderline_band
    from cxr_edge.export.gate_numerics import numerics_for
    from cxr_edge.manifest import ArtifactManifest
    from cxr_edge.precision import parse_precisions
    from cxr_edge.preprocess import PreprocessSpec
    from cxr_edge.runtime.backends.ort_session import cpu_session, run_batched
    from cxr_edge.self_check import make_record, reference_batch

    spec = PreprocessSpec.from_dict(doc["preprocess"])
    x = reference_batch(spec.input_shape)
    ref = run_batched(cpu_session(fp32), x, ["probs"])["probs"]
    numerics = numerics_for(parse_precisions(variant)[-1])  # fp32 always comes first
    manifest = ArtifactManifest.from_dict(doc)
    got = numerics.probs(path, x, manifest)
    return make_record(spec.input_shape, ref, got, borderline_band(manifest), "FP32 ONNX on onnxruntime (CPU)",
                       numerics.where())
