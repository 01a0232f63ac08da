"""Benchmark runner: rows, statuses, ratios, outputs. No timing asserts (the machine is shared and noisy)."""

import json

import numpy as np
import pytest

from cxr_edge.bench.machine import int8_peak, machine_info
from cxr_edge.bench.timing import measure, summarise
from cxr_edge.graph_macs import macs_per_image


def test_measure_respects_budget_and_min_iterations():
    calls = []
    t = measure(lambda b: calls.append(b), [1, 2, 3], budget_s=0.0, warmup=2, min_iters=5)
    assert len(t) == 5 and calls[:2] == [1, 2] and calls[2:] == [1, 2, 3, 1, 2]  # rotating inputs
    s = summarise(t, batch=4)
    assert s["iterations"] == 5 and s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"]


def test_machine_info_and_peak():
    m = machine_info()
    assert m["usable_cores"] >= 1 and "onnxruntime" in m["versions"]
    peak = int8_peak()
    assert peak["cores"] == m["usable_cores"]


def test_bench_rows_statuses_and_outputs(tiny_export, tmp_path):
    from cxr_edge.bench.report import write_results
    from cxr_edge.bench.runner import BenchConfig, run_bench

    s = tiny_export
    macs = macs_per_image(s.out_dir / "model.fp32.onnx")
    assert macs == 32 * 32 * 4 * (3 * 3 * 1) + 4 * 2  # conv 32x32x4x(3x3x1) + classifier 4x2
    # backends named: a default run leaves out what cannot run here (tests/test_bench_report.py), named ones are reported
    cfg = BenchConfig(batches=(1, 4), budget_s=0.05, max_accuracy_images=64,
                      backends=("onnxruntime", "openvino", "tensorrt", "keras"))
    res = run_bench(s.out_dir, cfg, progress=False)
    rows = res["rows"]
    labels = {r["label"] for r in rows}
    assert {"onnxruntime fp32", "onnxruntime fp16", "onnxruntime int8-cpu", "onnxruntime int8-trt"} <= labels
    keras = [r for r in rows if r["backend"] == "keras"]
    assert keras and all(r["status"] == "could not run: the source .keras model is not available" for r in keras)
    trt = [r for r in rows if r["backend"] == "tensorrt"]
    assert trt and all(r["status"].startswith("could not run: no GPU/TensorRT") for r in trt)
    timed = [r for r in rows if "p50_ms" in r]
    assert timed and all(r["status"] in ("validated", "ran, failed validation") for r in timed)
    assert all(r["gmacs_per_s"] > 0 for r in timed)
    assert any("e2e_throughput_ips" in r for r in timed if r["batch"] == 4)
    e2e = [r for r in timed if "e2e_throughput_ips" in r]  # judged against min(engine, decode-only), both measured here
    assert all(r["decode_ceiling_ips"] > 0 and r["e2e_vs_ceiling"] == pytest.approx(
        r["e2e_throughput_ips"] / min(r["throughput_ips"], r["decode_ceiling_ips"])) for r in e2e)
    assert res["accuracy"]["onnxruntime fp32"]["top_class_agreement_vs_fp32"] == 1.0
    assert res["accuracy"]["onnxruntime fp32"]["max_abs_dprob_vs_fp32"] == 0.0
    assert res["accuracy_data"]["split"] == "test"  # found through the artifact's manifest: there is no .keras
    md = write_results(res, tmp_path, "cxr-edge bench test")
    assert {"results.json", "results.md", "latency_vs_batch.png", "throughput.png"} <= {p.name for p in tmp_path.iterdir()}
    text = md.read_text()
    assert text.count("could not run: no GPU/TensorRT (no engine built") == 1  # one line per cause, not a row each
    assert "- tensorrt: 3 rows not run (tensorrt fp32, tensorrt fp16, tensorrt int8)" in text
    assert not any(line.startswith("| tensorrt") for line in text.splitlines())
    assert json.loads((tmp_path / "results.json").read_text())["command"] == "cxr-edge bench test"


