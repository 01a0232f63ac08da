"""Peers timed in the same rounds as cxr-edge's rows, per-round ratios, OpenVINO streams, and per-machine
tuning (measured once, cached by machine fingerprint + artifact sha256, used where no backend is named)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime")


def varied_images(n: int, size: int = 32) -> np.ndarray:
    """The tiny export's input, brightness varying per image, so its outputs differ image to image."""
    rng = np.random.default_rng(n)
    x = rng.integers(0, 256, (n, size, size, 1)) * np.linspace(0.05, 1, n)[:, None, None, None]
    return x.astype(np.uint8)


# ---- per-round comparison ------------------------------------------------------------------------------

def _contender(label, kind, per_round_s, batch=4):
    from cxr_edge.bench.runner import Contender

    c = Contender(label, kind, {}, "validated", lambda x: x, lambda: None)
    c.times = {b: [np.full(5, t * (b / batch)) for t in per_round_s] for b in (1, batch)}
    return c


def test_ratios_are_taken_inside_each_round_not_across_runs():
    """A VM that slows everyone 2x in round 2 must not move the ratio; who wins each round is reported."""
    from cxr_edge.bench.runner import compare_rounds

    ours_a = _contender("ours A", "ours", [0.10, 0.20, 0.10])
    ours_b = _contender("ours B", "ours", [0.12, 0.24, 0.09])
    peer = _contender("peer", "peer", [0.11, 0.22, 0.11])
    baseline = _contender("keras", "baseline", [0.01, 0.01, 0.01])  # never part of "ours"
    cmp = compare_rounds([ours_a, ours_b, peer, baseline], (1, 4))
    t = cmp["throughput"]["4"]
    assert t["per_round"] == pytest.approx([1.1, 1.1, 0.11 / 0.09], abs=1e-3)
    assert t["median"] == pytest.approx(1.1, abs=1e-3) and t["min"] == pytest.approx(1.1, abs=1e-3)
    assert t["ours_best"] == "ours A" and t["peer_best"] == "peer"
    assert cmp["latency_p90"]["median"] > 1  # ours faster at batch 1 too
    assert cmp["rounds"] == 3


def test_no_peer_or_no_validated_row_is_said_not_divided():
    from cxr_edge.bench.runner import compare_rounds

    ours = _contender("ours", "ours", [0.1])
    assert "no peer could run" in compare_rounds([ours], (4,))["note"]
    ours.status = "ran, failed validation"
    peer = _contender("peer", "peer", [0.1])
    assert "no validated cxr-edge row" in compare_rounds([ours, peer], (4,))["note"]


# ---- bench --peers on the tiny export ------------------------------------------------------------------

def test_bench_times_peers_in_the_same_rounds(tiny_export, tmp_path):
    from cxr_edge.bench.report import write_results
    from cxr_edge.bench.runner import BenchConfig, run_bench

    cfg = BenchConfig(batches=(1, 4), budget_s=0.1, rounds=2, max_accuracy_images=32, backends=("onnxruntime",),
                      precisions=("fp32", "int8-cpu"), e2e=False, preprocessing=False,
                      peers=("onnxruntime-defaults", "litert-int8"))
    res = run_bench(tiny_export.out_dir, cfg, progress=False)
    rows = res["rows"]
    peer_rows = [r for r in rows if r.get("peer")]
    ort_default = [r for r in peer_rows if r["label"] == "onnxruntime-defaults"]
    assert [r["batch"] for r in ort_default] == [1, 4] and all(r["rounds"] == 2 for r in ort_default)
    assert all(r["throughput_min_ips"] <= r["throughput_ips"] <= r["throughput_max_ips"] for r in ort_default)
    litert = [r for r in peer_rows if r["label"] == "litert-int8"]
    assert litert and all(r["status"].startswith("could not run") for r in litert)  # the tiny export has no .keras
    assert res["accuracy"]["onnxruntime-defaults"]["peer"] is True
    cmp = res["peers"]
    assert cmp["peers"] == ["onnxruntime-defaults"] and len(cmp["throughput"]["4"]["per_round"]) == 2
    assert (tiny_export.out_dir / "peers" / "onnxruntime_defaults.onnx").is_file()  # built once, cached
    md = write_results(res, tmp_path, "cxr-edge bench --peers").read_text()
    assert "cxr-edge vs the peers" in md and "onnxruntime-defaults (peer)" in md


