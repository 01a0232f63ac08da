"""The GPU preprocessing path's logic, run on the CPU with NumPy as its array module (the GPU kit runs the
same code with CuPy): same per-item errors, same inputs within one grey level, CPU fallback, path reported."""

import numpy as np
import pytest

from cxr_edge.preprocess import PreprocessSpec


def _items(data):
    good = sorted((data / "COVID").iterdir())[:5] + sorted((data / "Normal").iterdir())[:4]
    return good[:3] + [b"not an image"] + good[3:]


def test_gpu_packer_matches_the_cpu_packer_with_numpy(tiny_export):
    from cxr_edge.runtime.batching import BatchPacker
    from cxr_edge.runtime.gpu_preprocess import GpuBatchPacker

    spec = PreprocessSpec(32, 32, "rescale", input_channels=1, model_channels=1)
    items = _items(tiny_export.data)
    cpu, gpu = BatchPacker(spec, 4), GpuBatchPacker(spec, 4, xp=np)
    try:
        a, b = list(cpu.iter_batches(items)), list(gpu.iter_batches(items))
    finally:
        cpu.close()
        gpu.close()
    assert [p.indices for p in a] == [p.indices for p in b]
    assert [sorted(p.errors) for p in a] == [sorted(p.errors) for p in b] == [[3], [], []]
    for p, q in zip(a, b):
        d = np.abs(p.x.astype(int) - q.x.astype(int))
        assert d.max() <= 1 and (d == 0).mean() > 0.99
    assert gpu.path == "gpu" and cpu.path == "cpu"


def test_screener_reports_the_path_and_falls_back_to_the_cpu(tiny_export, monkeypatch, caplog):
    from cxr_edge.runtime import Screener, gpu_preprocess, screener

    art = next(a.path for a in tiny_export.artifacts if a.variant == "fp32")
    items = _items(tiny_export.data)
    with Screener(art, isolation=None, preprocess="cpu") as s:
        ref = s.predict(items)
    assert {r.preprocess for r in ref if r.ok} == {"cpu"}
    monkeypatch.setattr(screener, "choose_preprocess", lambda requested, engine: ("gpu", "test"))
    orig = gpu_preprocess.GpuBatchPacker.__init__
    monkeypatch.setattr(gpu_preprocess.GpuBatchPacker, "__init__",
                        lambda self, *a, **k: orig(self, *a, **{**k, "xp": np}))
    with Screener(art, isolation=None, batch_size=4) as s:
        got = s.predict(items)
    assert [r.ok for r in got] == [r.ok for r in ref] and {r.preprocess for r in got if r.ok} == {"gpu"}
    for r, g in zip(ref, got):
        if r.ok:
            assert max(abs(r.probabilities[c] - g.probabilities[c]) for c in r.probabilities) < 0.02
    calls = {"n": 0}

    def broken(self, buf, n, packed):  # the device fails on the second batch
        calls["n"] += 1
        if calls["n"] > 4:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        buf[n] = packed if packed.shape[:2] == (32, 32) else np.zeros((32, 32, 1), np.uint8)

    monkeypatch.setattr(gpu_preprocess.GpuBatchPacker, "_place", broken)
    with Screener(art, isolation=None, batch_size=4) as s:
        mixed = s.predict(items)
    assert all(r is not None for r in mixed) and [r.ok for r in mixed] == [r.ok for r in ref]
    assert "cpu" in {r.preprocess for r in mixed if r.ok}
    assert "GPU preprocessing failed" in caplog.text


def test_auto_stays_on_the_cpu_for_a_cpu_engine_and_gpu_says_why_it_cannot(tiny_export):
    from cxr_edge.errors import ConfigError
    from cxr_edge.runtime import Screener

    art = next(a.path for a in tiny_export.artifacts if a.variant == "fp32")
    with Screener(art, isolation=None) as s:
        assert s.preprocess == "cpu" and "CPU" in s.preprocess_note
    try:
        import cupy  # noqa: F401

        pytest.skip("CuPy is installed: preprocess='gpu' may work here (the GPU kit tests it)")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match="GPU preprocessing was asked for"):
        Screener(art, isolation=None, preprocess="gpu")


def test_bench_has_preprocessing_rows_for_each_path():
    from cxr_edge.bench.preprocess_bench import measure_preprocessing
    from cxr_edge.bench.report import render_markdown

    rows = measure_preprocessing([], PreprocessSpec(64, 64, "rescale"), budget_s=0.05)
    assert [r["path"] for r in rows] == ["cpu", "cpu", "gpu"]
    assert rows[0]["status"] == "ran" and rows[0]["ms_per_megapixel"] > 0 and rows[0]["mean_megapixels"] == 3.2
    assert rows[2]["status"].startswith("could not run") or rows[2]["status"] == "ran"
    md = render_markdown({"machine": {"cpu_model": "x", "usable_cores": 2, "cpu_mhz": 1, "cpu_flags": [], "gpu": None,
                                      "versions": {}}, "recipe": "r", "input": {"height": 64, "width": 64},
                          "macs_per_image": 1e9, "rows": [], "summary": {}, "accuracy": {}, "preprocessing": rows})
    assert "## Preprocessing" in md and "CuPy area_resize" in md