@pytest.mark.train
def test_bench_keras_baseline_and_ratios(exported):
    from cxr_edge.bench.runner import BenchConfig, run_bench

    _, s, _ = exported
    macs = macs_per_image(s.out_dir / "model.fp32.onnx")
    # conv1 28x28x32x(5x5x1) + conv2 10x10x64x(5x5x32) + fc1 1600x512 + probs 512x2: the grey input's
    # replication to three channels is folded into conv1 at export, a third of its MACs (graph_fold)
    assert macs == 28 * 28 * 32 * 25 + 10 * 10 * 64 * 800 + 1600 * 512 + 512 * 2
    cfg = BenchConfig(batches=(1, 4), budget_s=0.05, max_accuracy_images=32, backends=("onnxruntime", "keras"),
                      precisions=("fp32", "int8-cpu"), e2e=False)
    rows = run_bench(s.out_dir, cfg, progress=False)["rows"]
    assert {"onnxruntime fp32", "onnxruntime int8-cpu", "keras predict", "keras call"} <= {r["label"] for r in rows}
    timed = [r for r in rows if "p50_ms" in r]
    assert all("speedup_vs_keras_predict" in r for r in timed)
    assert all(abs(r["speedup_vs_keras_predict"] - 1) < 1e-9 for r in timed if r["label"] == "keras predict")


def test_an_engine_failing_mid_run_becomes_rows_not_a_crash(tiny_export, monkeypatch):
    """Seen for real: OpenVINO could not compile the mixed-precision ResNet152V2 int8-trt graph."""
    from cxr_edge.bench.runner import BenchConfig, run_bench
    from cxr_edge.runtime.backends.onnxruntime import OnnxRuntimeBackend

    s = tiny_export
    real = OnnxRuntimeBackend._infer

    def fail_int8(self, batch, outputs):  # after its load-time self-check: the engine loads, then fails on real input
        if "int8-cpu" in self.artifact.name and self.info.self_check is not None:
            raise RuntimeError("Exception from node.cpp:823:\n[CPU] Convolution node is not initialized")
        return real(self, batch, outputs)

    monkeypatch.setattr(OnnxRuntimeBackend, "_infer", fail_int8)
    res = run_bench(s.out_dir, BenchConfig(batches=(1, 2), budget_s=0.02, max_accuracy_images=16,
                                           backends=("onnxruntime",), e2e=False), progress=False)
    bad = [r for r in res["rows"] if r["label"] == "onnxruntime int8-cpu"]
    assert [r["batch"] for r in bad] == [1, 2]
    assert all(r["status"] == "failed while running: [CPU] Convolution node is not initialized" for r in bad)
    assert any(r["label"] == "onnxruntime fp32" and "p50_ms" in r for r in res["rows"])


def test_the_int8_ceiling_is_measured_not_assumed():
    from cxr_edge.bench.peak import measured_int8_gemm_peak

    p = measured_int8_gemm_peak(budget_s=0.05, n=256)
    assert p["status"] == "ran" and p["gmacs"] > 0 and "MatMulInteger" in p["what"]


# ---- issue 25: the machine's ISA, the load-time self-check, and whether INT8 pays here


def test_machine_info_names_the_isa_and_follows_forced_flags(monkeypatch):
    from cxr_edge.bench.report import render_markdown
    from cxr_edge.cpu_isa import FLAGS_ENV

    monkeypatch.setenv(FLAGS_ENV, "avx avx2 fma")
    m = machine_info()
    assert m["isa"] == "AVX2" and m["isa_facts"]["forced"] and not m["isa_facts"]["exact_int8_dot_products"]
    assert m["cpu_flags"] == ["avx2", "fma"] and "avx512_vnni_gmacs" not in m["int8_peak"]  # bench reports the cap
    assert "ISA AVX2 (forced by CXR_EDGE_CPU_FLAGS)" in render_markdown(_res([], m)).splitlines()[2]
    monkeypatch.setenv(FLAGS_ENV, "avx2 avx512f avx512_vnni")
    m = machine_info()
    assert m["isa"] == "AVX-512 VNNI" and m["isa_facts"]["exact_int8_dot_products"] and "avx512_vnni" in m["cpu_flags"]


def _row(label, batch, ips, precision=None, provider="CPUExecutionProvider", **extra):
    backend = label.split()[0]
    precision = precision or label.split()[1].split("-")[0]
    artifact = f"model.{label.split()[1]}.onnx" if backend in ("onnxruntime", "openvino") else "model.keras"
    if backend == "openvino" and precision in ("fp32", "bf16"):
        artifact = "model.fp32.onnx"  # OpenVINO's bf16 row runs the fp32 artifact with a bf16 hint
    row = {"label": label, "backend": backend, "provider": provider, "precision": precision, "batch": batch,
           "artifact": artifact, "status": "validated", **extra}
    if ips is not None:
        row.update({"throughput_ips": ips, "p50_ms": 1e3 * batch / ips, "p90_ms": 1e3 * batch / ips})
    return row