def test_the_peer_cache_is_rebuilt_for_another_fp32_artifact(tmp_path):
    from cxr_edge.bench.peers import _cached

    built = []

    def build(out):
        built.append(out)
        out.write_text("x")

    _cached(tmp_path, "p.onnx", "aaaa", build)
    _cached(tmp_path, "p.onnx", "aaaa", build)
    assert len(built) == 1
    _cached(tmp_path, "p.onnx", "bbbb", build)  # a re-exported model: its peers are rebuilt
    assert len(built) == 2


def test_openvino_nncf_peer_runs_both_hints(tiny_export):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from cxr_edge.bench.peers import build_peers

    calib = varied_images(24)
    engines, skipped = build_peers(tiny_export.out_dir, tiny_export.out_dir / "model.fp32.onnx", None, calib, 2,
                                   ("openvino-nncf",))
    assert not skipped and {e.label for e in engines} == {"openvino-nncf LATENCY", "openvino-nncf THROUGHPUT"}
    x = calib[:5]
    a, b = (e.infer(x) for e in engines)
    assert a.shape == b.shape == (5, 2)
    np.testing.assert_allclose(a, b, atol=1e-5)  # the batch split over requests comes back in order


# ---- OpenVINO streams ----------------------------------------------------------------------------------

def test_openvino_streams_run_no_python_on_openvino_threads_and_die_with_their_owner(tiny_export):
    """Python callbacks on OpenVINO's threads let the garbage collector run there, and an OpenVINO object it
    frees can join that thread from itself: the process aborted ("Resource deadlock avoided") in this suite.
    The stream requests are driven from the caller's thread, and go when their owner does (no cycle)."""
    pytest.importorskip("openvino")
    import gc
    import inspect
    import weakref

    from cxr_edge.bench import peers
    from cxr_edge.runtime.backends import openvino as ov_backend
    from cxr_edge.runtime.backends.registry import open_backend

    for module in (ov_backend, peers):
        src = inspect.getsource(module)
        assert "AsyncInferQueue(" not in src and "set_callback(" not in src, module.__name__
    eng = open_backend(tiny_export.out_dir / "model.int8-ov.onnx", backend="openvino", threads=2, streams=2).load()
    eng.infer(varied_images(4), ["probs"])
    (compiled,) = eng._variants.values()
    assert len(compiled.stream_requests) == 2
    ref = weakref.ref(compiled)
    del compiled
    gc.disable()
    try:
        eng.close()
        assert ref() is None  # freed by reference counting, in this thread
    finally:
        gc.enable()


def test_openvino_streams_split_a_batch_and_keep_its_order(tiny_export):
    pytest.importorskip("openvino")
    from cxr_edge.runtime.backends.registry import open_backend

    art = tiny_export.out_dir / "model.int8-cpu.onnx"
    x = varied_images(7)
    with open_backend(art, backend="openvino", threads=2).load() as one, \
            open_backend(art, backend="openvino", threads=2, streams=2).load() as two:
        assert two.info.details["streams"] == 2
        a, b = one.infer(x, ["probs"])["probs"], two.infer(x, ["probs"])["probs"]
    np.testing.assert_array_equal(a, b)
    assert len({tuple(r) for r in np.round(a, 6)}) > 1  # different images, so order matters


# ---- tuning ----------------------------------------------------------------------------------------------

@pytest.fixture
def tuning_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_EDGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_tune_measures_caches_and_is_used_where_no_backend_is_named(tiny_export, tuning_cache):
    from cxr_edge.runtime import Screener
    from cxr_edge.runtime.tuning import apply_tuning, machine_fingerprint, tune, tuned_choice

    art = tiny_export.out_dir / "model.fp32.onnx"
    assert tuned_choice(art, "batched") is None
    rec = tune(art, batch=4, budget_s=0.1, rounds=2, progress=False)
    measured = [c for c in rec["candidates"] if "single_p90_ms" in c]
    assert measured and {"single", "batched"} == set(rec["winners"])
    cache = json.loads(next((tuning_cache / "tuning").glob("*.json")).read_text())
    assert cache["machine"]["id"] == machine_fingerprint()["id"] and cache["sha256"] == rec["sha256"]
    win = rec["winners"]["batched"]
    backend, opts, note = apply_tuning(art, None, "auto", {"max_batch": 8}, "batched")
    assert backend == win["backend"] and opts["max_batch"] == 8 and "tuned" in note
    # explicit choices win over the tuning
    assert apply_tuning(art, "onnxruntime", "auto", {}, "batched") == ("onnxruntime", {}, None)
    assert apply_tuning(art, None, "auto", {"threads": 1}, "batched")[1]["threads"] == 1
    assert apply_tuning(art, None, "auto", {}, "batched", mode="off") == (None, {}, None)
    with Screener(art, batch_size=4, isolation=None) as s:
        assert s.tuned and s.engine.info.backend == win["backend"]


