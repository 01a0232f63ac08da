"""The CPU's INT8 ceiling, measured rather than assumed.

``machine.int8_peak`` multiplies cores x nominal clock x MACs per cycle per instruction set; on the 2-core
AMD EPYC of issue 16 that said 665 GMAC/s where the measured VNNI peak was 443 and ONNX Runtime's INT8 GEMM
385, so "fraction of peak" was off by 1.5x. This measures the ceiling a model can actually approach here: a
square INT8 GEMM (uint8 x int8 -> int32, ``MatMulInteger``) in ONNX Runtime on the usable cores, the same
kernels (VNNI, AMX where present) our INT8 convolutions use. It is a GEMM ceiling, not the instruction peak:
rows quoted against it read "fraction of the measured INT8 GEMM peak".
"""

from __future__ import annotations

import os
import time

import numpy as np


def _gemm_model(n: int):
    from onnx import TensorProto, helper

    a = helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])
    b = helper.make_tensor_value_info("b", TensorProto.INT8, [n, n])
    y = helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "gemm", [a, b], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def measured_int8_gemm_peak(budget_s: float = 1.0, n: int = 1024, threads: int | None = None) -> dict:
    """GMAC/s of an n x n x n INT8 GEMM in ONNX Runtime on the usable cores (best of the timed runs)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return {"status": "could not run: onnxruntime missing"}
    threads = threads or len(os.sched_getaffinity(0))
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
