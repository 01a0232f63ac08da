"""What a bench report says and how it looks (issue 31): verdict colours, x FP32, INT8 MAC share, not-run rows, what
the defaults leave out, and the CLI's precision words. Results are built by hand: no timing, no TensorFlow."""

import argparse

import pytest

from cxr_edge.bench.int8_payoff import add_fp32_ratios, int8_does_not_pay, int8_pays, lower_precisions_slower, mostly_float
from cxr_edge.bench.report import VERDICT_STYLE, legend_entries, render_markdown, verdict_colour, verdict_label
from cxr_edge.bench.runner import NOT_VALIDATED, BenchConfig, _summary, verdict_of
from cxr_edge.evaluation.criteria import FAILED, PASSED, WITHIN_RESOLUTION

MACHINE = {"cpu_model": "AMD EPYC", "cpu_mhz": 2400.0, "cpu_flags": ["avx2", "fma"], "usable_cores": 2, "gpu": None,
           "versions": {}, "isa": "AVX2", "int8_peak": {"cores": 2, "ghz": 2.4},
           "isa_facts": {"isa": "AVX2", "exact_int8_dot_products": False, "forced": False}}
OV_HINT = "could not run: the OpenVINO backend needs the 'openvino' package, which is not installed. Install it with: pip install 'cxr-edge[openvino]'"


def _row(label, batch, ips=None, status="validated", precision=None, **extra):
    backend, tag = label.split()[:2]
    row = {"label": label, "backend": backend, "provider": "CPUExecutionProvider", "batch": batch,
           "precision": precision or tag.split("-")[0], "artifact": f"model.{tag}.onnx", "status": status, **extra}
    if ips is not None:
        row.update({"throughput_ips": ips, "p50_ms": 1e3 * batch / ips, "p90_ms": 1e3 * batch / ips})
    return row


def _res(rows, **extra):
    add_fp32_ratios(rows)
    return {"recipe": "tiny", "input": {"height": 32, "width": 32}, "macs_per_image": 1e9, "machine": MACHINE,
            "rows": rows, "summary": _summary(rows, 0), "int8_does_not_pay": int8_does_not_pay(rows, MACHINE),
            "int8_pays": int8_pays(rows, MACHINE), "lower_precisions_slower": lower_precisions_slower(rows),
            "mostly_float": mostly_float(rows), **extra}


def _table_row(md: str, label: str, batch: int) -> list[str]:
    line = next(x for x in md.splitlines() if x.startswith(f"| {label} |") and f"| {batch} |" in x)
    return [c.strip() for c in line.strip("|").split("|")]


# ---- 1: one verdict -> colour/words mapping for the plot, its legend and the Markdown


def test_a_within_resolution_int8_row_is_not_coloured_or_called_failed():
    rows = [_row("onnxruntime fp32", 8, 70.0), _row("onnxruntime int8-cpu", 8, 66.7, "validated within resolution"),
            _row("onnxruntime fp16", 8, 60.0, "ran, failed validation")]
    res = _res(rows)
    within = res["summary"]["onnxruntime int8-cpu"]
    assert verdict_of(within) == WITHIN_RESOLUTION and verdict_label(within) == "passed within resolution"
    assert verdict_colour(within) != VERDICT_STYLE[FAILED][0] and verdict_colour(within) != VERDICT_STYLE[PASSED][0]
    assert verdict_colour(res["summary"]["onnxruntime fp16"]) == VERDICT_STYLE[FAILED][0]
    # the legend names exactly the verdicts drawn, in the colours drawn
    assert legend_entries(res["summary"]) == [VERDICT_STYLE[PASSED], VERDICT_STYLE[WITHIN_RESOLUTION], VERDICT_STYLE[FAILED]]
    cells = _table_row(render_markdown(res), "onnxruntime int8-cpu", 8)
    assert "passed within resolution" in cells and "failed" not in " ".join(cells)
    assert verdict_of({"status": "could not run: x"}) == NOT_VALIDATED  # never validated: its own colour and words
    assert len({c for c, _ in VERDICT_STYLE.values()}) == len(VERDICT_STYLE)


def test_plots_label_batches_as_plain_numbers(tmp_path):
    mpl = pytest.importorskip("matplotlib")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    from cxr_edge.bench.report import _plain_log_axes, plot_results

    fig, ax = plt.subplots()
    ax.plot([1, 8, 16], [10.0, 3.0, 2.0])
    _plain_log_axes(ax, [1, 8, 16])
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "8", "16"]
    assert all("^" not in t.get_text() and "times" not in t.get_text() for t in ax.get_yticklabels(which="both"))
    plt.close(fig)
    rows = [_row("onnxruntime fp32", b, 70.0 * b) for b in (1, 8)] + [
        _row("onnxruntime int8-cpu", b, 60.0 * b, "validated within resolution") for b in (1, 8)]
    assert {p.name for p in plot_results(_res(rows), tmp_path)} == {"latency_vs_batch.png", "throughput.png"}


