"""Static INT8 QDQ quantisation with ONNX Runtime (or NNCF), in the flavour each target needs."""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..extras import require
from ..graph_macs import macs_per_node
from ..precision import Int8Target

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
QUANTIZERS = ("onnxruntime", "nncf")
COMPUTE_OPS = {"Conv", "MatMul", "Gemm", "ConvTranspose"}
# what ORT's CPU provider actually executes in integer arithmetic after graph optimisation
ORT_INT8_KERNELS = {"QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger",
                    "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearAdd", "QLinearMul",
                    "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat", "QLinearSoftmax"}


@dataclass(frozen=True)
class QuantConfig:
    target: Int8Target
    method: str = "minmax"
    per_channel: bool = True
    exclude_nodes: tuple[str, ...] = ()
    calib_batch: int = 16
    note: str = ""  # which remedy this attempt is (reports)
    quantizer: str = "onnxruntime"  # or "nncf": NNCF's post-training quantisation (fast bias correction), OV target

    def __post_init__(self):
        object.__setattr__(self, "target", Int8Target(self.target))
        if self.method not in CALIBRATION_METHODS:
            raise ConfigError(f"Unknown calibration method {self.method!r}; choose {', '.join(CALIBRATION_METHODS)}.")
        if self.quantizer not in QUANTIZERS:
            raise ConfigError(f"Unknown quantizer {self.quantizer!r}; choose {', '.join(QUANTIZERS)}.")
        if self.quantizer == "nncf" and self.target is not Int8Target.OV:
            raise ConfigError("NNCF quantises for the ov target only here: its graphs mix S8 and U8 activations as "
                              "OpenVINO wants, which TensorRT (S8S8 only) refuses and ONNX Runtime runs slowly.")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target"] = self.target.value
        d["activations"] = {Int8Target.TRT: "int8 symmetric (S8S8)", Int8Target.CPU: "uint8 asymmetric (U8S8)",
                            Int8Target.OV: "int8 symmetric where the graph allows negatives, else uint8"}[self.target]
        if self.quantizer == "nncf":
            d["activations"] = "NNCF's CPU preset (per-tensor, its own ranges), fast bias correction"
        d["weights"] = "int8 symmetric, " + ("per-channel" if self.per_channel else "per-tensor")
        return d


class ArrayCalibrationReader:
    """ONNX Runtime's CalibrationDataReader protocol over a packed uint8 array."""

    def __init__(self, x: np.ndarray, input_name: str, batch: int = 16):
        # ORT's histogram calibrators stack per-batch outputs, so every batch must have one size:
        # the remainder that does not fill a batch is dropped (at most batch - 1 images).
        self.batch = min(batch, len(x))
        self.x = x[: len(x) - len(x) % self.batch] if self.batch else x
        self.input_name = input_name
        self.rewind()

    def get_next(self) -> dict | None:
        if self._i >= self._end:
            return None
        b = self.x[self._i * self.batch : (self._i + 1) * self.batch]
        self._i += 1
        return {self.input_name: b}

    def rewind(self) -> None:
        self._i, self._end = 0, len(self)

    def __iter__(self):  # ORT's qdq_loss_debug iterates readers instead of calling get_next
        self.rewind()
        return iter(self.get_next, None)

    # ORT's strided calibration ("CalibStridedMinMax") feeds one range of batches per collect_data call,
    # so histograms are accumulated batch by batch instead of holding every activation of every image.
    def __len__(self) -> int:
        return len(self.x) // self.batch if self.batch else 0

    def set_range(self, start_index: int, end_index: int) -> None:
        self._i, self._end = start_index, min(end_index, len(self))


def _compute_nodes(model) -> list:
    return [n for n in model.graph.node if n.op_type in COMPUTE_OPS]


def float_boundary_nodes(model) -> list[str]:
    """Nodes kept in float: the fused normalisation before the first conv/matmul, and the Softmax.

    Quantising the normalisation gains nothing (it is one multiply-add) and quantising Softmax
    leaves probabilities with 1/256 resolution, which is too coarse for an operating threshold.
    """
    out = []
    for n in model.graph.node:
        if n.op_type in COMPUTE_OPS:
            break
        out.append(n.name)
    out += [n.name for n in model.graph.node if n.op_type == "Softmax"]
    return out


