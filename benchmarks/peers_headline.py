"""The issue-16 table from `cxr-edge bench --peers` runs: ours vs the best peer per recipe, from results.json.

    python benchmarks/peers_headline.py benchmarks/results/peers > benchmarks/results/peers/HEADLINE.md

Every number is read from the run's own results.json (same run, interleaved rounds), nothing retyped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _rows(res, pred):
    return [r for r in res["rows"] if "p50_ms" in r and pred(r)]


def _ours(r) -> bool:
    return not r.get("peer") and r["backend"] != "keras" and str(r.get("status", "")).startswith("validated")


def summarise(res: dict, batch: int = 16) -> list[str]:
    cmp = res.get("peers") or {}
    t = (cmp.get("throughput") or {}).get(str(batch))
    lat = cmp.get("latency_p90")
    ours_b = max(_rows(res, lambda r: _ours(r) and r["batch"] == batch), key=lambda r: r["throughput_ips"], default=None)
    peers_b = max(_rows(res, lambda r: r.get("peer") and r["batch"] == batch), key=lambda r: r["throughput_ips"],
                  default=None)
    ours_1 = min(_rows(res, lambda r: _ours(r) and r["batch"] == 1), key=lambda r: r["p90_ms"], default=None)
    litert_1 = next(iter(_rows(res, lambda r: r["label"] == "litert-int8" and r["batch"] == 1)), None)
    keras_b = next(iter(_rows(res, lambda r: r["label"] == "keras predict" and r["batch"] == batch)), None)
    acc = res.get("accuracy", {})
    peak = (res.get("measured_int8_peak") or {}).get("gmacs")
    out = [f"### {res.get('recipe')} ({res['input']['height']} px, {res['macs_per_image'] / 1e9:.2f} GMAC/image)", "",
           "| metric | value |", "|---|---|"]
    if t and ours_b and peers_b:
        out.append(f"| batch {batch}: ours / best peer, per-round median [min-max] | **{t['median']:.2f}x** "
                   f"[{t['min']:.2f}-{t['max']:.2f}] ({ours_b['label']} {ours_b['throughput_ips']:.1f} vs "
                   f"{peers_b['label']} {peers_b['throughput_ips']:.1f} img/s) |")
    v = (cmp.get("vs_validated_peers") or {}).get("throughput", {}).get(str(batch))
    if v:
        failed = sorted(set(cmp["peers"]) - set(cmp.get("validated_peers", [])))
        out.append(f"| batch {batch}: ours / best peer that passed validation (not: {', '.join(failed)}) | "
                   f"**{v['median']:.2f}x** [{v['min']:.2f}-{v['max']:.2f}] vs {v['peer_best']} |")
    if ours_b and keras_b:
        out.append(f"| batch {batch}: ours vs Keras predict | {ours_b['throughput_ips'] / keras_b['throughput_ips']:.1f}x |")
    if ours_b and ours_b.get("fraction_of_measured_peak") is not None:
        out.append(f"| batch {batch}: our best's fraction of the measured {ours_b['precision']} GEMM peak | "
                   f"{ours_b['fraction_of_measured_peak']:.2f} ({ours_b['gmacs_per_s']:.0f} of "
                   f"{ours_b['gmacs_per_s'] / ours_b['fraction_of_measured_peak']:.0f} GMAC/s) |")
    if lat and ours_1:
        lit = f"; LiteRT p90 {litert_1['p90_ms']:.1f} ms" if litert_1 else ""
        out.append(f"| batch 1 p90: best peer / ours, per-round median [min-max] | **{lat['median']:.2f}x** "
                   f"[{lat['min']:.2f}-{lat['max']:.2f}] (ours {ours_1['label']} {ours_1['p90_ms']:.1f} ms{lit}) |")
    if ours_b and ours_b.get("e2e_vs_engine") is not None:
        out.append(f"| end-to-end / engine-only, {ours_b['label']} at batch {batch} | {ours_b['e2e_vs_engine']:.2f} |")
    fid = []
    for label in [ours_b["label"] if ours_b else None, "openvino-nncf LATENCY", "litert-int8", "onnxruntime-defaults"]:
        if label and label in acc:
            a = acc[label]
            fid.append(f"{label}: {a['max_abs_dprob_vs_fp32']:.4f} (agreement {a['top_class_agreement_vs_fp32']:.3f})")
    if fid:
        d = res.get("accuracy_data", {})
        out.append(f"| INT8 max abs dprob vs FP32, {d.get('split')} split n={d.get('n')} | {'; '.join(fid)} |")
    if peak:
        out.append(f"| measured INT8 GEMM peak (this run) | {peak:.0f} GMAC/s |")
    return out


def main(root: str) -> None:
    first = None
    for p in sorted(Path(root).glob("*/results.json")):
        res = json.loads(p.read_text())
        first = first or res
        print("\n".join(summarise(res)) + "\n")
    if first:
        m = first["machine"]
        print(f"Machine: {m['cpu_model']}, {m['usable_cores']} usable cores, flags {', '.join(m['cpu_flags'])}; "
              f"commands in each folder's results.md.")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/peers")
