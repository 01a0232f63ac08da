"""The post-build gate: a TensorRT engine must give the FP32 ONNX model's answers, judged like the export gates.

The ONNX artifact an engine is built from passed its gate on ONNX Runtime; the engine is a different
program (TensorRT chooses kernels, fuses layers, may run FP16 where a weakly typed build allows), so
its own outputs are compared, on the same kind of images and with the same criteria: FP32 engines by
parity (1e-4), FP16 by the FP16 gate, INT8 by agreement, ROC-AUC drop and COVID sensitivity drop on
labelled validation images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data.gate_data import load_gate_data
from ..errors import ManifestError
from ..manifest import ArtifactManifest
from ..manifest_schema import GateRecord, SelfCheckRecord
from ..precision import Precision
from ..runtime.backends.ort_session import cpu_session, run_batched
from .gates import GateResult, fp16_gate, fp32_parity, int8_gate


def reference_fp32(onnx_path: Path, doc: ArtifactManifest) -> Path:
    """The FP32 ONNX artifact an engine is judged against: the source itself, or its recorded parent."""
    if doc.precision is Precision.FP32:
        return onnx_path
    parent = doc.parent.file if doc.parent is not None else None
    ref = onnx_path.with_name(parent) if parent else None
    if ref is None or not ref.is_file():
        what = parent or "no parent recorded"
        raise ManifestError(f"The post-build gate needs the FP32 ONNX beside {onnx_path.name} ({what}); copy it "
                            "there, or build with --no-gate.")
    return ref


def gate_engine(plan: Path, engine_doc: ArtifactManifest, onnx_path: Path, onnx_doc: ArtifactManifest,
                data_dir: str | None) -> tuple[GateResult, SelfCheckRecord | None]:
    """The engine's gate and its self-check record (:func:`engine_self_check_record`), from one load of it."""
    spec = onnx_doc.preprocess
    if data_dir is None:
        calib = onnx_doc.calibration.data if onnx_doc.calibration is not None else None
        data_dir = calib if calib and Path(calib).is_dir() else None
    data = load_gate_data(onnx_doc, spec, data_dir, calib_size=1)  # the gate needs val images, not calibration
    ref_path = reference_fp32(onnx_path, onnx_doc)
    precision = engine_doc.precision
    x = data.val_x if precision is Precision.INT8 else data.parity_x
    ref = run_batched(cpu_session(ref_path), x, ["probs"])["probs"]
    sc_x = _self_check_images(onnx_doc)
    (probs, sc_probs), where = engine_answers(plan, engine_doc, [x, sc_x])
    if precision is Precision.FP32:
        gate = fp32_parity(ref, probs)
    elif precision is Precision.FP16:
        gate = fp16_gate(ref, probs)
    else:
        gate = int8_gate(ref, probs, data.val_y, list(onnx_doc.classes), onnx_doc.threshold)
    gate.name = f"engine-{precision.value}"
    gate.metrics["gate_data"] = data.info["data"]
    # the band the engine's own gate measured counts too (the engine manifest will carry that gate)
    return gate, _self_check_record(gate.to_record(), onnx_doc, sc_probs, where)


def engine_answers(plan: Path, engine_doc: ArtifactManifest, batches: list) -> tuple[list, str]:
    """One load of the engine answers every batch given (None stays None); and where it ran."""
    from ..runtime.backends.tensorrt import TensorRTBackend

    with TensorRTBackend(plan, engine_doc, self_check="off") as eng:  # the gate is the stronger check here
        return [None if x is None else eng.infer_all(x, 32, calibrated=False) for x in batches], eng.where()

def engine_self_check_record(plan: Path, engine_doc: ArtifactManifest, onnx_doc: ArtifactManifest) -> SelfCheckRecord | None:
    """The engine's load-time self-check reference without a gate (``--no-gate``): the FP32 answers its source ONNX
    recorded, and what this engine answered on this GPU when it was built (None when the source has none)."""
    sc_x = _self_check_images(onnx_doc)
    if sc_x is None:
        return None
    (got,), where = engine_answers(plan, engine_doc, [sc_x])
    return _self_check_record(engine_doc, onnx_doc, got, where)


def _self_check_images(onnx_doc: ArtifactManifest) -> np.ndarray | None:
    from ..self_check import reference_batch

    rec = onnx_doc.self_check
    if rec is None:
        return None
    return reference_batch(onnx_doc.preprocess.input_shape, rec.n)


def _self_check_record(engine_gate: ArtifactManifest | GateRecord | None, onnx_doc: ArtifactManifest, got: np.ndarray | None,
                       where: str) -> SelfCheckRecord | None:
    from ..decision import borderline_band
    from ..self_check import make_record

    rec = onnx_doc.self_check
    if rec is None or got is None:
        return None
    band = max(borderline_band(engine_gate), borderline_band(onnx_doc))
    made = make_record(onnx_doc.preprocess.input_shape, np.asarray(rec.reference_probs), got, band, rec.reference, where)
    return SelfCheckRecord.from_dict(made, "self_check")
