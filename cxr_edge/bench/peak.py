"""The CPU's INT8 ceiling, measured rather than assumed.

``machine.int8_peak`` multiplies cores x nominal clock x MACs per cycle per instruction set, which can overstate
what the kernels reach by a wide margin, so "fraction of peak" against it misleads. This measures the ceiling a
model can actually approach here: a
square INT8 GEMM (uint8 x int8 -> int32, ``MatMulInteger``) in ONNX Runtime on the usable cores, the same
kernels (VNNI, AMX where present) our INT8 convolutions use. It is a GEMM ceiling, not the instruction peak:
rows quoted against it read "fraction of the measured INT8 GEMM peak".
"""

from __future__ import annotations

import time

import numpy as np

from ..machine import usable_cores
from ..precision import Precision


def _gemm_model(n: int, integer: bool = True):
    """An n x n x n GEMM: uint8 x int8 -> int32 (MatMulInteger), or float32 (MatMul)."""
    from onnx import TensorProto, helper

    types = (TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32) if integer else (TensorProto.FLOAT,) * 3
    a, b, y = (helper.make_tensor_value_info(name, t, [n, n]) for name, t in zip("aby", types))
    op = "MatMulInteger" if integer else "MatMul"
    graph = helper.make_graph([helper.make_node(op, ["a", "b"], ["y"])], "gemm", [a, b], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def measured_int8_gemm_peak(budget_s: float = 1.0, n: int = 1024, threads: int | None = None) -> dict:
    """GMAC/s of an n x n x n INT8 GEMM in ONNX Runtime on the usable cores (best of the timed runs)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return {"status": "could not run: onnxruntime missing"}
    threads = threads or usable_cores()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(_gemm_model(n).SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"a": rng.integers(0, 256, (n, n), dtype=np.uint8), "b": rng.integers(-128, 128, (n, n), dtype=np.int8)}
    for _ in range(2):
        sess.run(None, feeds)
    best, t_end = float("inf"), time.perf_counter() + budget_s
    while time.perf_counter() < t_end or best == float("inf"):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        best = min(best, time.perf_counter() - t0)
    return {"status": "ran", "gmacs": n ** 3 / best / 1e9, "threads": threads, "n": n,
            "what": f"ONNX Runtime MatMulInteger {n}x{n}x{n}, uint8 x int8 -> int32, {threads} thread(s), best run"}


def measured_float_gemm_peaks(budget_s: float = 1.0, n: int = 1024, threads: int | None = None) -> dict:
    """The FP32 (FMA) and BF16 (AVX512_BF16 / AMX-BF16, where the CPU has them) GEMM ceilings, measured with
    OpenVINO's CPU plugin with its inference precision forced, so fp32 and bf16 rows get a measured peak too."""
    try:
        import openvino as ov
    except ImportError:
        return {"status": "could not run: openvino missing"}
    threads = threads or usable_cores()
    core = ov.Core()
    model = core.read_model(_gemm_model(n, integer=False).SerializeToString(), b"")
    rng = np.random.default_rng(0)
    feeds = {0: rng.standard_normal((n, n), np.float32), 1: rng.standard_normal((n, n), np.float32)}
    out: dict = {"status": "ran", "n": n, "threads": threads}
    caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    for prec, hint in ((Precision.FP32, "f32"), (Precision.BF16, "bf16")):  # hint: OpenVINO's element type name
        name = prec.value
        if prec is Precision.BF16 and "BF16" not in caps:
            out[name] = None
            continue
        req = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                "INFERENCE_NUM_THREADS": threads}).create_infer_request()
        for _ in range(2):
            req.infer(feeds)
        best, t_end = float("inf"), time.perf_counter() + budget_s
        while time.perf_counter() < t_end or best == float("inf"):
            t0 = time.perf_counter()
            req.infer(feeds)
            best = min(best, time.perf_counter() - t0)
        out[name] = n ** 3 / best / 1e9
    out["what"] = f"OpenVINO CPU MatMul {n}x{n}x{n}, inference precision forced, {threads} thread(s), best run"
    return out
