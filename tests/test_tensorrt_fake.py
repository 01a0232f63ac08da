"""build_engine and TensorRTBackend end to end on a CPU, through fakes shaped like TensorRT 10 and 11.

The fakes (tests/fake_gpu.py) expose only names the real bindings have, with their real kinds
(test_tensorrt_api.py), keep the state a GPU keeps (devices per thread, context shapes captured into CUDA
graphs: test_tensorrt_state.py) and run the engine as ONNX Runtime over their fake device memory, so these
tests check call order, return value handling, precision flags, the post-build gate, and the numbers that
come back.
"""

import json
import os

import fake_gpu
import numpy as np
import pytest
import tiny_models as tiny

from cxr_edge.errors import ConfigError, EngineError, ManifestError
from cxr_edge.export.tensorrt_build import BuildConfig, EngineGateError, build_engine
from cxr_edge.manifest import manifest_path, read_manifest
from cxr_edge.manifest_schema import GateRecord
from cxr_edge.runtime.backends.ort_session import cpu_session, run_batched
from cxr_edge.runtime.backends.registry import open_backend


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    for p in ("fp32", "fp16", "int8-trt", "int8-cpu"):
        tiny.write_artifact(d, p)
    return d


def _copy(artifacts, tmp_path, *names):
    for n in names:
        for f in (artifacts / n, manifest_path(artifacts / n)):
            (tmp_path / f.name).write_bytes(f.read_bytes())
    return tmp_path


def _reference(path, x):
    """What TensorRT computes for the artifact: QDQ graphs in TensorRT numerics, whatever this CPU's INT8 kernels do."""
    return run_batched(cpu_session(path, numerics="tensorrt"), x, ["probs"])["probs"]


@pytest.mark.parametrize("major, source, precision, flags_set, network_flags", [
    (10, "fp32", "fp32", [], 0),
    (10, "fp32", "fp16", ["FP16"], 0),
    (10, "int8-trt", "int8", ["FP16", "INT8"], 0),
    (11, "fp32", "fp32", [], 1),
    (11, "fp16", "fp16", [], 1),
    (11, "int8-trt", "int8", [], 1),
])
def test_build_and_run_each_precision(monkeypatch, artifacts, tmp_path, major, source, precision, flags_set,
                                      network_flags):
    trt, cudart = fake_gpu.install(monkeypatch, major)
    d = _copy(artifacts, tmp_path, "model.fp32.onnx", f"model.{source}.onnx")
    plan = build_engine(d / f"model.{source}.onnx", BuildConfig(precision, 1, 4, 8))
    assert sorted(set(trt.fake_log["flags_set"])) == flags_set
    assert trt.fake_log["flags_cleared"] == ["TF32"]  # TF32 off unless --allow-tf32
    assert trt.fake_log["network_flags"] == network_flags  # 11: STRONGLY_TYPED
    doc = read_manifest(plan)
    assert doc.precision.value == precision and doc.tensorrt.major == major and doc.tf32 is False
    assert doc.tensorrt_typing == ("strongly typed only" if major == 11 else "weakly typed (builder flags)")
    assert doc.gate.name == f"engine-{precision}" and doc.gate.passed is True
    assert doc.source_gate == GateRecord(passed=True) and doc.device.gpu_name == "NVIDIA Fake GPU"
    assert (d / f"{plan.name}.timing.cache").is_file()
    x = tiny.images(13)
    for graph in (False, True):
        with open_backend(plan, cuda_graph=graph) as eng:
            assert eng.info.device == "cuda" and eng.info.details["cuda_graph"] is graph
            out = eng.infer(x)["probs"]  # 13 > max 8: two chunks; 5 pads to nothing (min 1)
        np.testing.assert_allclose(out, _reference(d / f"model.{source}.onnx", x), atol=1e-6)
    assert not cudart.violations, cudart.violations
    assert not cudart.device and not cudart.pinned and not cudart.streams  # everything freed on close
    assert not cudart.graphs and not cudart.execs