def _res(rows, machine):
    from cxr_edge.bench.int8_payoff import int8_does_not_pay, int8_pays
    from cxr_edge.bench.runner import _summary

    return {"recipe": "tiny", "input": {"height": 32, "width": 32}, "macs_per_image": 1e9, "machine": machine,
            "rows": rows, "summary": _summary(rows, 0), "int8_does_not_pay": int8_does_not_pay(rows, machine),
            "int8_pays": int8_pays(rows, machine)}


AVX2 = {"cpu_model": "AMD EPYC", "cpu_mhz": 2400.0, "cpu_flags": ["avx2", "fma"], "usable_cores": 2, "gpu": None,
        "versions": {}, "isa": "AVX2", "isa_facts": {"isa": "AVX2", "exact_int8_dot_products": False, "forced": False}}
VNNI = {**AVX2, "isa": "AVX-512 VNNI", "isa_facts": {"isa": "AVX-512 VNNI", "exact_int8_dot_products": True}}


def _mixed_rows():
    return [
        _row("onnxruntime fp32", 1, 100.0), _row("onnxruntime fp32", 8, 200.0),
        _row("onnxruntime int8-cpu", 1, 150.0), _row("onnxruntime int8-cpu", 8, 186.0),
        _row("onnxruntime fp16", 8, 100.0),
        _row("onnxruntime int8-cpu", 32, 400.0),  # no FP32 row at batch 32
        _row("onnxruntime int8-trt", 8, 500.0, provider="CUDAExecutionProvider"),  # no FP32 row on CUDA
        _row("openvino fp32", 8, 300.0, provider="OpenVINO CPU"), _row("openvino bf16", 8, 330.0, provider="OpenVINO CPU"),
        _row("openvino int8-ov", 8, 600.0, provider="OpenVINO CPU"),
        _row("openvino int8-ov 2 streams", 8, 240.0, precision="int8", provider="OpenVINO CPU", options={"streams": 2}),
        _row("keras predict", 8, 50.0, precision="fp32", provider="keras-tensorflow"),
        _row("LiteRT int8", 8, 150.0, precision="int8", provider="CPUExecutionProvider", peer=True),
        _row("onnxruntime int8-ov", 8, None, status="could not run: no"),
    ]


def test_x_fp32_same_backend_is_per_backend_provider_and_batch():
    from cxr_edge.bench.int8_payoff import add_fp32_ratios

    rows = _mixed_rows()
    add_fp32_ratios(rows)
    got = {(r["label"], r["batch"]): r["x_fp32_same_backend"] for r in rows}
    assert got[("onnxruntime fp32", 1)] == 1.0 and got[("onnxruntime fp32", 8)] == 1.0
    assert got[("onnxruntime int8-cpu", 1)] == pytest.approx(1.5) and got[("onnxruntime int8-cpu", 8)] == pytest.approx(0.93)
    assert got[("onnxruntime fp16", 8)] == pytest.approx(0.5)
    assert got[("openvino bf16", 8)] == pytest.approx(1.1) and got[("openvino int8-ov", 8)] == pytest.approx(2.0)
    # other options (OpenVINO streams) are not the same configuration: no FP32 row to divide by
    for none in [("onnxruntime int8-cpu", 32), ("onnxruntime int8-trt", 8), ("keras predict", 8), ("LiteRT int8", 8),
                 ("onnxruntime int8-ov", 8), ("openvino int8-ov 2 streams", 8)]:
        assert got[none] is None, none