def test_tuning_is_keyed_by_machine_and_artifact(tiny_export, tuning_cache, monkeypatch):
    from cxr_edge.runtime import tuning

    art = tiny_export.out_dir / "model.fp32.onnx"
    tuning.tune(art, batch=2, budget_s=0.05, rounds=1, progress=False)
    assert tuning.tuned_choice(art, "single") is not None
    assert tuning.tuned_choice(tiny_export.out_dir / "model.int8-cpu.onnx", "single") is None  # another artifact
    other = {**tuning.machine_fingerprint(), "id": "another-machine"}
    monkeypatch.setattr(tuning, "machine_fingerprint", lambda: other)
    assert tuning.tuned_choice(art, "single") is None  # another CPU or runtime version: not a stale answer


def test_auto_tuning_measures_once_when_missing(tiny_export, tuning_cache, monkeypatch):
    from cxr_edge.runtime import tuning

    art = tiny_export.out_dir / "model.int8-cpu.onnx"
    calls = []
    real = tuning.tune
    monkeypatch.setattr(tuning, "tune", lambda a, **k: calls.append(a) or real(a, budget_s=0.05, rounds=1, **k))
    assert tuning.apply_tuning(art, None, "auto", {}, "single", mode="cached")[0] is None
    assert tuning.apply_tuning(art, None, "auto", {}, "single", mode="auto")[0] is not None
    assert tuning.apply_tuning(art, None, "auto", {}, "single", mode="auto")[0] is not None
    assert len(calls) == 1


def test_cli_tune_prints_the_winners(tiny_export, tuning_cache, capsys):
    from cxr_edge.cli import main

    assert main(["tune", str(tiny_export.out_dir), "--batch", "2", "--budget", "0.05", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "Fastest here, across the artifacts" in out and "model.int8-cpu.onnx" in out
    assert main(["tune", str(tiny_export.out_dir / "nothing")]) == 5  # config: names what is wrong


def test_the_service_runs_its_tuned_configuration_and_says_so(tiny_export, tuning_cache):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from cxr_edge.runtime.tuning import tune
    from cxr_edge.serve.app import ServeConfig, create_app

    art = tiny_export.out_dir / "model.int8-cpu.onnx"
    with TestClient(create_app(art, ServeConfig(decode_workers=0))) as c:  # not tuned yet: the default backend
        assert c.get("/v1/model").json()["tuned"] is None
        assert 'cxr_engine_tuning{choice="not tuned (default backend)"} 1.0' in c.get("/metrics").text
    win = tune(art, batch=4, budget_s=0.05, rounds=1, progress=False)["winners"]["batched"]
    with TestClient(create_app(art, ServeConfig(decode_workers=0))) as c:
        info = c.get("/v1/model").json()
        assert info["tuned"].startswith("batched: " + win["backend"]) and info["backend"] == win["backend"]
        assert 'cxr_engine_tuning{choice="batched: ' + win["backend"] in c.get("/metrics").text
    with TestClient(create_app(art, ServeConfig(decode_workers=0, backend="onnxruntime"))) as c:
        assert c.get("/v1/model").json()["tuned"] is None  # a named backend wins over the tuning


def test_peers_that_fail_validation_are_also_left_out_in_a_second_comparison():
    from cxr_edge.bench.runner import compare_rounds

    ours = _contender("ours", "ours", [0.10, 0.10])
    fast_wrong = _contender("fast but wrong", "peer", [0.05, 0.05])
    fast_wrong.status = "ran, failed validation"
    slow_right = _contender("slow but right", "peer", [0.20, 0.20])
    cmp = compare_rounds([ours, fast_wrong, slow_right], (1, 4))
    assert cmp["throughput"]["4"]["median"] == pytest.approx(0.5)  # against any peer
    assert cmp["validated_peers"] == ["slow but right"]
    assert cmp["vs_validated_peers"]["throughput"]["4"]["median"] == pytest.approx(2.0)