def test_cuda_graphs_are_thread_local_replayed_and_destroyed(monkeypatch, artifacts, tmp_path):
    trt, cudart = fake_gpu.install(monkeypatch, 10)
    d = _copy(artifacts, tmp_path, "model.fp32.onnx")
    plan = build_engine(d / "model.fp32.onnx", BuildConfig("fp32", 1, 4, 8))
    x = tiny.images(8)
    ref = _reference(d / "model.fp32.onnx", x)
    with open_backend(plan, cuda_graph=True) as eng:
        for b in (1, 3, 8, 3, 1):  # 3 sizes captured once each, replayed afterwards
            np.testing.assert_allclose(eng.infer(x[:b])["probs"], ref[:b], atol=1e-6)
        assert len(cudart.execs) == 3
        assert cudart.calls.count("cudaGraphLaunch") == 5
    assert set(cudart.capture_modes) == {fake_gpu.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal}
    assert not cudart.execs and not cudart.graphs and not cudart.violations


def test_minimum_batch_above_one_is_padded_and_sliced(monkeypatch, artifacts, tmp_path):
    fake_gpu.install(monkeypatch, 11)
    d = _copy(artifacts, tmp_path, "model.fp32.onnx")
    plan = build_engine(d / "model.fp32.onnx", BuildConfig("fp32", 4, 4, 4))
    x = tiny.images(6)
    with open_backend(plan) as eng:
        assert eng.batch_range() == (4, 4) and eng.fit_note(1) == "padded to the engine's minimum batch 4"
        one = eng.infer(x[:1])["probs"]
        six = eng.infer(x)["probs"]  # 4 + (2 padded to 4)
    ref = _reference(d / "model.fp32.onnx", x)
    assert one.shape == (1, 2) and six.shape == (6, 2)
    np.testing.assert_allclose(six, ref, atol=1e-6)


def test_screener_runs_single_images_on_a_min_batch_engine(monkeypatch, artifacts, tmp_path):
    import cv2

    from cxr_edge.runtime import Screener

    fake_gpu.install(monkeypatch, 10)
    d = _copy(artifacts, tmp_path, "model.fp32.onnx")
    plan = build_engine(d / "model.fp32.onnx", BuildConfig("fp32", 2, 2, 2))
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), (np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64))
    with Screener(plan, batch_size=1) as s:
        [r] = s.predict([img])
    assert r.ok and abs(sum(r.probabilities.values()) - 1) < 1e-5


def test_trt11_refuses_fp16_from_the_fp32_graph(monkeypatch, artifacts, tmp_path):
    trt, _ = fake_gpu.install(monkeypatch, 11)
    d = _copy(artifacts, tmp_path, "model.fp32.onnx")
    with pytest.raises(ConfigError, match="strongly typed networks only"):
        build_engine(d / "model.fp32.onnx", BuildConfig("fp16"))
    assert trt.fake_log["builds"] == 0


def test_trt10_refuses_to_call_a_slow_gpu_fp16(monkeypatch, artifacts, tmp_path):
    fake_gpu.install(monkeypatch, 10, fast_fp16=False)
    d = _copy(artifacts, tmp_path, "model.fp32.onnx")
    with pytest.raises(ConfigError, match="no fast FP16"):
        build_engine(d / "model.fp32.onnx", BuildConfig("fp16"))


def test_tensorrt_8_is_refused_with_what_to_upgrade(monkeypatch, artifacts, tmp_path):
    fake_gpu.install(monkeypatch, 10, version="8.6.2")
    d = _copy(artifacts, tmp_path, "model.fp32.onnx")
    with pytest.raises(ConfigError, match="JetPack 6.1"):
        build_engine(d / "model.fp32.onnx", BuildConfig("fp32"))


