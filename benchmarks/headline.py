"""Print the headline table (Markdown) from benchmarks/results/<recipe>/results.json files.

    python benchmarks/headline.py benchmarks/results
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cxr_edge.bench.runner import verdict_of
from cxr_edge.evaluation.criteria import PASSED, WITHIN_RESOLUTION


def _accepted(r) -> bool:
    """Passed or within resolution: the shared verdict, never a status string compared here."""
    return verdict_of(r) in (PASSED, WITHIN_RESOLUTION)


def _row(rows, label, batch):
    return next((r for r in rows if r["label"] == label and r.get("batch") == batch and "p50_ms" in r), None)


def _best(rows, pred, batch=None):
    cands = [r for r in rows if "p50_ms" in r and pred(r) and (batch is None or r["batch"] == batch)]
    return max(cands, key=lambda r: r["throughput_ips"]) if cands else None


def headline(res: dict, batch: int = 16) -> list[str]:
    rows = res["rows"]
    # Headline INT8 numbers come from validated rows only; a model whose INT8 failed validation says so.
    any_valid = any(r["precision"] == "int8" and _accepted(r) for r in rows if "p50_ms" in r)
    is_int8 = lambda r: r["precision"] == "int8" and (_accepted(r) or not any_valid)
    keras = _row(rows, "keras predict", batch)
    keras1 = _row(rows, "keras predict", 1)
    ours32 = _row(rows, "onnxruntime fp32", batch)
    best8 = _best(rows, is_int8, batch)
    ov8 = _best(rows, lambda r: is_int8(r) and r["backend"] == "openvino", batch)
    best8_1 = _best(rows, is_int8, 1)
    peak = res["machine"].get("int8_peak", {})
    e2e = _best(rows, lambda r: is_int8(r) and "e2e_vs_engine" in r)
    acc = res.get("accuracy", {})
    a8 = acc.get(best8["label"]) if best8 else None
    a32 = acc.get("onnxruntime fp32", {})

    def ratio(a, b, key="throughput_ips"):
        return f"{a[key] / b[key]:.2f}x" if a and b else "n/a"

    out = [f"### {res.get('recipe')} ({res['input']['height']} px, {res['macs_per_image'] / 1e9:.2f} GMAC/image)", ""]
    if not any_valid:
        out += ["**No INT8 artifact of this model passed validation** (see its results.md); the INT8 rows below are "
                "speed only.", ""]
    out += ["| metric | value |", "|---|---|"]
    if keras and best8:
        out.append(f"| best CPU INT8 ({best8['label']}) vs Keras predict FP32, batch {batch} | {ratio(best8, keras)} "
                   f"({best8['throughput_ips']:.1f} vs {keras['throughput_ips']:.1f} img/s) |")
    if ours32 and best8:
        out.append(f"| best CPU INT8 vs our ONNX Runtime FP32, batch {batch} | {ratio(best8, ours32)} |")
    if ov8 and best8:
        out.append(f"| best CPU INT8 vs best OpenVINO INT8 ({ov8['label']}), batch {batch} | {ratio(best8, ov8)} |")
    ort8 = _best(rows, lambda r: is_int8(r) and r["backend"] == "onnxruntime", batch)
    if ort8 and ov8:
        out.append(f"| ONNX Runtime INT8 ({ort8['label']}) vs OpenVINO INT8, batch {batch} | {ratio(ort8, ov8)} |")
    if best8_1 and keras1:
        out.append(f"| single-stream p90, best INT8 ({best8_1['label']}) vs Keras predict, batch 1 | "
                   f"{best8_1['p90_ms']:.1f} ms vs {keras1['p90_ms']:.1f} ms ({best8_1['p90_ms'] / keras1['p90_ms']:.2f} of Keras) |")
    measured = res.get("measured_int8_peak") or {}
    if best8 and best8.get("gmacs_per_s") and measured.get("status") == "ran":
        out.append(f"| fraction of the measured INT8 GEMM peak ({measured['gmacs']:.0f} GMAC/s, {measured['what']}) | "
                   f"{best8['gmacs_per_s'] / measured['gmacs']:.1%} ({best8['gmacs_per_s']:.0f} GMAC/s) |")
    elif best8 and best8.get("gmacs_per_s"):  # runs from before the peak was measured: the nominal formula, labelled
        for k, v in peak.items():
            if k.endswith("_gmacs"):
                out.append(f"| fraction of the nominal {k[:-6]} INT8 estimate ({v:.0f} GMAC/s; not measured) | "
                           f"{best8['gmacs_per_s'] / v:.1%} ({best8['gmacs_per_s']:.0f} GMAC/s) |")
    if e2e:
        out.append(f"| end-to-end / engine-only throughput ({e2e['label']}, batch {e2e['batch']}) | {e2e['e2e_vs_engine']:.0%} |")
    if a8:
        auc_drop = (a32.get("roc_auc") - a8["roc_auc"]) if a32.get("roc_auc") is not None and a8.get("roc_auc") is not None else None
        out.append(f"| INT8 top-class agreement vs FP32 / ROC-AUC drop ({best8['label']}) | "
                   f"{a8['top_class_agreement_vs_fp32']:.4f} / {auc_drop if auc_drop is None else f'{auc_drop:+.4f}'} |")
    return out + [""]


def main(root: str) -> None:
    print("## Headline (each table from one run; ratios are within that run)\n")
    for f in sorted(Path(root).glob("*/results.json")):
        print("\n".join(headline(json.loads(f.read_text()))))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
