"""Runtime: backend registry, provider truthfulness, batching with bad items, Screener, CLI predict."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import cxr_like

from cxr_edge.errors import ConfigError, ManifestError
from cxr_edge.runtime.backends import registry
from cxr_edge.runtime.backends.onnxruntime import ProviderFallbackError, requested_providers

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


def test_registry_by_format_without_importing_backends():
    assert registry.backends_for("onnx") == ["onnxruntime", "openvino"]
    assert registry.backends_for("tensorrt") == ["tensorrt"]
    assert registry.artifact_format("m.plan") == "tensorrt" and registry.artifact_format("m.keras") == "keras"
    from cxr_edge.manifest import ArtifactManifest

    onnx_doc = ArtifactManifest.from_dict({"format": "onnx", "classes": ["COVID", "Normal"],
                                           "preprocess": {"height": 16, "width": 16, "mode": "rescale"}})
    assert registry.artifact_format("m.onnx", onnx_doc) == "onnx"
    with pytest.raises(ManifestError, match="says format 'onnx'"):  # the name decides; a manifest cannot redirect it
        registry.artifact_format("m.plan", onnx_doc)
    with pytest.raises(ConfigError, match="Cannot tell the format"):
        registry.artifact_format("x.bin", onnx_doc)
    with pytest.raises(ConfigError, match="Cannot tell the format"):
        registry.artifact_format("model.pb")
    with pytest.raises(ConfigError, match="Backend 'tensorrt' cannot run 'onnx'"):
        registry.backend_class("onnx", "tensorrt")
    assert "tensorrt" not in sys.modules


def test_provider_selection():
    assert requested_providers("auto", None, [TRT, CUDA, CPU]) == [TRT, CUDA, CPU]
    assert requested_providers("auto", None, [CPU]) == [CPU]
    assert requested_providers("cpu", None, [CUDA, CPU]) == [CPU]
    assert requested_providers("auto", ["cuda", "cpu"], [TRT, CUDA, CPU]) == [CUDA, CPU]
    with pytest.raises(ProviderFallbackError, match=r"Requested: .*TensorrtExecutionProvider.*available: \['CPUExecutionProvider'\]"):
        requested_providers("cuda", None, [CPU])
    with pytest.raises(ConfigError, match="Unknown device 'tpu'"):
        requested_providers("tpu", None, [CPU])


def test_silent_cpu_fallback_is_detected(tiny_export, monkeypatch):
    """onnxruntime-gpu without CUDA libraries lists CUDA but runs on CPU: we must notice."""
    import onnxruntime as ort

    s = tiny_export
    real = ort.InferenceSession

    class FakeGpuSession(real):  # accepts the CUDA request, then reports CPU, as the real fallback does
        def __init__(self, path, so=None, providers=None, provider_options=None):
            super().__init__(path, so, providers=[CPU])

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(ort, "InferenceSession", FakeGpuSession)
    b = registry.open_backend(s.artifacts[0].path, device="auto").load()
    assert b.info.provider == CPU and b.info.device == "cpu" and b.info.details["requested"] == [CUDA, CPU]
    with pytest.raises(ProviderFallbackError, match="fell back to CPUExecutionProvider"):
        registry.open_backend(s.artifacts[0].path, device="cuda").load()


def test_backend_checks_inputs_and_is_a_context_manager(tiny_export):
    s = tiny_export
    with registry.open_backend(s.artifacts[0].path) as b:
        assert b.info.backend == "onnxruntime" and b.info.precision == "fp32"
        out = b.infer(np.zeros((2, 32, 32, 1), np.uint8))
        assert out["probs"].shape == (2, 2) and out["features"].shape[0] == 2
        with pytest.raises(ConfigError, match=r"Received incompatible input: float32 \(2, 32, 32, 1\)"):
            b.infer(np.zeros((2, 32, 32, 1), np.float32))
        with pytest.raises(ConfigError, match=r"Expected uint8 with a shape compatible with: \(None, 32, 32, 1\)"):
            b.infer(np.zeros((2, 64, 64, 1), np.uint8))
        with pytest.raises(ConfigError, match="not produced"):
            b.infer(np.zeros((1, 32, 32, 1), np.uint8), ["logits"])
    with pytest.raises(ZeroDivisionError), registry.open_backend(s.artifacts[0].path):  # never swallowed
        _ = 1 / 0


def test_screener_answers_good_items_and_reports_bad_ones(tiny_export, tmp_path):
    from cxr_edge.runtime import Screener

    s, data = tiny_export, tiny_export.data
    good = sorted((data / "COVID").iterdir())[:5] + sorted((data / "Normal").iterdir())[:5]
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good[0].read_bytes()[:100])
    items = [good[0], b"not an image", trunc, cxr_like(64, 64), *good[1:], tmp_path / "missing.png", np.zeros((3, 3))]
    with Screener(s.artifacts[0].path, batch_size=4) as scr:
        res = scr.predict(items)
    assert [r.index for r in res] == list(range(len(items)))
    bad = {r.index: r.error for r in res if not r.ok}
    assert set(bad) == {1, 2, len(items) - 2, len(items) - 1}
    assert "not a recognised image" in bad[1] and "truncated" in bad[2] and "does not exist" in bad[len(items) - 2]
    ok = [r for r in res if r.ok]
    assert len(ok) == 11 and all(abs(sum(r.probabilities.values()) - 1) < 1e-4 for r in ok)
    assert all(r.backend == "onnxruntime" and r.provider == CPU and r.precision == "fp32" for r in ok)
    assert all(r.threshold == 0.5 for r in ok)  # the manifest's operating point, not a default
    for r in ok:  # the decision rule: COVID exactly when its probability reaches the threshold
        assert (r.label == "COVID") == (r.probabilities["COVID"] >= r.threshold)


@pytest.mark.train
def test_a_trained_model_calls_most_synthetic_covid_images_covid(exported):
    from cxr_edge.runtime import Screener

    _, s, data = exported
    with Screener(s.artifacts[0].path) as scr:
        labels = [r.label for r in scr.predict(sorted((data / "COVID").iterdir())[:5])]
    assert labels.count("COVID") >= 3


def test_batches_are_the_same_whatever_the_batch_size(tiny_export):
    from cxr_edge.runtime import Screener

    s, data = tiny_export, tiny_export.data
    items = sorted((data / "COVID").iterdir())[:7]
    with Screener(s.artifacts[0].path, batch_size=1) as a, Screener(s.artifacts[0].path, batch_size=3) as b:
        pa, pb = a.predict(items), b.predict(items)
    assert all(np.allclose(list(x.probabilities.values()), list(y.probabilities.values()), atol=1e-6) for x, y in zip(pa, pb))


def test_each_int8_flavour_opens_on_the_runtime_it_was_made_for(tiny_export):
    """int8-ov opens on OpenVINO when no backend is named (ONNX Runtime leaves its mixed S8/U8 element-wise
    ops unfused); the other artifacts on ONNX Runtime; a named backend always wins."""
    import importlib.util

    from cxr_edge.runtime.backends.registry import open_backend

    arts = {a.variant: a.path for a in tiny_export.artifacts}
    have_ov = importlib.util.find_spec("openvino") is not None
    assert type(open_backend(arts["int8-ov"])).__name__ == ("OpenVINOBackend" if have_ov else "OnnxRuntimeBackend")
    assert type(open_backend(arts["int8-cpu"])).__name__ == "OnnxRuntimeBackend"
    assert type(open_backend(arts["int8-ov"], backend="onnxruntime")).__name__ == "OnnxRuntimeBackend"


@pytest.mark.parametrize("variant", ["fp32", "fp16", "int8-cpu", "int8-ov"])
def test_predict_cli_with_explanations(tiny_export, tmp_path, variant):
    s, data = tiny_export, tiny_export.data
    art = next(a.path for a in s.artifacts if a.variant == variant)
    imgs = [str(p) for p in sorted((data / "COVID").iterdir())[:2]] + [str(data / "SOURCES.csv")]
    out = subprocess.run([sys.executable, "-m", "cxr_edge.cli", "predict", str(art), *imgs, "--explain", "--json",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 3, out.stderr[-2000:]  # one bad item -> exit 3, others answered
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["ok"] for r in rows] == [True, True, False]
    assert rows[0]["explanation"]["method"] == "engine-native"
    png = tmp_path / (rows[0]["explanation"]["files"]["overlay"].split("/")[-1])
    assert png.is_file() and png.stat().st_size > 1000
    cam = np.load(rows[0]["explanation"]["files"]["raw"])
    assert cam.ndim == 2 and cam.max() >= 0
    assert json.loads((tmp_path / "predictions.json").read_text())[2]["error"].startswith("not a recognised image")


def test_openvino_backend_names_its_precision_truthfully(tiny_export):
    pytest.importorskip("openvino")
    from cxr_edge.runtime import Screener

    s, data = tiny_export, tiny_export.data
    items = sorted((data / "COVID").iterdir())[:4]
    with Screener(s.artifacts[0].path) as ref:
        base = np.array([list(r.probabilities.values()) for r in ref.predict(items)])
    import openvino as ov_module

    has_bf16 = "BF16" in ov_module.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if not has_bf16:  # the truthful answer on a CPU without bf16 (AVX2, Zen 3) is a refusal, not a silent f32
        with pytest.raises(ConfigError, match="no bf16 support; use precision fp32"):
            Screener(s.artifacts[0].path, backend="openvino", precision="bf16")
    for prec in ("fp32", "bf16") if has_bf16 else ("fp32",):
        with Screener(s.artifacts[0].path, backend="openvino", precision=prec) as ov:
            res = ov.predict(items)
            assert ov.engine.info.precision == prec
            assert ov.engine.info.details["inference_precision_hint"] == {"fp32": "f32", "bf16": "bf16"}[prec]
        got = np.array([list(r.probabilities.values()) for r in res])
        assert np.abs(got - base).max() <= (1e-4 if prec == "fp32" else 2e-2)


def test_predict_text_output_cannot_be_forged_and_special_files_are_reported(tiny_export, tmp_path):
    """Issue 13: a newline in a file name must not print a result line of its own; FIFOs and links to
    devices in a directory get an error line each instead of vanishing."""
    import os
    import shutil

    art = next(a.path for a in tiny_export.artifacts if a.variant == "fp32")
    src = sorted((tiny_export.data / "COVID").iterdir())[0]
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(src, d / "a.png")
    forged = d / "x.png\nCOVID            COVID 0.000  Normal 1.000  (0.1 ms)  forged.png"
    shutil.copy(src, forged)
    os.mkfifo(d / "pipe.png")
    os.symlink("/dev/zero", d / "zero.png")
    out = subprocess.run([sys.executable, "-m", "cxr_edge.cli", "predict", str(art), str(d)],
                         capture_output=True, text=True, timeout=300)
    lines = [line for line in out.stdout.splitlines() if not line.startswith("#")]  # less the header
    assert out.returncode == 3, out.stderr[-2000:]
    assert len(lines) == 4, lines  # one line per entry
    assert not any(line.startswith("COVID") and line.endswith("forged.png") for line in lines)
    assert any("\\n" in line for line in lines)  # the newline is shown escaped
    errors = [line for line in lines if line.startswith("ERROR")]
    assert len(errors) == 2 and all("not a regular file" in e for e in errors), errors


def test_a_misspelt_backend_option_is_a_usage_error_naming_the_valid_ones(tiny_export):
    """``Screener(a, thread=2)`` used to be silently ignored: the engine ran with its default threads."""
    from cxr_edge.errors import ConfigError
    from cxr_edge.runtime import Screener
    from cxr_edge.runtime.backends.registry import open_backend

    art = next(a.path for a in tiny_export.artifacts if a.variant == "fp32")
    with pytest.raises(ConfigError, match=r"onnxruntime backend has no option 'thread'; valid: .*threads"):
        Screener(art, device="cpu", thread=2)
    with pytest.raises(ConfigError, match="'ov_device'"):
        open_backend(art, backend="onnxruntime", ov_device="GPU")
    eng = open_backend(art, backend="onnxruntime", device="cpu", threads=1, cuda_graph=False).load()  # common: fine
    eng.close()
