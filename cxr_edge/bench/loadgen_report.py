"""results.json, results.md (one table: scenario, target, backend/precision, MLPerf's metric, VALID/INVALID, settings)
and a plot for ``cxr-edge loadgen``, beside LoadGen's own log folders."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import MissingExtraError
from ..extras import require

log = logging.getLogger(__name__)

SHORTENED_NOTE = ("**Shortened settings** (minimum duration {dur} instead of MLPerf's 600 s{more}): these are LoadGen-"
                  "measured numbers under MLPerf's ResNet-50 rules otherwise, **not comparable as an official MLPerf "
                  "submission** (nor are any on a data set other than ImageNet, or any without the submission checker).")


def _value(r: dict[str, Any]) -> str:
    s = r["summary"]
    if r["mode"] == "AccuracyOnly":
        acc = r.get("accuracy") or {}
        v = acc.get("top1_accuracy")
        return f"{100 * v:.2f} %" if v is not None else "unlabelled"
    if s.get("value") is None:
        return "no result"
    return f"{s['value']:.3f} ms" if s.get("unit") == "ms" else f"{s['value']:.1f} samples/s"


def _metric(r: dict[str, Any]) -> str:
    if r["mode"] == "AccuracyOnly":
        return "top-1 accuracy"
    return r["summary"].get("metric") or "-"


def _settings_cell(r: dict[str, Any]) -> str:
    u = r["settings"]
    parts = [f"min {u['min_duration_s']:g} s", f"min {u['min_query_count']} queries"]
    if "server_target_qps" in u:
        parts.append(f"target {u['server_target_qps']:g} QPS, bound {u['server_target_latency_ms']:g} ms")
    if "samples_per_query" in u:
        parts.append(f"{u['samples_per_query']} samples/query")
    parts.append("official minimums" if u["official_minimums"] else "shortened")
    return "; ".join(parts)


def table_lines(rows: Sequence[dict[str, Any]], label: str | None = None) -> list[str]:
    """The markdown table of rows (from one or several results.json)."""
    head = "| scenario | target | backend / precision | metric (MLPerf) | value | result | settings used |"
    lines = [head if label is None else head.replace("| scenario |", "| run | scenario |"),
             "|---" * (7 if label is None else 8) + "|"]
    for r in rows:
        suffix = {"AccuracyOnly": " (accuracy)", "FindPeakPerformance": " (peak search)"}
        cells = [r["scenario"] + suffix.get(r["summary"].get("mode") or r["mode"], ""), r["target"],
                 f"{r.get('backend') or 'default'} / {r['precision']}", _metric(r), _value(r), r["verdict"],
                 _settings_cell(r)]
        lines.append("| " + " | ".join(([label] if label is not None else []) + cells) + " |")
    return lines


def _detail_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Per performance run: the latency percentiles and LoadGen's own recommendations, so an INVALID says why."""
    out = ["| scenario | target | p50 ms | p90 ms | p99 ms | QPS | checks failed | LoadGen notes |", "|---" * 8 + "|"]
    for r in rows:
        if r["mode"] == "AccuracyOnly":
            continue
        s = r["summary"]
        lat = s.get("latency_ms") or {}
        failed = [k for k, ok in (s.get("checks") or {}).items() if not ok] or ["-"]
        qps = s.get("qps_with_loadgen_overhead") or s.get("scheduled_samples_per_second")
        if qps is None and s.get("unit") == "samples/s":
            qps = s.get("value")
        notes = "; ".join(s.get("notes") or [])[:300] or "-"
        out.append(f"| {r['scenario']} | {r['target']} | {_f(lat.get('p50'))} | {_f(lat.get('p90'))} | "
                   f"{_f(lat.get('p99'))} | {_f(qps, '{:.1f}')} | {', '.join(failed)} | {notes} |")
    return out


