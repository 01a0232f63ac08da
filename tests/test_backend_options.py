"""Backend options are typed per backend and checked when a backend is opened; each backend says which of its
settings ``tune`` should time, so the tuner branches on no backend name."""

import dataclasses

import pytest

from cxr_edge.errors import ConfigError
from cxr_edge.runtime.backends.base import COMMON_OPTIONS, BackendOptions
from cxr_edge.runtime.backends.keras import KerasBackend
from cxr_edge.runtime.backends.onnxruntime import OnnxRuntimeBackend
from cxr_edge.runtime.backends.openvino import OpenVINOBackend
from cxr_edge.runtime.backends.tensorrt import TensorRTBackend
from cxr_edge.runtime.backends.triton import TritonBackend

OWN = {OnnxRuntimeBackend: {"providers", "trt_cache_dir", "cudnn_conv_algo_search"},
       OpenVINOBackend: {"ov_device", "streams"}, TensorRTBackend: {"device_index"}, KerasBackend: {"mode"},
       TritonBackend: set()}


@pytest.mark.parametrize("cls", list(OWN), ids=lambda c: c.__name__)  # no "tensorrt" id: nothing here needs TensorRT
def test_each_backend_has_one_frozen_options_type_with_the_common_fields(cls):
    assert issubclass(cls.Options, BackendOptions)
    assert cls.Options.names() == COMMON_OPTIONS | OWN[cls]
    opts = cls.Options.build(cls.name, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.threads = 2  # type: ignore[misc]


def test_defaults_are_what_the_backends_used_when_an_option_was_not_given():
    ort = OnnxRuntimeBackend.Options.build("onnxruntime", {})
    assert (ort.device, ort.threads, ort.spin, ort.trusted, ort.max_batch) == ("auto", None, None, False, None)
    ov = OpenVINOBackend.Options.build("openvino", {})
    assert (ov.ov_device, ov.streams, ov.precision) == ("CPU", None, None)
    assert KerasBackend.Options.build("keras", {}).mode == "call"
    trt = TensorRTBackend.Options.build("tensorrt", {})
    assert (trt.device_index, trt.cuda_graph) == (None, False)


def test_integer_options_are_integers_and_anything_else_is_a_config_error():
    opts = OpenVINOBackend.Options.build("openvino", {"threads": "2", "streams": 2.0, "spin": None})
    assert (opts.threads, opts.streams, opts.spin) == (2, 2, None)
    assert isinstance(opts.threads, int) and isinstance(opts.streams, int)
    with pytest.raises(ConfigError, match="openvino backend option threads must be an integer, got 'two'"):
        OpenVINOBackend.Options.build("openvino", {"threads": "two"})
    with pytest.raises(ConfigError, match=r"tensorrt backend has no option 'thread'; valid: .*device_index.*threads"):
        TensorRTBackend.Options.build("tensorrt", {"thread": 2})


def test_options_are_checked_when_the_backend_is_opened(tiny_export):
    from cxr_edge.runtime.backends.registry import open_backend

    art = next(a.path for a in tiny_export.artifacts if a.variant == "fp32")
    with pytest.raises(ConfigError, match="option threads must be an integer"):
        open_backend(art, backend="onnxruntime", threads="all")
    with pytest.raises(ConfigError, match="'streams'"):
        open_backend(art, backend="onnxruntime", streams=2)  # an OpenVINO option
    eng = open_backend(art, backend="openvino", threads=1, streams=1)
    assert isinstance(eng.opts, OpenVINOBackend.Options) and eng.opts.streams == 1


@pytest.mark.parametrize("cores", [1, 2, 4])
def test_each_backend_says_which_settings_are_worth_timing(cores):
    kw = dict(device="auto", batch=16, cores=cores)
    threads = sorted({cores, max(1, cores // 2)}, reverse=True)
    assert OnnxRuntimeBackend.tuning_candidates("a.onnx", {}, **kw) == [{"threads": t} for t in threads]
    streams = [{"threads": cores, "streams": s} for s in sorted({2, cores})] if cores > 1 else []
    assert OpenVINOBackend.tuning_candidates("a.onnx", {}, **kw) == [{"threads": t} for t in threads] + streams
    assert TensorRTBackend.tuning_candidates("a.plan", {}, **kw) == [{}]  # the engine as built
    assert TensorRTBackend.tuning_candidates("a.plan", {}, **{**kw, "device": "cpu"}) == []
    assert KerasBackend.tuning_candidates("a.keras", {}, **kw) == []  # the reference, not a deployment engine
    assert TritonBackend.tuning_candidates("triton://h/m", {}, **kw) == []


def test_tune_times_what_the_backends_propose(tiny_export, tmp_path, monkeypatch):
    from cxr_edge.runtime import tuning

    monkeypatch.setenv("CXR_EDGE_CACHE", str(tmp_path / "cache"))
    seen = []

    def only_one_thread(cls, artifact, manifest, *, device, batch, cores):
        seen.append((cls.name, artifact.name, manifest.sha256, device, batch, cores))
        return [{"threads": 1}]

    monkeypatch.setattr(OnnxRuntimeBackend, "tuning_candidates", classmethod(only_one_thread))
    monkeypatch.setattr(OpenVINOBackend, "tuning_candidates", classmethod(lambda cls, *a, **k: []))
    art = tiny_export.out_dir / "model.fp32.onnx"
    rec = tuning.tune(art, batch=2, budget_s=0.05, rounds=1, progress=False)
    assert [(c["backend"], c["options"]) for c in rec["candidates"]] == [("onnxruntime", {"threads": 1})]
    assert seen and seen[0][:2] == ("onnxruntime", art.name) and seen[0][3:5] == ("auto", 2)
    assert rec["winners"]["single"] == {**rec["winners"]["single"], "backend": "onnxruntime", "options": {"threads": 1}}
