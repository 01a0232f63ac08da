"""Benchmark outputs: results.json, results.md (tables) and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

from ..evaluation.criteria import FAILED, PASSED, WITHIN_RESOLUTION
from ..extras import require
from ..precision import Precision
from .int8_payoff import MOSTLY_FLOAT_BELOW, is_int8, percent
from .runner import BENCH_BACKENDS, NOT_VALIDATED, verdict_of

#: the one verdict -> (colour, words) mapping the plots and the Markdown share, so a bar's colour, the legend and the
#: table cell always say the same thing
VERDICT_STYLE: dict[str, tuple[str, str]] = {
    PASSED: ("tab:green", "passed"),
    WITHIN_RESOLUTION: ("tab:olive", "passed within resolution"),
    FAILED: ("tab:red", "failed"),
    NOT_VALIDATED: ("tab:gray", "not validated"),
}


def verdict_label(row: dict) -> str:
    """A row's verdict in the words the report uses everywhere."""
    return VERDICT_STYLE[verdict_of(row)][1]


def verdict_colour(row: dict) -> str:
    """A row's colour in every plot: the colour of its verdict."""
    return VERDICT_STYLE[verdict_of(row)][0]


def _f(v, fmt="{:.1f}"):
    return "-" if v is None else fmt.format(v)


def _timed(rows: list[dict]) -> list[dict]:
    """Rows with timings: the table's; the others are said once per cause under it."""
    return [r for r in rows if "p50_ms" in r]


def _mac_cell(r: dict) -> str:
    """The INT8 share of a row's MACs: beside every INT8 row, '-' for the others."""
    if not is_int8(r.get("precision", "")) or r.get("peer"):
        return "-"
    share = r.get("int8_mac_share")
    return "not recorded" if share is None else percent(share)


