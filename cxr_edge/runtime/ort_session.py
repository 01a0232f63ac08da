"""Minimal ONNX Runtime helpers shared by export gates and the runtime backends."""

from __future__ import annotations

import numpy as np

from ..extras import require


def cpu_session(path, threads: int | None = None):
    ort = require("onnxruntime")
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
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