def test_int32_bias_qdq_graph_is_refused_before_building(monkeypatch, artifacts, tmp_path):
    """The old export (QuantizeBias on) made graphs TensorRT's parser rejects; the lint says so first."""
    import onnx
    from onnx import helper, numpy_helper

    trt, _ = fake_gpu.install(monkeypatch, 10)
    d = _copy(artifacts, tmp_path, "model.fp32.onnx", "model.int8-trt.onnx")
    path = d / "model.int8-trt.onnx"
    m = onnx.load(str(path))
    conv = next(n for n in m.graph.node if n.op_type == "Conv")
    bias = next(t for t in m.graph.initializer if t.name == conv.input[2])
    q = np.round(numpy_helper.to_array(bias) / 1e-4).astype(np.int32)
    m.graph.initializer.extend([numpy_helper.from_array(q, "b_q"), numpy_helper.from_array(np.array(1e-4, np.float32), "b_s")])
    m.graph.node.insert(0, helper.make_node("DequantizeLinear", ["b_q", "b_s"], ["b_dq"], name="bias_dq"))
    conv.input[2] = "b_dq"
    onnx.save(m, str(path))
    from cxr_edge.manifest import write_manifest

    write_manifest(path, {k: v for k, v in json.loads(manifest_path(path).read_text()).items()
                          if k not in ("sha256", "size_bytes", "file", "created", "versions", "schema_version")})
    with pytest.raises(ConfigError, match=r"int32-bias-dq\] bias_dq"):
        build_engine(path, BuildConfig("int8"))
    assert trt.fake_log["builds"] == 0


def test_foreign_timing_cache_is_replaced_with_a_warning(monkeypatch, artifacts, tmp_path, caplog):
    fake_gpu.install(monkeypatch, 10)
    d = _copy(artifacts, tmp_path, "model.fp32.onnx")
    cache = tmp_path / "shared.cache"
    cache.write_text(json.dumps({"device": "NVIDIA Other GPU", "version": "10.3.0"}))
    plan = build_engine(d / "model.fp32.onnx", BuildConfig("fp32", timing_cache=str(cache)))
    assert "another GPU or TensorRT version" in caplog.text
    assert json.loads(cache.read_text())["device"] == "NVIDIA Fake GPU"  # rewritten for this GPU
    assert read_manifest(plan).precision.value == "fp32"


def test_failed_engine_gate_leaves_no_plan_and_no_manifest(monkeypatch, artifacts, tmp_path):
    """An engine whose outputs differ from the FP32 ONNX is not kept; nothing half-written stays behind."""
    trt, cudart = fake_gpu.install(monkeypatch, 10)
    d = _copy(artifacts, tmp_path, "model.fp32.onnx")
    original = trt.IExecutionContext.execute_async_v3

    def wrong(self, stream):  # a miscompiled engine: right shapes, wrong numbers
        ok = original(self, stream)
        for name in self.engine._outputs:
            mem = cudart.device[self._addresses[name]]
            mem[:] = np.roll(mem, 4)
        return ok

    monkeypatch.setattr(trt.IExecutionContext, "execute_async_v3", wrong)
    with pytest.raises(EngineGateError, match="failed its gate"):
        build_engine(d / "model.fp32.onnx", BuildConfig("fp32"))
    assert sorted(p.name for p in d.iterdir() if ".plan" in p.name and "timing" not in p.name) == []
    plan = build_engine(d / "model.fp32.onnx", BuildConfig("fp32", force=True))
    doc = read_manifest(plan)
    assert doc.gate.passed is False and doc.gate_status.startswith("FAILED")