def _table(res: dict) -> list[str]:
    """The timed rows, one per (backend, provider, precision, batch)."""
    lines = ["| backend | provider | precision | INT8 share of MACs | batch | verdict | p50 ms | p90 ms | p99 ms | img/s "
             "| x Keras predict | x FP32 (same backend) | GMAC/s | e2e img/s | e2e/engine | decode-only img/s "
             "| e2e / min(engine, decode) | load s | RSS added MB | size MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in _timed(res["rows"]):
        peer = " (peer)" if r.get("peer") else ""
        rss = r.get("rss_added_mb", r.get("peak_rss_mb"))
        lines.append(
            f"| {r['label']}{peer} | {r.get('provider', '-')} | {r.get('precision', '-')} | {_mac_cell(r)} | "
            f"{r.get('batch', '-')} | {status_cell(r)} | "
            f"{_f(r.get('p50_ms'))} | {_f(r.get('p90_ms'))} | {_f(r.get('p99_ms'))} | {_f(r.get('throughput_ips'))} | "
            f"{_f(r.get('speedup_vs_keras_predict'), '{:.2f}')} | {_f(r.get('x_fp32_same_backend'), '{:.2f}')} | "
            f"{_f(r.get('gmacs_per_s'))} | "
            f"{_f(r.get('e2e_throughput_ips'))} | "
            f"{_f(r.get('e2e_vs_engine'), '{:.2f}')} | {_f(r.get('decode_ceiling_ips'))} | "
            f"{_f(r.get('e2e_vs_ceiling'), '{:.2f}')} | {_f(r.get('load_s'), '{:.2f}')} | {_f(rss, '{:.0f}')} | "
            f"{_f(r.get('size_mb'), '{:.1f}')} |")
    return lines


def under_the_table(res: dict) -> list[str]:
    """What a reader must not miss, right under the table: lower precisions slower than FP32, INT8 artifacts that are
    mostly float, the rows that did not run (one line per cause) and what the defaults left out."""
    out = []
    slower = [f"- {t}" for t in res.get("lower_precisions_slower") or []]
    if slower:
        out += ["", "Slower than FP32 on the same backend:", *slower]
    out += int8_section(res)
    if res.get("mostly_float"):
        out += ["", "Mostly float:", *[f"- WARNING: {t}" for t in res["mostly_float"]]]
    out += not_run_lines(res["rows"])
    out += left_out_line(res.get("left_out") or [])
    return out


def not_run_lines(rows: list[dict]) -> list[str]:
    """Rows without timings collapsed into one line per backend and cause (18 OpenVINO rows with one install hint are
    one line); every row is still in results.json."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if "p50_ms" not in r:
            groups.setdefault((str(r.get("backend", "?")), str(r.get("status", "?"))), []).append(r)
    if not groups:
        return []
    out = ["", "Not run (one line per cause; each row is in results.json):"]
    for (backend, cause), rs in groups.items():
        labels = ", ".join(dict.fromkeys(r.get("label", backend) for r in rs))
        batches = sorted({r["batch"] for r in rs if r.get("batch") is not None})
        at = f" at batch {', '.join(map(str, batches))}" if batches else ""
        out.append(f"- {backend}: {len(rs)} row{'s' if len(rs) > 1 else ''} not run ({labels}{at}): {cause}")
    return out


def left_out_line(left_out: list[dict]) -> list[str]:
    """One line: what this run did not try and why (backends that cannot run here, precisions with no artifact)."""
    if not left_out:
        return []
    by_why: dict[str, list[str]] = {}
    for e in left_out:
        by_why.setdefault(e["why"], []).append(e["what"])
    text = "; ".join(f"{', '.join(dict.fromkeys(whats))}: {why}" for why, whats in by_why.items())
    if any(e["what"] in BENCH_BACKENDS for e in left_out):
        text += (". By default bench times only the backends that can run here; one named with --backend is reported "
                 "as not run, with the cause")
    return ["", f"Left out of this run: {text}."]


def nominal_int8_line(m: dict) -> list[str]:
    """The nominal INT8 estimate of CPUs with VNNI/AMX, or nothing: no such unit, or no known clock, leaves nothing to
    say (never an empty sentence)."""
    nominal = {k.removesuffix("_gmacs"): v for k, v in (m.get("int8_peak") or {}).items() if k.endswith("_gmacs") and v}
    if not nominal:
        return []
    return ["", "Nominal INT8 estimate (cores x nominal GHz x MACs/cycle/core; not measured, often off): "
            + ", ".join(f"{k} {v:.0f} GMAC/s" for k, v in nominal.items()) + "."]


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
              "batch, and to the FP32 artifact on the same backend, provider, batch and options (\"x FP32 (same backend)\"), "
              "both measured in the same run (a shared VM's speed drifts between runs, so compare within one table only). "
              "Verdict: agreement with the FP32 artifact, judged by the export gate's limits: passed; passed within "
              "resolution (below the limit, but too few images to tell; accepted); failed; not validated.", ""]
    lines += _table(res)
    lines += under_the_table(res)
    lines += _peer_section(res)
    lines += ["", "## Summary (MLPerf-style)", "",
              "| target | single-stream p90 ms (batch 1) | offline img/s | at batch | verdict |",
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
    lines += nominal_int8_line(m)
    acc = res.get("accuracy", {})
    if acc:
        d = res.get("accuracy_data", {})
        lines += ["", f"## Accuracy per precision ({d.get('data')}, split {d.get('split')}, n={d.get('n', '-')})", "",
                  "| target | verdict | accuracy | ROC-AUC | COVID sens. | COVID spec. | agreement vs FP32 "
                  "| flipped decisions | max abs dprob |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for k, a in acc.items():
            lines.append(f"| {k} | {verdict_label(a)} | {_f(a.get('accuracy'), '{:.3f}')} | {_f(a.get('roc_auc'), '{:.3f}')} | "
                         f"{_f(a.get('covid_sensitivity'), '{:.3f}')} | {_f(a.get('covid_specificity'), '{:.3f}')} | "
                         f"{a['top_class_agreement_vs_fp32']:.4f} | {a['decision_flips_vs_fp32']} | "
                         f"{a['max_abs_dprob_vs_fp32']:.2e} |")
    lines += _gpu_e2e_lines(res.get("rows", []))
    if res.get("preprocessing"):
        lines += ["", "## Preprocessing (decoded image -> model input; decoding stays on the CPU in both paths)", "",
                  "| path | implementation | images/s | ms/image | ms per megapixel | status |", "|---|---|---|---|---|---|"]
        for r in res["preprocessing"]:
            lines.append(f"| {r['path']} | {r['implementation']} | {_f(r.get('images_per_s'))} | "
                         f"{_f(r.get('ms_per_image'), '{:.2f}')} | {_f(r.get('ms_per_megapixel'), '{:.2f}')} | {r['status']} |")
    return "\n".join(lines) + "\n"


def _gpu_e2e_lines(rows: list[dict]) -> list[str]:
    """End to end with GPU preprocessing: a line per row that ran, one per cause for those that could not."""
    gpu_e2e = [r for r in rows if r.get("e2e_gpu_preprocess")]
    if not gpu_e2e:
        return []
    out = ["", "End-to-end with GPU preprocessing (resize on the device):", ""]
    causes: dict[str, list[str]] = {}
    for r in gpu_e2e:
        if r["e2e_gpu_preprocess"] == "ran":
            out.append(f"- {r.get('label', r.get('backend'))} batch {r['batch']}: {r['e2e_gpu_throughput_ips']:.1f} img/s "
                       f"({r['e2e_gpu_vs_engine']:.2f} of engine-only)")
        else:
            causes.setdefault(r["e2e_gpu_preprocess"], []).append(str(r.get("label", r.get("backend"))))
    out += [f"- {', '.join(labels)}: {cause}" for cause, labels in causes.items()]
    return out


def _isa(m: dict) -> str:
    """The header's ISA clause, saying when ``CXR_EDGE_CPU_FLAGS`` forced it (results from older runs have none)."""
    facts = m.get("isa_facts") or {}
    forced = " (forced by CXR_EDGE_CPU_FLAGS)" if facts.get("forced") else ""
    return f"ISA {m.get('isa', '-')}{forced}"


def status_cell(r: dict) -> str:
    """A row's verdict, with a failed load-time self-check made visible: such an engine is refused by default when
    deployed."""
    sc = r.get("self_check") or {}
    if sc.get("status") != "failed":
        return verdict_label(r)
    if sc.get("max_abs_dprob") is not None and sc.get("tolerance") is not None:
        detail = f"max |dp| {sc['max_abs_dprob']:.3g} > {sc['tolerance']:.3g}"
    else:
        detail = sc.get("reason") or "see results.json"
    return f"{verdict_label(r)} (self-check FAILED on {sc.get('where', '?')}: {detail})"


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
    files = [_plot_latency(plt, res, out / "latency_vs_batch.png"), _plot_throughput(plt, res, out / "throughput.png")]
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


def _plain_log_axes(ax, batches: list[int]) -> None:
    """Log axes labelled as plain numbers (1, 8, 32; 2, 5, 10 ms), not as powers (2^3, 10^0), which readers misread."""
    ticker = require("matplotlib.ticker")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(batches)
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))


