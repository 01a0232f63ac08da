"""MLPerf LoadGen (mlcommons-loadgen) driving the tiny artifacts: every scenario runs and its summary is read back,
accuracy mode is scored from LoadGen's own accuracy log, the HTTP service is driven over loopback, an impossible
latency bound is reported INVALID, and a missing LoadGen names the extra. Shortened settings; no timing asserts."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("mlperf_loadgen")

from cxr_edge.bench.loadgen import LoadgenConfig, run_loadgen
from cxr_edge.bench.loadgen_settings import RunSettings, parse_summary

#: LoadGen's own files in every run's folder
LOADGEN_LOGS = ("mlperf_log_summary.txt", "mlperf_log_detail.txt", "mlperf_log_accuracy.json")
QUICK = RunSettings(duration_s=0.2)


@pytest.fixture(scope="module")
def tiny(tiny_export):
    art = next(a.path for a in tiny_export.artifacts if a.variant == "int8-cpu")
    return art, tiny_export.data


def _main(argv):
    """The CLI with the loadgen group registered (whether or not cxr_edge.cli lists it yet)."""
    from cxr_edge import cli
    from cxr_edge.cli import loadgen_commands

    groups = cli.GROUPS if loadgen_commands in cli.GROUPS else (*cli.GROUPS, loadgen_commands)
    saved, cli.GROUPS = cli.GROUPS, groups
    try:
        return cli.main(argv)
    finally:
        cli.GROUPS = saved


def _direct_answers(art, data):
    """The engine's answers and the labels on the samples LoadGen draws from (the test split), computed plainly."""
    from cxr_edge.bench.loadgen_qsl import SampleLibrary, sample_source
    from cxr_edge.manifest import read_manifest
    from cxr_edge.runtime.backends.registry import open_backend

    source = sample_source(read_manifest(art, verify=False), data)
    lib = SampleLibrary(source, "tensor")
    idx = list(range(len(source)))
    lib.load(idx)
    with open_backend(art).load() as eng:
        probs = eng.infer_all(lib.tensors(idx), 8)
    with open_backend(art.parent / "model.fp32.onnx").load() as eng:
        ref = eng.infer_all(lib.tensors(idx), 8)
    return probs, ref, source.labels


