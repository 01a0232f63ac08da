"""Benchmark outputs: results.json, results.md (tables) and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

from ..extras import require
from ..precision import Precision


def _f(v, fmt="{:.1f}"):
    return "-" if v is None else fmt.format(v)


def render_markdown(res: dict, command: str | None = None) -> str:
    m = res["machine"]
    lines = [f"# Benchmark: {res.get('recipe')} ({res['input']['height']}x{res['input']['width']}, "
             f"{res['macs_per_image'] / 1e9:.2f} GMAC/image)", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [f"Machine: {m['cpu_model']}, {_isa(m)}, {m['usable_cores']} usable cores @ {m['cpu_mhz']} MHz, flags "
              f"{', '.join(m['cpu_flags'])}; GPU: {m['gpu'] or 'none'}; onnxruntime {m['versions'].get('onnxruntime', '-')}, "
              f"openvino {m['versions'].get('openvino', '-')}, tensorflow {m['versions'].get('tensorflow', '-')}.", "",
              "Latency is per batch; throughput = batch / median latency; ratios are to Keras `model.predict` at the same "
              "batch, and to the FP32 artifact on the same backend, provider and batch (x FP32 same backend), both measured "
              "in the same run (a shared VM's speed drifts between runs, so compare within one table only).", "",
              "| backend | provider | precision | batch | status | p50 ms | p90 ms | p99 ms | img/s | x Keras predict "
              "| x FP32 same backend | GMAC/s | e2e img/s | e2e/engine | load s | RSS added MB | size MB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        peer = " (peer)" if r.get("peer") else ""
        rss = r.get("rss_added_mb", r.get("peak_rss_mb"))
        lines.append(
            f"| {r['label']}{peer} | {r.get('provider', '-')} | {r.get('precision', '-')} | {r.get('batch', '-')} | "
            f"{status_cell(r)} | "
            f"{_f(r.get('p50_ms'))} | {_f(r.get('p90_ms'))} | {_f(r.get('p99_ms'))} | {_f(r.get('throughput_ips'))} | "
            f"{_f(r.get('speedup_vs_keras_predict'), '{:.2f}')} | {_f(r.get('x_fp32_same_backend'), '{:.2f}')} | "
            f"{_f(r.get('gmacs_per_s'))} | "
            f"{_f(r.get('e2e_throughput_ips'))} | "
            f"{_f(r.get('e2e_vs_engine'), '{:.2f}')} | {_f(r.get('load_s'), '{:.2f}')} | {_f(rss, '{:.0f}')} | "
            f"{_f(r.get('size_mb'), '{:.1f}')} |")
    lines += int8_section(res)
    lines += _peer_section(res)
    lines += ["", "## Summary (MLPerf-style)", "",
              "| target | single-stream p90 ms (batch 1) | offline img/s | at batch | status |",
              "|---|---|---|---|---|"]
    for k, v in res["summary"].items():
        lines.append(f"| {k} | {_f(v['single_stream_p90_ms'])} | {_f(v['offline_throughput_ips'])} | "
                     f"{v['offline_batch']} | {status_cell(v)} |")
    measured = res.get("measured_int8_peak") or {}
    floats = res.get("measured_float_peaks") or {}
    if measured.get("status") == "ran" or floats.get("status") == "ran":
        ceilings = []
        if measured.get("status") == "ran":
            ceilings.append(f"INT8 {measured['gmacs']:.0f} GMAC/s ({measured['what']})")
        if floats.get("status") == "ran":
            ceilings += [f"{k.upper()} {floats[k]:.0f} GMAC/s" for k in (Precision.FP32.value, Precision.BF16.value)
                         if floats.get(k)]
            ceilings[-1] += f" ({floats['what']})"
        lines += ["", "Measured GEMM ceilings on this machine, in this run: " + "; ".join(ceilings) + ". Each row's "
                  "fraction of the ceiling for its precision:"]
        for r in res.get("rows", []):
            if r.get("fraction_of_measured_peak") is not None:
                lines.append(f"- {r.get('label', r.get('backend'))} batch {r['batch']}: {r['gmacs_per_s']:.0f} GMAC/s = "
                             f"{r['fraction_of_measured_peak']:.2f} of the measured {r['precision']} peak")
    nominal = {k: v for k, v in m.get("int8_peak", {}).items() if k.endswith("_gmacs")}
    if nominal:  # none on a CPU without VNNI/AMX
        lines += ["", "Nominal INT8 estimate (cores x nominal GHz x MACs/cycle/core; not measured, often off): " + ", ".join(
            f"{k.replace('_gmacs', '')} {v:.0f} GMAC/s" for k, v in nominal.items()) + "."]
    acc = res.get("accuracy", {})
    if acc:
        d = res.get("accuracy_data", {})
        lines += ["", f"## Accuracy per precision ({d.get('data')}, split {d.get('split')}, n={d.get('n', '-')})", "",
                  "| target | status | accuracy | ROC-AUC | COVID sens. | COVID spec. | agreement vs FP32 "
                  "| flipped decisions | max abs dprob |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for k, a in acc.items():
            lines.append(f"| {k} | {a['status']} | {_f(a.get('accuracy'), '{:.3f}')} | {_f(a.get('roc_auc'), '{:.3f}')} | "
                         f"{_f(a.get('covid_sensitivity'), '{:.3f}')} | {_f(a.get('covid_specificity'), '{:.3f}')} | "
                         f"{a['top_class_agreement_vs_fp32']:.4f} | {a['decision_flips_vs_fp32']} | "
                         f"{a['max_abs_dprob_vs_fp32']:.2e} |")
    gpu_e2e = [r for r in res.get("rows", []) if r.get("e2e_gpu_preprocess")]
    if gpu_e2e:
        lines += ["", "End-to-end with GPU preprocessing (resize on the device):", ""]
        for r in gpu_e2e:
            got = (f"{r['e2e_gpu_throughput_ips']:.1f} img/s ({r['e2e_gpu_vs_engine']:.2f} of engine-only)"
                   if r["e2e_gpu_preprocess"] == "ran" else r["e2e_gpu_preprocess"])
            lines.append(f"- {r.get('label', r.get('backend'))} batch {r['batch']}: {got}")
    if res.get("preprocessing"):
        lines += ["", "## Preprocessing (decoded image -> model input; decoding stays on the CPU in both paths)", "",
                  "| path | implementation | images/s | ms/image | ms per megapixel | status |", "|---|---|---|---|---|---|"]
        for r in res["preprocessing"]:
            lines.append(f"| {r['path']} | {r['implementation']} | {_f(r.get('images_per_s'))} | "
                         f"{_f(r.get('ms_per_image'), '{:.2f}')} | {_f(r.get('ms_per_megapixel'), '{:.2f}')} | {r['status']} |")
    return "\n".join(lines) + "\n"


def _isa(m: dict) -> str:
    """The header's ISA clause, saying when ``CXR_EDGE_CPU_FLAGS`` forced it (results from older runs have none)."""
    facts = m.get("isa_facts") or {}
    forced = " (forced by CXR_EDGE_CPU_FLAGS)" if facts.get("forced") else ""
    return f"ISA {m.get('isa', '-')}{forced}"


