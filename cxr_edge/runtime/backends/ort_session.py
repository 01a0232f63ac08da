"""Minimal ONNX Runtime helpers shared by export gates and the runtime backends."""

from __future__ import annotations

import numpy as np

from ...extras import require

#: how ONNX Runtime on the CPU computes a QDQ graph: with its fused integer kernels, or as TensorRT would
NUMERICS = ("kernels", "tensorrt")
NUMERICS_TEXT = {
    "kernels": "ONNX Runtime CPU, its fused integer kernels (results depend on this CPU's ISA)",
    "tensorrt": ("TensorRT numerics emulated: QDQ run as fake quantisation in float (ONNX Runtime "
                 "session.disable_quant_qdq): the same rounded INT8 values, products summed without saturation as "
                 "TensorRT's int32 accumulation does, float rescale; independent of this CPU's INT8 kernels"),
}


def cpu_session(path, threads: int | None = None, numerics: str = "kernels"):
    """A CPU session; ``numerics="tensorrt"`` keeps every QuantizeLinear/DequantizeLinear a float op instead of
    fusing them into integer kernels, which is what TensorRT's exact int32 accumulation computes (up to float
    summation order), whatever this CPU's INT8 instructions saturate or round."""
    ort = require("onnxruntime")
    if numerics not in NUMERICS:
        raise ValueError(f"numerics must be one of {NUMERICS}, got {numerics!r}")
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if numerics == "tensorrt":
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_batched(session, x: np.ndarray, outputs=None, batch_size: int = 32) -> dict[str, np.ndarray]:
    """Run ``x`` through the session in chunks; returns output name -> concatenated array."""
    names = outputs or [o.name for o in session.get_outputs()]
    input_name = session.get_inputs()[0].name
    parts: dict[str, list] = {n: [] for n in names}
    for i in range(0, len(x), batch_size):
        res = session.run(names, {input_name: x[i : i + batch_size]})
        for n, r in zip(names, res):
            parts[n].append(r)
    return {n: np.concatenate(v) if v else np.empty((0,)) for n, v in parts.items()}