def test_int8_that_does_not_pay_is_said_plainly_and_only_then():
    from cxr_edge.bench.int8_payoff import add_fp32_ratios
    from cxr_edge.bench.report import render_markdown

    rows = _mixed_rows()
    add_fp32_ratios(rows)
    res = _res(rows, AVX2)
    slower = res["int8_does_not_pay"]
    assert [(s["label"], s["batch"]) for s in slower] == [("onnxruntime int8-cpu", 8)]
    assert slower[0]["text"] == ("INT8 does not pay on this machine (AVX2, no VNNI): onnxruntime int8-cpu at batch 8 runs "
                                 "0.93x its FP32 artifact on the same backend (186.0 vs 200.0 img/s); the FP32 artifact is "
                                 "the faster choice here (and the more accurate).")
    assert res["int8_pays"] is None  # fp16 at 0.5x, the peer and the rows without an FP32 row are not INT8 verdicts
    md = render_markdown(res)
    assert "## Does INT8 pay on this machine?" in md and slower[0]["text"] in md
    assert "| x FP32 (same backend) |" in md and "| 0.93 |" in md

    fast = [r for r in rows if (r["label"], r["batch"]) != ("onnxruntime int8-cpu", 8)]
    fast.append(_row("onnxruntime int8-cpu", 8, 200.0))  # exactly FP32's speed: not "does not pay"
    add_fp32_ratios(fast)
    res = _res(fast, VNNI)
    assert res["int8_does_not_pay"] == [] and "does not pay" not in render_markdown(res)
    assert res["int8_pays"] == ("INT8 pays on this machine (AVX-512 VNNI): every INT8 row with an FP32 row to compare "
                                "runs 1.00x to 2.00x its FP32 artifact on the same backend and batch.")
    assert res["int8_pays"] in render_markdown(res)
    res = _res([r for r in fast if not r["label"].startswith(("onnxruntime int8", "openvino int8"))], VNNI)
    assert res["int8_does_not_pay"] == [] and res["int8_pays"] is None  # no INT8 rows: nothing to say


def test_a_failed_self_check_is_measured_and_marked(tiny_export, tmp_path, monkeypatch):
    """bench opens engines with self_check="warn": an INT8 engine drifting from FP32 on this machine is still timed,
    and every row of it says so; the JSON names the (forced) ISA it ran on."""
    from cxr_edge.bench.report import write_results
    from cxr_edge.bench.runner import BenchConfig, run_bench
    from cxr_edge.cpu_isa import FLAGS_ENV
    from cxr_edge.runtime.backends.onnxruntime import OnnxRuntimeBackend

    monkeypatch.setenv(FLAGS_ENV, "avx avx2 fma")
    real = OnnxRuntimeBackend._infer

    def drift_int8(self, batch, outputs):  # kernels that round differently: probabilities pulled to the other class
        out = real(self, batch, outputs)
        if "int8-cpu" in self.artifact.name and "probs" in out:
            out["probs"] = (0.8 * out["probs"] + 0.2 * out["probs"][:, ::-1]).astype(np.float32)
        return out

    monkeypatch.setattr(OnnxRuntimeBackend, "_infer", drift_int8)
    cfg = BenchConfig(batches=(1, 2), budget_s=0.02, max_accuracy_images=16, backends=("onnxruntime",),
                      precisions=("fp32", "int8-cpu"), e2e=False, preprocessing=False)
    res = json.loads(write_results(run_bench(tiny_export.out_dir, cfg, progress=False), tmp_path).with_suffix(".json")
                     .read_text())
    assert res["machine"]["isa"] == "AVX2" and res["machine"]["isa_facts"]["forced"]
    rows = {(r["label"], r["batch"]): r for r in res["rows"]}
    for b in (1, 2):
        fp32, int8 = rows[("onnxruntime fp32", b)], rows[("onnxruntime int8-cpu", b)]
        assert fp32["self_check"]["status"] == "passed" and fp32["self_check"]["where"] == "onnxruntime/AVX2"
        assert int8["self_check"]["status"] == "failed" and int8["self_check"]["max_abs_dprob"] > int8["self_check"]["tolerance"]
        assert "p50_ms" in int8  # measured anyway
        assert fp32["x_fp32_same_backend"] == 1.0 and int8["x_fp32_same_backend"] > 0
    assert all(s["x_fp32_same_backend"] < 1.0 and "INT8 does not pay" in s["text"] for s in res["int8_does_not_pay"])
    md = (tmp_path / "results.md").read_text()
    marked = [line for line in md.splitlines() if "self-check FAILED on onnxruntime/AVX2: max |dp| " in line]
    assert marked and all("int8-cpu" in line for line in marked)
    assert "ISA AVX2" in md and "| x FP32 (same backend) |" in md