def _f(v, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def _accuracy_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    acc = [r for r in rows if r.get("accuracy")]
    if not acc:
        return []
    out = ["", "## Accuracy (LoadGen's accuracy log, scored here)", "",
           "| scenario | target | samples | answered | failed | top-1 accuracy | top-1 agreement vs FP32 | max abs dprob |",
           "|---" * 8 + "|"]
    for r in acc:
        a = r["accuracy"]
        top1 = a.get("top1_accuracy")
        agree = a.get("top1_agreement_vs_fp32")
        out.append(f"| {r['scenario']} | {r['target']} | {a['samples']} | {a['answered']} | {a['failed']} | "
                   f"{'-' if top1 is None else f'{100 * top1:.2f} %'} | {'-' if agree is None else f'{100 * agree:.2f} %'} | "
                   f"{_f(a.get('max_abs_dprob_vs_fp32'), '{:.2g}')} |")
    out += ["", f"Labels: {acc[0]['accuracy']['labels']}; reference: {acc[0]['accuracy']['reference']}."]
    return out


def render_markdown(res: dict[str, Any], command: str | None = None) -> str:
    a, rows = res["artifact"], res["rows"]
    lines = [f"# MLPerf LoadGen: {a['file']} ({a.get('recipe')}, {a['precision']}), {res['date']}", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    data = res["data"]
    lines += [f"LoadGen {res.get('loadgen_version')}; system under test: {_system_line(res)}; samples: {data['data']} "
              f"({data.get('split') or 'all'} split, {data['n']} images).", ""]
    if not res["official"]:
        lines += [_shortened(rows), ""]
    lines += table_lines(rows) + ["", "## Latency detail (LoadGen's summary)", ""] + _detail_lines(rows)
    lines += _accuracy_lines(rows)
    lines += ["", "LoadGen's own logs, untouched (mlperf_log_summary.txt, mlperf_log_detail.txt, mlperf_log_accuracy.json): "
              + ", ".join(f"`{r['logs']}/`" for r in rows) + "."]
    return "\n".join(lines) + "\n"


def _system_line(res: dict[str, Any]) -> str:
    s = res["system"]
    if s["target"] == "direct":
        return (f"the engine in-process ({s.get('backend')}, {s.get('provider')}, threads {s.get('threads') or 'default'}; "
                f"Server batcher max {s['server_batcher']['max_batch']}, {s['server_batcher']['max_delay_ms']:g} ms)")
    what = "HTTP service (POST /v1/predict, multipart)" if s["target"] == "serve" else "DICOM node (C-STORE, GET /v1/jobs)"
    how = "started here: `" + " ".join(s["command"][2:]) + "`" if s.get("started_here") else f"at {s.get('url')}"
    return f"the {what} over loopback, {how}"


def _shortened(rows: Sequence[dict[str, Any]]) -> str:
    perf = [r for r in rows if r["mode"] != "AccuracyOnly"] or list(rows)
    dur = ", ".join(sorted({f"{r['settings']['min_duration_s']:g} s" for r in perf}))
    more = [f"{r['scenario']} min query count {r['settings']['changed_from_rules']['min_query_count']}"
            for r in perf if "min_query_count" in r["settings"]["changed_from_rules"]]
    return SHORTENED_NOTE.format(dur=dur, more=("; " + "; ".join(dict.fromkeys(more))) if more else "")


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Latency scenarios (ms) and throughput scenarios (samples/s), one horizontal bar per run; INVALID hatched."""
    perf = [r for r in rows if r["mode"] != "AccuracyOnly" and r["summary"].get("value") is not None]
    if not perf:
        return None
    mpl = require("matplotlib")
    mpl.use("Agg")
    plt = require("matplotlib.pyplot")
    panels = [(u, x, [r for r in perf if r["summary"]["unit"] == u])
              for u, x in (("ms", "latency (ms): SingleStream p90, MultiStream p99"),
                           ("samples/s", "samples/s: Server completed, Offline"))]
    panels = [p for p in panels if p[2]]
    fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                             figsize=(9, 1.2 + 0.32 * sum(len(p[2]) for p in panels) + 0.8 * len(panels)),
                             gridspec_kw={"height_ratios": [len(p[2]) for p in panels]})
    for ax, (_, xlabel, sel) in zip(axes[:, 0], panels):
        labels = [f"{r['scenario']}{' (peak search)' if r['summary'].get('mode') == 'FindPeakPerformance' else ''} | "
                  f"{r['target']} | {r.get('backend') or 'default'} | {r['precision']}" for r in sel]
        bars = ax.barh(range(len(sel)), [r["summary"]["value"] for r in sel],
                       color=["tab:green" if r["verdict"] == "VALID" else "lightgrey" for r in sel])
        for b, r in zip(bars, sel):
            if r["verdict"] != "VALID":
                b.set_hatch("//")
            ax.annotate(f"{r['summary']['value']:.3g}", (b.get_width(), b.get_y() + b.get_height() / 2),
                        xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
        ax.set_yticks(range(len(sel)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(xlabel, fontsize=8)
    fig.suptitle(title + " (green: VALID; grey, hatched: INVALID)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(res: dict[str, Any], out: str | Path, command: str | None = None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({**res, "command": command}, indent=2, default=str) + "\n")
    md = out / "results.md"
    md.write_text(render_markdown(res, command))
    a = res["artifact"]
    try:
        plot(res["rows"], out / "loadgen.png", f"LoadGen: {a['file']} ({a['precision']}), target {res['target']}")
    except MissingExtraError as exc:  # a bare benchmark host (the GPU kit's) still gets its tables and logs
        log.warning("no plot: %s", exc)
    return md


def combined(folders: Sequence[Path]) -> tuple[list[str], list[dict[str, Any]]]:
    """One table over several ``cxr-edge loadgen`` result folders (one per artifact x backend x target), each row
    labelled by its folder, with the command that made it."""
    lines, rows = [], []
    for f in folders:
        res = json.loads((f / "results.json").read_text())
        for r in res["rows"]:
            rows.append({**r, "run": f.name})
    lines += ["| run | scenario | target | backend / precision | metric (MLPerf) | value | result | settings used |",
              "|---" * 8 + "|"]
    for f in folders:
        lines += table_lines([r for r in rows if r["run"] == f.name], label=f"`{f.name}`")[2:]
    return lines, rows


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m cxr_edge.bench.loadgen_report DIR``: the combined table (stdout) and plot (DIR/loadgen.png) of
    every results.json in DIR's sub-folders."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("folder", type=Path)
    a = ap.parse_args(argv)
    folders = sorted(p.parent for p in a.folder.glob("*/results.json"))
    if not folders:
        raise SystemExit(f"no */results.json under {a.folder}: run cxr-edge loadgen --out {a.folder}/NAME first")
    lines, rows = combined(folders)
    print("\n".join(lines))
    plot(rows, a.folder / "loadgen.png", f"LoadGen: {a.folder.name}")
    for f in folders:
        print(f"\n`{f.name}`: `{json.loads((f / 'results.json').read_text()).get('command')}`")


if __name__ == "__main__":
    main()