def test_plan_is_never_left_without_its_manifest(monkeypatch, artifacts, tmp_path):
    fake_gpu.install(monkeypatch, 10)
    d = _copy(artifacts, tmp_path, "model.fp32.onnx")
    import cxr_edge.export.tensorrt_build as tb

    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith(".manifest.json"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(tb.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        build_engine(d / "model.fp32.onnx", BuildConfig("fp32", gate=False))
    assert not any(p.name.endswith(".plan") or p.name.endswith(".tmp") for p in d.iterdir())


def test_engine_from_another_gpu_says_how_to_rebuild(monkeypatch, artifacts, tmp_path):
    fake_gpu.install(monkeypatch, 10)
    d = _copy(artifacts, tmp_path, "model.fp32.onnx")
    plan = build_engine(d / "model.fp32.onnx", BuildConfig("fp32", gate=False))
    fake_gpu.install(monkeypatch, 10, gpu="NVIDIA Jetson Orin", cc=(8, 7))
    with pytest.raises(ManifestError, match="built on NVIDIA Fake GPU.*Rebuild it on this machine: cxr-edge build"):
        open_backend(plan).load()


def test_dla_int8_on_trt10_calibrates_with_a_keyed_cache(monkeypatch, artifacts, tmp_path):
    trt, _ = fake_gpu.install(monkeypatch, 10, dla_cores=2)
    d = _copy(artifacts, tmp_path, "model.fp32.onnx")
    data = tmp_path / "data"
    from cxr_edge.synthetic import write_synthetic_dataset

    write_synthetic_dataset(data, per_class=12, classes=("COVID", "Normal"), sizes=(32,), seed=3)
    plan = build_engine(d / "model.fp32.onnx", BuildConfig("int8", 4, 4, 4, dla_core=1, gate=False), calib_data=data)
    doc = read_manifest(plan)
    assert doc.dla.dla_core == 1 and doc.dla.calibration.startswith("implicit")
    cache = d / doc.dla.calibration_cache
    assert cache.read_bytes() == b"fake-calibration" and cache.name != "dla_calibration.cache"
    with pytest.raises(ConfigError, match="no DLA cores"):
        fake_gpu.install(monkeypatch, 10, dla_cores=0)
        build_engine(d / "model.fp32.onnx", BuildConfig("fp16", 4, 4, 4, dla_core=0, gate=False))


def test_unchecked_failures_become_engine_errors(monkeypatch, artifacts, tmp_path):
    trt, cudart = fake_gpu.install(monkeypatch, 11)
    d = _copy(artifacts, tmp_path, "model.fp32.onnx")
    plan = build_engine(d / "model.fp32.onnx", BuildConfig("fp32", 1, 2, 4, gate=False))
    monkeypatch.setattr(cudart, "cudaMalloc", lambda n: (fake_gpu.cudaError_t.cudaErrorMemoryAllocation, 0))
    with pytest.raises(EngineError, match="cudaMalloc.*cudaErrorMemoryAllocation"):
        open_backend(plan).load()
    assert not cudart.streams and not cudart.pinned  # the half-opened engine was released


def test_screener_refuses_a_zero_batch_before_loading_anything(monkeypatch, artifacts):
    import cxr_edge.runtime.screener as screener_mod
    from cxr_edge.runtime import Screener

    opened = []
    monkeypatch.setattr(screener_mod, "open_backend", lambda *a, **k: opened.append(a))
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        Screener(artifacts / "model.fp32.onnx", batch_size=0)
    assert not opened


@pytest.mark.parametrize("gate", [True, False])
def test_engine_records_its_own_self_check_answers_from_one_load(monkeypatch, tmp_path, gate):
    """Issue 25: an engine's manifest carries the FP32 answers of its source and its own, measured on the GPU it was
    built on, from the same load that ran the gate; loading it there passes the check."""
    trt, cudart = fake_gpu.install(monkeypatch, 10)
    src = tiny.write_artifact_set(tmp_path, variants=("fp32",)).artifacts[0].path
    loads = []
    real = trt.Runtime.deserialize_cuda_engine
    monkeypatch.setattr(trt.Runtime, "deserialize_cuda_engine", lambda self, b: loads.append(1) or real(self, b))
    plan = build_engine(src, BuildConfig("fp32", 1, 4, 8, gate=gate))
    assert len(loads) == 1  # the gate and the self-check record share one deserialised engine
    rec = read_manifest(plan).self_check
    assert rec.at_export.measured_on == "tensorrt/NVIDIA Fake GPU"
    assert rec.reference_probs == read_manifest(src).self_check.reference_probs
    with open_backend(plan) as eng:
        assert eng.info.self_check.status == "passed" and eng.info.self_check.where == "tensorrt/NVIDIA Fake GPU"