def classifier_head(model) -> list[str]:
    """Every node after the last global pooling: the dense head a transfer-learning recipe adds.

    It is a tiny share of the work but its first Dense loses the most SQNR of any layer, so keeping it float buys
    most of the fidelity that mixed precision would, for almost none of the speed. Empty when the model has no
    global pooling (a Flatten head is a large share of a small CNN's work) or no compute after it.
    """
    consts = {i.name: i for i in model.graph.initializer}
    nodes = list(model.graph.node)
    pools = [k for k, n in enumerate(nodes) if n.op_type in ("GlobalAveragePool", "GlobalMaxPool")
             or (n.op_type == "ReduceMean" and _reduces_spatial(n, consts))]
    if not pools:
        return []
    head = nodes[pools[-1] + 1:]
    return [n.name for n in head] if any(n.op_type in COMPUTE_OPS for n in head) else []


def _reduces_spatial(node, consts: dict) -> bool:
    """A ReduceMean over H and W of NHWC or NCHW (Keras' GlobalAveragePooling2D as some converters write it);
    its axes are an attribute before opset 18 and an input from 18 on."""
    axes = next((list(a.ints) for a in node.attribute if a.name == "axes"), None)
    if axes is None and len(node.input) > 1 and node.input[1] in consts:  # only this one tensor is decoded
        axes = require("onnx.numpy_helper").to_array(consts[node.input[1]]).reshape(-1).tolist()
    return axes is not None and sorted(axes) in ([1, 2], [2, 3], [-3, -2], [-2, -1])


def first_and_last_compute(model) -> list[str]:
    """The first convolution and the final classifier: the usual first things to leave in float."""
    nodes = _compute_nodes(model)
    return [nodes[0].name, nodes[-1].name] if len(nodes) >= 2 else [n.name for n in nodes]


def pre_process_for_quantization(fp32_path: str | Path, out_path: str | Path) -> Path:
    """Symbolic shape inference + constant folding, as ORT's quantisation docs recommend.

    The QDQ model's node and tensor names are those of this graph, not of the exported file, so
    anything that matches the two models tensor by tensor (:func:`.sensitivity.node_sensitivity`)
    must compare against this graph.
    """
    shape_inference = require("onnxruntime.quantization.shape_inference")
    require("sympy")  # ORT's symbolic shape inference; its own ImportError names no cxr-edge extra
    shape_inference.quant_pre_process(str(fp32_path), str(out_path), skip_symbolic_shape=False)
    return Path(out_path)


def _prepared(fp32_path: str | Path, tmp: Path, config: QuantConfig):
    """What either quantiser starts from: the pre-processed graph, its input name and the nodes kept float."""
    onnx = require("onnx")
    pre = pre_process_for_quantization(fp32_path, tmp / "pre.onnx")
    model = onnx.load(str(pre))
    exclude = sorted(set(float_boundary_nodes(model)) | set(config.exclude_nodes))
    return pre, model, model.graph.input[0].name, exclude


def quantize(fp32_path: str | Path, out_path: str | Path, calib_x: np.ndarray, config: QuantConfig) -> dict:
    """Write a QDQ model; returns what was done (for the manifest)."""
    if config.quantizer == "nncf":
        return _quantize_nncf(fp32_path, out_path, calib_x, config)
    q = require("onnxruntime.quantization")
    with tempfile.TemporaryDirectory() as tmp:
        pre, model, input_name, exclude = _prepared(fp32_path, Path(tmp), config)
        act = q.QuantType.QInt8 if config.target is Int8Target.TRT else q.QuantType.QUInt8
        method = {"minmax": q.CalibrationMethod.MinMax, "entropy": q.CalibrationMethod.Entropy,
                  "percentile": q.CalibrationMethod.Percentile}[config.method]
        trt = config.target is Int8Target.TRT
        extra: dict[str, Any] = {"ActivationSymmetric": trt, "WeightSymmetric": True,
                 "CalibMovingAverage": False, "CalibStridedMinMax": 1,  # bounded memory (see the reader)
                 # TensorRT refuses DequantizeLinear on int32 biases and folds float biases into its INT8
                 # convolutions itself (NVIDIA's ModelOpt exports the same way)
                 "QuantizeBias": not trt}
        if config.target is Int8Target.OV:
            from .activation_signs import signed_activation_overrides

            extra["TensorQuantOverrides"] = signed_activation_overrides(model)
        if trt:
            # a Q/DQ pair on a Gemm/MatMul output that feeds float ops (the classifier's logits before Softmax)
            # rounds the logits to 256 levels and leaves TensorRT a standalone DQ; the next quantised op
            # quantises its own input anyway
            extra["OpTypesToExcludeOutputQuantization"] = ["Gemm", "MatMul"]
        # ORT's histogram calibrators print() a dozen progress lines; they go to the debug log instead
        chatter = io.StringIO()
        with contextlib.redirect_stdout(chatter):
            q.quantize_static(
                str(pre), str(out_path), ArrayCalibrationReader(calib_x, input_name, config.calib_batch),
                quant_format=q.QuantFormat.QDQ, per_channel=config.per_channel, activation_type=act,
                weight_type=q.QuantType.QInt8, calibrate_method=method, nodes_to_exclude=exclude,
                extra_options=extra,
            )
        for line in chatter.getvalue().splitlines():
            log.debug("onnxruntime.quantization: %s", line)
    rewrites = {} if trt else _cpu_rewrites(out_path)  # TensorRT fuses strided INT8 convolutions itself
    info = {**config.to_dict(), "nodes_kept_float": exclude, **rewrites, **count_int8_nodes(out_path)}
    if config.target is Int8Target.TRT:
        from .trt_lint import lint_qdq

        info["tensorrt_lint"] = [str(v) for v in lint_qdq(out_path)]
    return info