def _plot_latency(plt, res: dict, path: Path) -> Path:
    """Median latency per image against batch size, a line per timed target."""
    ok = _timed(res["rows"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in sorted({r["label"] for r in ok}):
        pts = sorted((r["batch"], r["p50_ms"] / r["batch"]) for r in ok if r["label"] == label)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", label=label, ms=4)
    _plain_log_axes(ax, sorted({r["batch"] for r in ok}) or [1])
    ax.set_xlabel("batch size")
    ax.set_ylabel("median latency per image (ms)")
    ax.set_title(f"{res.get('recipe')}: latency per image vs batch")
    if ok:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bar_note(v: dict) -> str:
    """The words at a bar's end: img/s, the ratio to FP32 on the same backend, and a mostly-float INT8 share."""
    note = f" {v['offline_throughput_ips']:.0f} img/s"
    if v.get("x_fp32_same_backend") is not None:
        note += f", {v['x_fp32_same_backend']:.2f}x FP32"
    share = v.get("int8_mac_share")
    if share is not None and share < MOSTLY_FLOAT_BELOW:
        note += f", only {percent(share)} INT8 MACs"
    return note


def legend_entries(summary: dict) -> list[tuple[str, str]]:
    """(colour, words) of each verdict the bars show, in the verdicts' order: the legend can only say what is drawn."""
    shown = {verdict_of(v) for v in summary.values()}
    return [style for verdict, style in VERDICT_STYLE.items() if verdict in shown]


def _plot_throughput(plt, res: dict, path: Path) -> Path:
    """Best offline throughput per target, each bar coloured by its verdict, with a legend of those verdicts."""
    patches = require("matplotlib.patches")
    best = res["summary"]
    labels = list(best)
    vals = [best[k]["offline_throughput_ips"] for k in labels]
    fig, ax = plt.subplots(figsize=(8, 0.9 + 0.45 * max(len(labels), 3)))
    bars = ax.barh(labels, vals, color=[verdict_colour(best[k]) for k in labels])
    for bar, k in zip(bars, labels):
        if (best[k].get("self_check") or {}).get("status") == "failed":
            bar.set_hatch("//")
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, _bar_note(best[k]), va="center", fontsize=8)
    ax.set_xlim(0, 1.45 * max(vals, default=1))
    handles = [patches.Patch(color=colour, label=words) for colour, words in legend_entries(best)]
    if any((best[k].get("self_check") or {}).get("status") == "failed" for k in labels):
        handles.append(patches.Patch(facecolor="white", edgecolor="black", hatch="//", label="self-check failed here"))
    if handles:
        ax.legend(handles=handles, title="agreement with FP32", fontsize=8, title_fontsize=8, loc="lower right")
    ax.set_xlabel("offline throughput (images/s, at the best batch)")
    ax.set_title(f"{res.get('recipe')}: throughput per backend / precision")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(res: dict, out_dir: str | Path, command: str | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({**res, "command": command}, indent=2, default=str) + "\n")
    md = out / "results.md"
    md.write_text(render_markdown(res, command))
    plot_results(res, out)
    return md