def status_cell(r: dict) -> str:
    """A row's status, with a failed load-time self-check made visible: such an engine is refused by default when deployed."""
    sc = r.get("self_check") or {}
    if sc.get("status") != "failed":
        return r["status"]
    if sc.get("max_abs_dprob") is not None and sc.get("tolerance") is not None:
        detail = f"max |dp| {sc['max_abs_dprob']:.3g} > {sc['tolerance']:.3g}"
    else:
        detail = sc.get("reason") or "see results.json"
    return f"{r['status']} (self-check FAILED on {sc.get('where', '?')}: {detail})"


def int8_section(res: dict) -> list[str]:
    """Plain words on whether INT8 pays on this machine: each INT8 row slower than its FP32 artifact, or the range."""
    slower = res.get("int8_does_not_pay") or []
    if slower:
        return ["", "## Does INT8 pay on this machine?", ""] + [f"- {s['text']}" for s in slower]
    if res.get("int8_pays"):
        return ["", res["int8_pays"]]
    return []


def _peer_section(res: dict) -> list[str]:
    cmp = res.get("peers")
    if not cmp:
        return []
    out = ["", "## cxr-edge vs the peers (same run, interleaved rounds)", ""]
    if cmp.get("note"):
        return out + [cmp["note"]]
    out += [f"{cmp['rounds']} rounds; in each round every row ran once at every batch (order rotated), and the ratio "
            "is taken inside the round: our best validated row / the best peer row at that batch. Median [min-max] "
            "over rounds; the per-row img/s above are medians of the rounds' own.", "",
            "| batch | ours / best peer (throughput) | our best | best peer |", "|---|---|---|---|"]
    for b, c in cmp["throughput"].items():
        out.append(f"| {b} | **{c['median']:.2f}x** [{c['min']:.2f}-{c['max']:.2f}] | {c['ours_best']} | {c['peer_best']} |")
    if lat := cmp.get("latency_p90"):
        out += ["", f"Batch-1 p90 latency, best peer / ours (> 1: ours is faster): **{lat['median']:.2f}x** "
                    f"[{lat['min']:.2f}-{lat['max']:.2f}] ({lat['ours_best']} vs {lat['peer_best']})."]
    if v := cmp.get("vs_validated_peers"):
        failed = sorted(set(cmp["peers"]) - set(cmp.get("validated_peers", [])))
        out += ["", f"Against the peers that passed validation here (not: {', '.join(failed)}): "
                + "; ".join(f"batch {b} **{c['median']:.2f}x** [{c['min']:.2f}-{c['max']:.2f}] vs {c['peer_best']}"
                            for b, c in v["throughput"].items())
                + (f"; batch-1 p90 {v['latency_p90']['median']:.2f}x vs {v['latency_p90']['peer_best']}"
                   if v.get("latency_p90") else "") + "."]
    hows = {r["label"]: r["how"] for r in res.get("rows", []) if r.get("peer") and r.get("how")}
    if hows:
        out += ["", "Peers:"] + [f"- {k}: {v}" for k, v in hows.items()]
    return out


