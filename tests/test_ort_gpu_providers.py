"""ONNX Runtime's GPU providers, driven through a fake onnxruntime-gpu that behaves as the real one does.

The real package always lists TensorrtExecutionProvider and CUDAExecutionProvider; giving the TensorRT
EP a U8S8 (int8-cpu) graph makes session creation raise; without CUDA libraries a session silently runs
on the CPU. The fake does the same around a real CPU session, and records what it was asked for.
"""

import types

import numpy as np
import onnxruntime as real_ort
import pytest
import tiny_models as tiny

from cxr_edge.runtime.backends import onnxruntime as ort_backend
from cxr_edge.runtime.backends.ort_providers import CUDNN_CONV_ALGO_SEARCH
from cxr_edge.runtime.backends.registry import open_backend

TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"


def fake_ort_gpu(gpu_works: bool):
    calls = []

    class Session:
        def __init__(self, path, so=None, providers=None, provider_options=None):
            calls.append({"providers": list(providers), "options": list(provider_options or [])})
            if TRT in providers:
                import onnx

                # onnxruntime-gpu takes a path or the model's bytes (path_or_bytes); the runtime gives verified bytes
                m = onnx.load_model_from_string(path) if isinstance(path, bytes) else onnx.load(path)
                if any(n.op_type == "QuantizeLinear" and len(n.input) > 2 and
                       next((t.data_type for t in m.graph.initializer if t.name == n.input[2]), None) == 2
                       for n in m.graph.node):  # uint8 zero point
                    raise RuntimeError("[TensorRT EP] INVALID_GRAPH: UINT8 quantization is not supported")
            self._s = real_ort.InferenceSession(path, so, providers=[CPU])
            self._used = [p for p in providers if p != TRT][:1] if gpu_works else [CPU]

        def get_providers(self):
            return self._used + ([CPU] if self._used != [CPU] else [])

        def __getattr__(self, name):
            return getattr(self._s, name)

    mod = types.SimpleNamespace(get_available_providers=lambda: [TRT, CUDA, CPU], InferenceSession=Session,
                                SessionOptions=real_ort.SessionOptions, __version__="1.26.0-fake-gpu")
    return mod, calls


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ortgpu")
    for p in ("fp32", "int8-cpu", "int8-trt"):
        tiny.write_artifact(d, p)
    return d


@pytest.mark.parametrize("gpu_works, provider, device", [(True, CUDA, "cuda"), (False, CPU, "cpu")])
def test_auto_with_an_int8_cpu_artifact_never_offers_it_to_tensorrt(monkeypatch, artifacts, gpu_works, provider, device,
                                                                    caplog):
    mod, calls = fake_ort_gpu(gpu_works)
    monkeypatch.setattr(ort_backend, "require", lambda name: mod)
    with open_backend(artifacts / "model.int8-cpu.onnx", device="auto") as eng:
        out = eng.infer(tiny.images(3))["probs"]
        assert eng.info.provider == provider and eng.info.device == device  # says which, without raising
    assert calls[-1]["providers"] == [CUDA, CPU]
    assert calls[-1]["options"][0]["cudnn_conv_algo_search"] == CUDNN_CONV_ALGO_SEARCH
    assert out.shape == (3, 2)
    if not gpu_works:
        assert "runs on CPUExecutionProvider" in caplog.text


def test_tensorrt_ep_profile_follows_the_batch_and_cache_is_private_and_keyed(monkeypatch, artifacts, tmp_path):
    mod, calls = fake_ort_gpu(True)
    monkeypatch.setattr(ort_backend, "require", lambda name: mod)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    art = artifacts / "model.int8-trt.onnx"
    with open_backend(art, device="auto", max_batch=16) as eng:
        assert eng.info.provider == CUDA  # the fake's GPU runs CUDA; the TensorRT EP was offered first
    opts = calls[-1]["options"][0]
    assert calls[-1]["providers"] == [TRT, CUDA, CPU]
    assert opts["trt_profile_max_shapes"].endswith(":16x16x16x1") and opts["trt_int8_enable"] == "True"
    from cxr_edge.manifest import read_manifest

    sha = read_manifest(art).sha256
    cache = tmp_path / "cache" / "cxr-edge" / "ort-trt" / sha[:32]
    assert opts["trt_engine_cache_path"] == str(cache) and (cache.stat().st_mode & 0o777) == 0o700
    assert str(artifacts) not in opts["trt_engine_cache_path"]  # never beside the artifact


def test_tensorrt_ep_cache_is_off_for_signed_only_deployments(monkeypatch, artifacts):
    mod, calls = fake_ort_gpu(True)
    monkeypatch.setattr(ort_backend, "require", lambda name: mod)
    with open_backend(artifacts / "model.fp32.onnx", device="auto", trusted=True):
        pass
    opts = calls[-1]["options"][0]
    assert opts["trt_engine_cache_enable"] == "False" and "trt_engine_cache_path" not in opts


def test_asking_for_the_tensorrt_ep_with_a_cpu_int8_artifact_says_why(monkeypatch, artifacts):
    from cxr_edge.errors import ConfigError

    mod, _ = fake_ort_gpu(True)
    monkeypatch.setattr(ort_backend, "require", lambda name: mod)
    with pytest.raises(ConfigError, match=r"unsigned \(U8\) activations.*int8-trt"):
        open_backend(artifacts / "model.int8-cpu.onnx", providers=["tensorrt", "cpu"]).load()


def test_batches_fit_an_active_tensorrt_ep_profile(monkeypatch, artifacts):
    mod, _ = fake_ort_gpu(True)
    mod.get_available_providers = lambda: [TRT, CPU]

    class TrtSession(mod.InferenceSession):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self._used = [TRT] if TRT in k["providers"] else [CPU]
            self.seen = []

        def run(self, names, feed):
            self.seen.append(len(next(iter(feed.values()))))
            assert self._used != [TRT] or 1 <= self.seen[-1] <= 4  # a TensorRT engine takes its profile only
            return self._s.run(names, feed)

    mod.InferenceSession = TrtSession
    monkeypatch.setattr(ort_backend, "require", lambda name: mod)
    x = tiny.images(10)
    with open_backend(artifacts / "model.fp32.onnx", max_batch=4) as eng:
        assert eng.batch_range() == (1, 4)
        out = eng.infer(x)["probs"]
        assert eng.session.seen == [4, 4, 2]
    with open_backend(artifacts / "model.fp32.onnx", device="cpu") as ref:
        np.testing.assert_allclose(out, ref.infer(x)["probs"], atol=1e-6)
