"""Compare cxr-edge's int8-trt QDQ export with NVIDIA ModelOpt's ONNX PTQ on the same model, images and gate.

    python benchmarks/modelopt_compare.py runs/bench/small_cnn/artifacts --out benchmarks/results/modelopt/small_cnn

Runs in an environment with ``nvidia-modelopt[onnx]`` (it needs torch and pins onnx~=1.21, so keep it apart
from the main one) plus cxr-edge installed with ``--no-deps`` and opencv/tqdm/scikit-learn. Calibration uses
the same 200 training-split images as ``cxr-edge export``, the gate the same validation split, on ONNX
Runtime's CPU provider. Every candidate is also checked against TensorRT's QDQ rules (export/trt_lint.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from cxr_edge.data.gate_data import load_gate_data
from cxr_edge.export.gates import int8_gate
from cxr_edge.export.quantize import count_int8_nodes
from cxr_edge.export.trt_lint import lint_qdq
from cxr_edge.manifest import read_manifest
from cxr_edge.runtime.backends.ort_session import cpu_session, run_batched


def _probs(path, x):
    return run_batched(cpu_session(path), x, ["probs"])["probs"]


def _row(name, path, ref, data, doc, seconds=None):
    gate = int8_gate(ref, _probs(path, data.val_x), data.val_y, doc.classes, doc.threshold)
    lint = lint_qdq(path)
    return {"quantizer": name, "passed": gate.passed, "failures": gate.failures,
            **{k: gate.metrics[k] for k in ("top_class_agreement", "auc_drop", "sensitivity_drop", "max_abs_dprob")},
            **count_int8_nodes(path), "tensorrt_lint_violations": len(lint),
            "lint_rules": sorted({v.rule for v in lint}), "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact_dir")
    ap.add_argument("--out", required=True)
    ap.add_argument("--calib-size", type=int, default=200)
    a = ap.parse_args()
    from modelopt.onnx.quantization import quantize as mo_quantize

    art = Path(a.artifact_dir)
    fp32 = art / "model.fp32.onnx"
    doc = read_manifest(fp32)
    keras_doc = read_manifest(Path(doc.source_model.path), verify=False)
    spec = doc.preprocess
    data = load_gate_data(keras_doc, spec, None, a.calib_size)  # the split cxr-edge export used
    ref = _probs(fp32, data.val_x)
    rows = []
    ours = art / "model.int8-trt.onnx"
    if ours.is_file():
        rows.append(_row("cxr-edge (ORT quantize_static, S8S8, QuantizeBias off)", ours, ref, data, doc))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("max", "entropy"):
            for hp in ("fp32", "fp16"):
                path = Path(tmp) / f"mo_{method}_{hp}.onnx"
                # ModelOpt 0.47 rewrites the ONNX file it is given (graph simplifications saved in place: the
                # artifact's sha256 no longer matched its manifest), so it only ever sees a fresh copy
                src = Path(tmp) / "fp32_copy.onnx"
                shutil.copyfile(fp32, src)
                t0 = time.perf_counter()
                try:
                    mo_quantize(str(src), quantize_mode="int8", calibration_data={"image": data.calib_x},
                                calibration_method=method, calibration_eps=["cpu"], high_precision_dtype=hp,
                                output_path=str(path), log_level="WARNING")
                    rows.append(_row(f"ModelOpt int8, {method} calibration, float parts {hp}", path, ref, data, doc,
                                     round(time.perf_counter() - t0, 1)))
                except Exception as exc:  # a configuration ModelOpt cannot do is a row, not a crash
                    rows.append({"quantizer": f"ModelOpt int8, {method}, {hp}", "error": str(exc).splitlines()[-1][:300]})
    read_manifest(fp32)  # verifies the artifact's sha256: ModelOpt must not have touched it
    (out / "results.json").write_text(json.dumps({"artifact_dir": str(art), "data": data.info, "rows": rows},
                                                 indent=2, default=str) + "\n")
    lines = [f"# INT8 for TensorRT: cxr-edge vs NVIDIA ModelOpt ({doc.recipe})", "",
             f"Calibration: {data.info['n_calibration']} train-split images; gate: {data.info['n_gate']} val-split "
             f"images of {data.info['data']}; ONNX Runtime CPU.", "",
             "| quantizer | gate | agreement | AUC drop | sens. drop | max abs dprob | int8 / float compute | "
             "TensorRT QDQ lint |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['quantizer']} | could not run: {r['error']} | | | | | | |")
            continue
        lint = "clean" if not r["tensorrt_lint_violations"] else f"{r['tensorrt_lint_violations']} ({', '.join(r['lint_rules'])})"
        lines.append(f"| {r['quantizer']} | {'passed' if r['passed'] else 'FAILED'} | {r['top_class_agreement']:.3f} | "
                     f"{r['auc_drop']:.4f} | {r['sensitivity_drop']:.3f} | {r['max_abs_dprob']:.4f} | "
                     f"{r['int8_compute_nodes']} / {r['float_compute_nodes']} | {lint} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