# ---- 2: x FP32 (same backend), and a lower precision slower than FP32 said plainly


def test_x_fp32_column_and_slower_lines_under_the_table():
    rows = [_row("onnxruntime fp32", 8, 71.4), _row("onnxruntime int8-cpu", 8, 66.7, int8_mac_share=1.0),
            _row("onnxruntime fp16", 8, 35.7), _row("openvino fp32", 8, 80.0),
            _row("openvino int8-cpu", 8, 120.0, options={"streams": 2})]  # other options: no FP32 row to compare with
    md = render_markdown(_res(rows))
    header = next(x for x in md.splitlines() if x.startswith("| backend |"))
    assert "| x Keras predict | x FP32 (same backend) |" in header
    assert _table_row(md, "onnxruntime int8-cpu", 8)[11] == "0.93"
    assert _table_row(md, "openvino int8-cpu", 8)[11] == "-"
    assert "onnxruntime int8-cpu at batch 8 runs 0.93x its FP32 artifact on the same backend (66.7 vs 71.4 img/s)" in md
    assert "onnxruntime fp16 at batch 8 is SLOWER than FP32 on the same backend: 0.50x (35.7 vs 71.4 img/s)" in md
    assert md.index("SLOWER") < md.index("## Summary")  # under the table, before anything else


# ---- 3: the INT8 share of MACs beside every INT8 row, and a warning when it is mostly float


def test_int8_mac_share_beside_int8_rows_and_mostly_float_warned():
    rows = [_row("onnxruntime fp32", 8, 70.0), _row("onnxruntime int8-trt", 8, 75.0, int8_mac_share=0.13),
            _row("onnxruntime int8-cpu", 8, 90.0, int8_mac_share=0.995), _row("onnxruntime int8-ov", 8, 80.0)]
    md = render_markdown(_res(rows))
    assert _table_row(md, "onnxruntime int8-trt", 8)[3] == "13%"
    assert _table_row(md, "onnxruntime int8-cpu", 8)[3] == "99.5%"
    assert _table_row(md, "onnxruntime int8-ov", 8)[3] == "not recorded"
    assert _table_row(md, "onnxruntime fp32", 8)[3] == "-"
    warned = [x for x in md.splitlines() if "WARNING" in x]
    assert len(warned) == 1 and "only 13% of the MACs of model.int8-trt.onnx run in INT8" in warned[0]
    assert "mostly float" in warned[0]


def test_int8_mac_share_is_read_from_the_export_manifest(tiny_export):
    from cxr_edge.bench.int8_payoff import int8_mac_share

    share = int8_mac_share(tiny_export.out_dir / "model.int8-cpu.onnx")
    assert share is not None and 0 < share <= 1
    assert int8_mac_share(tiny_export.out_dir / "model.fp32.onnx") is None


# ---- 4: rows that did not run, one line per cause


def test_not_run_rows_collapse_to_one_line_per_cause():
    rows = [_row("onnxruntime fp32", 1, 70.0)]
    rows += [_row(f"openvino {p}", b, status=OV_HINT) for p in ("fp32", "bf16", "int8-cpu") for b in (1, 8, 32)]
    rows += [_row(f"openvino {p}", b, status=OV_HINT) for p in ("int8-trt", "int8-ov", "fp16") for b in (1, 8, 32)]
    rows += [{"label": "tensorrt fp32", "backend": "tensorrt", "precision": "fp32", "status": "could not run: no GPU"}]
    md = render_markdown(_res(rows))
    assert md.count("pip install 'cxr-edge[openvino]'") == 1
    line = next(x for x in md.splitlines() if x.startswith("- openvino:"))
    assert line.startswith("- openvino: 18 rows not run (openvino fp32, openvino bf16,") and "at batch 1, 8, 32" in line
    assert "- tensorrt: 1 row not run (tensorrt fp32): could not run: no GPU" in md
    assert not any(x.startswith("| openvino") for x in md.splitlines())  # no table row without timings


# ---- 5: defaults are what can run here; explicit asks are reported


@pytest.fixture
def no_openvino_no_gpu(monkeypatch):
    from cxr_edge.bench import runner

    why = {"onnxruntime": None, "openvino": "openvino is not installed (pip install 'cxr-edge[openvino]')",
           "tensorrt": "no NVIDIA GPU and no TensorRT here", "keras": None}
    monkeypatch.setattr(runner, "backend_availability", lambda: dict(why))
    return why


