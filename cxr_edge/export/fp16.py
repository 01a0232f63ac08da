"""FP16 conversion that keeps the uint8 input and float32 outputs (the I/O contract does not change)."""

from __future__ import annotations

from pathlib import Path

from ..extras import require


def convert_fp16(fp32_path: str | Path, out_path: str | Path):
    onnx = require("onnx")
    float16 = require("onnxruntime.transformers.float16")
    model = onnx.load(str(fp32_path))
    # keep_io_types: float32 outputs stay float32 (Cast nodes at the boundary); the uint8 input is
    # untouched either way. (Blocking Softmax to keep it in fp32 was tried: the converter then emits
    # a graph that is not topologically sorted, which the checker rightly rejects.)
    m16 = float16.convert_float_to_float16(model, keep_io_types=True)
    onnx.checker.check_model(m16, full_check=True)
    onnx.save(m16, str(out_path))
    return m16
