"""Tiny ONNX artifacts built with onnx.helper (no TensorFlow): the same I/O contract as exported models.

uint8 NHWC image -> Cast -> Transpose -> Conv(3x3, 4) -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> Softmax.
Weights are seeded; each artifact gets a manifest as ``cxr-edge export`` writes them, so the runtime,
the TensorRT build path and the fakes can be driven end to end on a CPU machine in milliseconds.
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

    parent = {"file": fp32.name, "sha256": read_manifest(fp32)["sha256"]}
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
