"""How far each INT8 artifact is from FP32 under each arithmetic, on this machine, on real images.

    python benchmarks/gate_numerics.py ARTIFACT_DIR DATA_DIR [--n 200] [--out benchmarks/results/gate_numerics]

For every ``model.int8-*.onnx`` beside ``model.fp32.onnx`` it runs the same images through
- ONNX Runtime's fused integer kernels on this CPU (what an ONNX Runtime CPU deployment computes),
- TensorRT numerics emulated (the int8-trt export gate's arithmetic, independent of the CPU),
- OpenVINO's CPU kernels (when installed),
and reports max/mean |p - p_FP32| and top-class agreement, with the CPU's ISA, plus each artifact's load-time
self-check on ONNX Runtime here. Saves results.json and results.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts")
    ap.add_argument("data")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--out", default="benchmarks/results/gate_numerics")
    a = ap.parse_args(argv)

    from cxr_edge.cpu_isa import isa_facts
    from cxr_edge.data import scan_dataset
    from cxr_edge.data.loading import load_images
    from cxr_edge.manifest import read_manifest
    from cxr_edge.runtime.backends.ort_session import cpu_session, run_batched
    from cxr_edge.runtime.backends.registry import open_backend

    art = Path(a.artifacts)
    fp32 = art / "model.fp32.onnx"
    doc = read_manifest(fp32)
    spec = doc.preprocess
    ds = scan_dataset(a.data, classes=doc.classes)
    items = sorted(ds.items, key=lambda i: str(i.path))
    step = max(1, len(items) // a.n)
    x = load_images([i.path for i in items[::step][: a.n]], spec).x
    ref = run_batched(cpu_session(fp32), x, ["probs"])["probs"]

    def stats(p):
        d = np.abs(p - ref)
        return {"max_abs_dprob": float(d.max()), "mean_abs_dprob": float(d.mean()),
                "top_class_agreement": float((p.argmax(1) == ref.argmax(1)).mean())}

    rows = []
    for path in sorted(art.glob("model.int8-*.onnx")):
        q = read_manifest(path)
        numerics = q.gate.numerics if q.gate is not None else None
        row = {"artifact": path.name, "int8_mac_share": q.quantization.int8_mac_share if q.quantization else None,
               "gate_numerics": numerics.where if numerics is not None else None}
        row["onnxruntime_kernels"] = stats(run_batched(cpu_session(path), x, ["probs"])["probs"])
        row["tensorrt_numerics"] = stats(run_batched(cpu_session(path, numerics="tensorrt"), x, ["probs"])["probs"])
        try:
            with open_backend(path, backend="openvino", self_check="off") as eng:
                row["openvino_kernels"] = stats(eng.infer_all(x, calibrated=False))
        except Exception as exc:  # not installed, or the graph does not compile: a row, not a crash
            row["openvino_kernels"] = {"status": f"could not run: {exc}"[:160]}
        with open_backend(path, backend="onnxruntime", self_check="warn") as eng:
            row["self_check_onnxruntime"] = eng.info.self_check.to_dict()
        rows.append(row)
    res = {"machine": isa_facts(), "n_images": int(len(x)), "data": str(a.data), "artifacts": str(art),
           "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
           "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [f"# INT8 answers vs FP32 under each arithmetic ({res['machine']['cpu']}, {res['machine']['isa']})", "",
             f"Command: `{res['command']}`; {res['n_images']} images of {res['data']}.", "",
             "| artifact | INT8 MAC share | gated with | ORT kernels here: max / mean abs dp, agreement | "
             "TensorRT numerics | OpenVINO here | self-check on ORT here |", "|---|---|---|---|---|---|---|"]

    def cell(s):
        if "status" in s:
            return s["status"]
        return f"{s['max_abs_dprob']:.3f} / {s['mean_abs_dprob']:.4f}, {100 * s['top_class_agreement']:.1f}%"

    for r in rows:
        sc = r["self_check_onnxruntime"]
        share = "-" if r["int8_mac_share"] is None else f"{100 * r['int8_mac_share']:.1f}%"
        lines.append(f"| {r['artifact']} | {share} | {r['gate_numerics']} | {cell(r['onnxruntime_kernels'])} | "
                     f"{cell(r['tensorrt_numerics'])} | {cell(r['openvino_kernels'])} | {sc['status']} "
                     f"({sc['max_abs_dprob']:.3f} vs tolerance {sc['tolerance']:.3f}) |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