def plot_results(res: dict, out: Path) -> list[Path]:
    mpl = require("matplotlib")
    mpl.use("Agg")
    plt = require("matplotlib.pyplot")
    ok = [r for r in res["rows"] if "p50_ms" in r]
    files = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in sorted({r["label"] for r in ok}):
        pts = sorted((r["batch"], r["p50_ms"] / r["batch"]) for r in ok if r["label"] == label)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", label=label, ms=4)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("median latency per image (ms)")
    ax.set_title(f"{res.get('recipe')}: latency per image vs batch")
    ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(out / "latency_vs_batch.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    best = res["summary"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = list(best)
    vals = [best[k]["offline_throughput_ips"] for k in labels]
    colors = ["tab:green" if best[k]["status"] == "validated" else "tab:red" for k in labels]
    ax.barh(labels, vals, color=colors)
    ax.set_xlabel("offline throughput (images/s, best batch); red = failed validation")
    ax.set_title(f"{res.get('recipe')}: throughput per backend / precision")
    fig.tight_layout()
    files.append(out / "throughput.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    acc = {k: v for k, v in res.get("accuracy", {}).items() if v.get("roc_auc") is not None}
    if acc:
        fig, ax = plt.subplots(figsize=(7, 4))
        ks = list(acc)
        ax.bar(range(len(ks)), [acc[k]["roc_auc"] for k in ks], color="tab:blue", label="ROC-AUC")
        ax.plot(range(len(ks)), [acc[k]["top_class_agreement_vs_fp32"] for k in ks], "ko", label="agreement vs FP32")
        ax.set_xticks(range(len(ks)), ks, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(min(0.5, min(acc[k]["roc_auc"] for k in ks) - 0.05), 1.01)
        ax.set_title(f"{res.get('recipe')}: accuracy per precision")
        ax.legend()
        fig.tight_layout()
        files.append(out / "accuracy.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    return files


def write_results(res: dict, out_dir: str | Path, command: str | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({**res, "command": command}, indent=2, default=str) + "\n")
    md = out / "results.md"
    md.write_text(render_markdown(res, command))
    plot_results(res, out)
    return md