def _cpu_rewrites(path: str | Path) -> dict:
    """The exact rewrites that keep every convolution INT8 on CPU runtimes (see qdq_rewrites)."""
    onnx = require("onnx")
    from .qdq_rewrites import quantised_input, subsample_before_dequantize

    qdq = onnx.load(str(path))
    n = subsample_before_dequantize(qdq)
    direct = quantised_input(qdq)
    if n or direct:
        onnx.checker.check_model(qdq)
        onnx.save(qdq, str(path))
    return {"strided_1x1_subsampled_before_dequantize": n, "uint8_input_straight_to_first_dequantize": direct}


def _quantize_nncf(fp32_path: str | Path, out_path: str | Path, calib_x: np.ndarray, config: QuantConfig) -> dict:
    """NNCF's post-training quantisation of the ONNX graph, to QDQ ONNX that ONNX Runtime and OpenVINO run.

    NNCF calibrates per tensor and corrects each layer's bias for the mean error quantisation introduced
    (fast bias correction); on some models that is closer to FP32 than ONNX Runtime's min-max, on others
    not, which is why export measures both on the gate images and keeps the closer one.
    """
    onnx = require("onnx")
    nncf = require("nncf")
    with tempfile.TemporaryDirectory() as tmp:
        _, model, input_name, exclude = _prepared(fp32_path, Path(tmp), config)
        dataset = nncf.Dataset([calib_x[i : i + 1] for i in range(len(calib_x))], lambda x: {input_name: x})
        chatter = io.StringIO()
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            q = nncf.quantize(model, dataset, subset_size=len(calib_x), target_device=nncf.TargetDevice.CPU,
                              ignored_scope=nncf.IgnoredScope(names=exclude, validate=False))
        onnx.save(q, str(out_path))
    info = {**config.to_dict(), "nodes_kept_float": exclude, "nncf": getattr(nncf, "__version__", None),
            **_cpu_rewrites(out_path), **count_int8_nodes(out_path)}
    return info


def count_int8_nodes(path: str | Path) -> dict:
    """Compute nodes (conv/matmul/gemm) whose activation *and* weight are dequantised from INT8, vs. the rest.

    Both, because ONNX Runtime feeds a node kept in float the quantised tensor its neighbours share:
    its activation comes through a DequantizeLinear while its weight stays float, and it runs in float.
    """
    onnx = require("onnx")
    model = onnx.load(str(path))
    from_dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    compute = _compute_nodes(model)
    int8 = [n for n in compute if len(n.input) >= 2 and n.input[0] in from_dq and n.input[1] in from_dq]
    macs = macs_per_node(model)
    total = sum(macs.values())
    return {"int8_compute_nodes": len(int8), "float_compute_nodes": len(compute) - len(int8),
            "int8_mac_share": round(sum(macs.get(n.output[0], 0) for n in int8) / total, 6) if total else None,
            "qdq_pairs": sum(1 for n in model.graph.node if n.op_type == "QuantizeLinear")}


def ort_cpu_kernels(path: str | Path) -> dict[str, int]:
    """Integer kernels ONNX Runtime's CPU provider runs for this model after fusing the QDQ pairs."""
    onnx = require("onnx")
    ort = require("onnxruntime")
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        ops = Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    return {k: v for k, v in sorted(ops.items()) if k in ORT_INT8_KERNELS}