def test_default_backends_leave_out_what_cannot_run_here(no_openvino_no_gpu, tiny_export):
    from cxr_edge.bench.report import left_out_line
    from cxr_edge.bench.runner import discover_targets, resolve_backends

    backends, left_out = resolve_backends(BenchConfig())
    assert backends == ("onnxruntime", "keras")
    assert {e["what"] for e in left_out} == {"openvino", "tensorrt"}
    line = left_out_line(left_out)[1]
    assert "openvino: openvino is not installed" in line and "tensorrt: no NVIDIA GPU" in line
    targets, skipped, _ = discover_targets(tiny_export.out_dir, BenchConfig())
    assert {t.backend for t in targets} == {"onnxruntime"} and all(r["backend"] == "keras" for r in skipped)

    # named explicitly, TensorRT is kept and reported as not run, with its cause
    explicit = BenchConfig(backends=("onnxruntime", "tensorrt"))
    assert resolve_backends(explicit) == (("onnxruntime", "tensorrt"), [])
    _, skipped, _ = discover_targets(tiny_export.out_dir, explicit)
    trt = [r for r in skipped if r["backend"] == "tensorrt"]
    assert trt and all(r["status"].startswith("could not run: no GPU/TensorRT") for r in trt)
    _, skipped, _ = discover_targets(tiny_export.out_dir, BenchConfig(backends=("tensorrt",), precisions=("fp32",)))
    assert [r["label"] for r in skipped] == ["tensorrt fp32", "onnxruntime-trt-ep fp32"]  # only what was asked for


def test_precisions_without_an_artifact_are_named_once(tiny_export, tmp_path):
    from cxr_edge.bench.runner import left_out_precisions

    assert left_out_precisions(tiny_export.out_dir, BenchConfig().precisions, ("onnxruntime", "openvino")) == []
    (tmp_path / "model.fp32.onnx").write_bytes((tiny_export.out_dir / "model.fp32.onnx").read_bytes())
    got = left_out_precisions(tmp_path, ("fp32", "bf16", "int8-cpu"), ("onnxruntime",))
    assert [e["what"] for e in got] == ["bf16", "int8-cpu"]
    assert "openvino is not timed" in got[0]["why"] and got[1]["why"] == "no artifact in the folder"


# ---- 6: no empty nominal line


def test_nominal_int8_line_is_filled_or_left_out():
    from cxr_edge.bench.report import nominal_int8_line

    assert nominal_int8_line(MACHINE) == []  # AVX2: no VNNI/AMX estimate to give
    assert nominal_int8_line({"int8_peak": {"cores": 2, "ghz": 0.0, "avx512_vnni_gmacs": 0.0}}) == []  # no clock
    line = nominal_int8_line({"int8_peak": {"cores": 2, "ghz": 2.4, "avx512_vnni_gmacs": 614.4}})[1]
    assert line.endswith(": avx512_vnni 614 GMAC/s.")
    assert "Nominal" not in render_markdown(_res([_row("onnxruntime fp32", 1, 70.0)]))


# ---- 7: the CLI speaks export's precision words; canonical flags with their plural aliases


def test_bench_cli_precision_words_and_aliases(capsys):
    from cxr_edge.cli import build_parser
    from cxr_edge.precision import INT8_TAGS

    p = build_parser()
    a = p.parse_args(["bench", "d", "--precision", "fp32,int8", "--backend", "onnxruntime", "--batch-size", "1,8"])
    assert a.precisions == ("fp32", *INT8_TAGS) and a.backends == ("onnxruntime",) and a.batch == (1, 8)
    a = p.parse_args(["bench", "d", "--precisions", "int8-cpu,int8", "--backends", "keras,onnxruntime", "--batch", "4"])
    assert a.precisions == ("int8-cpu", "int8-trt", "int8-ov") and a.backends == ("keras", "onnxruntime")
    assert p.parse_args(["bench", "d"]).backends is None  # defaults: what can run here, decided at run time
    for bad in (["--precision", "int4"], ["--backend", "tflite"], ["--batch-size", "0"]):
        with pytest.raises(SystemExit) as exc:
            p.parse_args(["bench", "d", *bad])
        assert exc.value.code == 2
    capsys.readouterr()
    sub = next(x for x in p._actions if isinstance(x, argparse._SubParsersAction))
    text = sub.choices["bench"].format_help()
    assert "--precision LIST, --precisions LIST" in text and "--backend LIST, --backends LIST" in text
    assert "%" not in text and "('" not in text and "['" not in text