def test_every_scenario_runs_under_loadgen_and_its_summary_is_read_back(tiny, tmp_path):
    art, data = tiny
    out = tmp_path / "lg"
    assert _main(["loadgen", str(art), "--data", str(data), "--duration", "0.2", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    rows = res["rows"]
    assert [r["scenario"] for r in rows] == ["SingleStream", "MultiStream", "Server", "Offline"]
    for r in rows:
        s = r["summary"]
        assert s["scenario"] == r["scenario"] and s["mode"] == "PerformanceOnly"
        assert s["result"] in ("VALID", "INVALID") and r["verdict"].startswith(s["result"])
        assert s["value"] > 0 and s["unit"] == ("ms" if "Stream" in r["scenario"] else "samples/s")
        assert r["failed_samples"] == 0 and not r["settings"]["official_minimums"]
        assert all((out / r["logs"] / f).is_file() for f in LOADGEN_LOGS)
        assert (out / r["logs"] / "mlperf_log_summary.txt").read_text().count("Result is") == 1
    assert rows[1]["summary"]["samples_per_query"] == 8  # MultiStream: LoadGen's N samples per query, one batch
    assert sum(int(n) * k for n, k in rows[2]["batch_sizes"].items()) >= rows[2]["settings"]["min_query_count"]
    md = (out / "results.md").read_text()
    assert "not comparable as an official MLPerf submission" in md and "| Offline | direct |" in md
    assert (out / "loadgen.png").stat().st_size > 0
    # a second run into the same folder is refused without --force (its LoadGen logs would be mixed in)
    assert _main(["loadgen", str(art), "--scenario", "offline", "--out", str(out)]) == 5


def test_accuracy_mode_is_scored_from_loadgens_accuracy_log(tiny, tmp_path):
    art, data = tiny
    cfg = LoadgenConfig(scenarios=("single-stream", "offline"), mode="accuracy", data=str(data), run=QUICK)
    res = run_loadgen(art, cfg, tmp_path)
    probs, ref, labels = _direct_answers(art, data)
    for r in res["rows"]:
        a = r["accuracy"]
        assert r["mode"] == "AccuracyOnly" and a["samples"] == a["answered"] == len(labels) and a["failed"] == 0
        assert a["top1_accuracy"] == pytest.approx(float((probs.argmax(1) == labels).mean()))
        assert a["top1_agreement_vs_fp32"] == pytest.approx(float((probs.argmax(1) == ref.argmax(1)).mean()))
        logged = json.loads((tmp_path / r["logs"] / "mlperf_log_accuracy.json").read_text())
        first = np.frombuffer(bytes.fromhex(logged[0]["data"]), np.float32)
        assert np.allclose(first, probs[logged[0]["qsl_idx"]], atol=1e-6)  # the response is the probabilities


def test_an_impossible_server_latency_bound_is_reported_invalid(tiny, tmp_path):
    art, _ = tiny
    run = RunSettings(duration_s=0.1, server_latency_ms=0.001, max_query_count=200)
    res = run_loadgen(art, LoadgenConfig(scenarios=("server",), run=run), tmp_path)
    (r,) = res["rows"]
    assert r["summary"]["result"] == "INVALID" and r["verdict"] == "INVALID"
    assert r["summary"]["checks"]["Performance constraints satisfied"] is False
    from cxr_edge.bench.loadgen_report import render_markdown

    assert "| INVALID |" in render_markdown(res)


def test_find_peak_runs_loadgens_own_server_search(tiny, tmp_path):
    art, _ = tiny
    run = RunSettings(duration_s=0.1, find_peak=True, server_qps=500, max_query_count=100)
    (r,) = run_loadgen(art, LoadgenConfig(scenarios=("server",), run=run), tmp_path)["rows"]
    assert r["summary"]["mode"] == "FindPeakPerformance" and r["summary"]["value"] > 0
    assert "FindPeakPerformance" in r["settings"]["changed_from_rules"]["mode"]


def test_server_scenario_drives_the_http_service_over_loopback(tiny, tmp_path):
    """The whole service, decode included: every sample's PNG is POSTed, every answer is the engine's."""
    art, data = tiny
    run = RunSettings(duration_s=0.2, server_qps=200, max_query_count=200)
    cfg = LoadgenConfig(scenarios=("server",), mode="both", target="serve", data=str(data), concurrency=8, run=run,
                        service_args=("--decode-workers", "0"))
    res = run_loadgen(art, cfg, tmp_path)
    acc, perf = res["rows"]
    assert res["system"]["started_here"] and perf["summary"]["scenario"] == "Server"
    assert perf["failed_samples"] == 0 and perf["summary"]["value"] > 0
    probs, _, labels = _direct_answers(art, data)
    assert acc["accuracy"]["answered"] == len(labels) and acc["accuracy"]["failed"] == 0
    assert acc["accuracy"]["top1_accuracy"] == pytest.approx(float((probs.argmax(1) == labels).mean()))
    assert acc["accuracy"]["max_abs_dprob_vs_fp32"] is not None


def test_the_dicom_node_is_driven_by_c_store_and_answers_from_its_job_list(tiny, tmp_path):
    """Each sample a DX instance with fresh UIDs; answered when GET /v1/jobs shows it screened, with its probabilities."""
    pytest.importorskip("pynetdicom")
    from cxr_edge.bench.loadgen_qsl import SampleLibrary, sample_source
    from cxr_edge.manifest import read_manifest
    from cxr_edge.runtime.backends.registry import open_backend

    art, data = tiny
    run = RunSettings(duration_s=0.2, max_query_count=16)
    cfg = LoadgenConfig(scenarios=("single-stream",), mode="both", target="node", data=str(data), concurrency=2, run=run,
                        service_args=("--decode-workers", "0"))
    res = run_loadgen(art, cfg, tmp_path)
    acc, perf = res["rows"]
    assert perf["failed_samples"] == 0 and perf["summary"]["scenario"] == "SingleStream" and perf["summary"]["value"] > 0
    source = sample_source(read_manifest(art, verify=False), data)
    x = SampleLibrary(source, "dicom").reference_tensors(range(len(source)))
    with open_backend(art).load() as eng:
        sent = eng.infer_all(x, 8)  # the engine on exactly the pixels the instances carried
    assert acc["accuracy"]["answered"] == len(source) and acc["accuracy"]["failed"] == 0
    assert acc["accuracy"]["top1_accuracy"] == pytest.approx(float((sent.argmax(1) == source.labels).mean()))


def test_the_summary_parser_reads_loadgens_lines():
    text = ("Scenario : Offline\nMode     : PerformanceOnly\nSamples per second: 1661.39\nResult is : INVALID\n"
            "  Min duration satisfied : NO\n  Min queries satisfied : Yes\nRecommendations:\n"
            " * Increase expected QPS so the loadgen pre-generates a larger (coalesced) query.\n"
            "90.00 percentile latency (ns)   : 662098062\n")
    s = parse_summary(text)
    assert (s["scenario"], s["result"], s["metric"], s["value"]) == ("Offline", "INVALID", "samples per second", 1661.39)
    assert s["checks"] == {"Min duration satisfied": False, "Min queries satisfied": True}
    assert s["latency_ms"]["p90"] == pytest.approx(662.098062) and "Increase expected QPS" in s["notes"][0]


def test_a_missing_loadgen_names_the_extra(monkeypatch):
    import sys

    from cxr_edge.bench.loadgen import require_loadgen
    from cxr_edge.errors import MissingExtraError

    monkeypatch.setitem(sys.modules, "mlperf_loadgen", None)
    with pytest.raises(MissingExtraError, match=r"cxr-edge\[loadgen\]"):
        require_loadgen()
