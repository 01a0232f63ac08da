"""TensorRT build paths that need no GPU: options, profiles, refusals, compatibility, missing package."""

import pytest

from cxr_edge.errors import ConfigError, ManifestError, MissingExtraError
from cxr_edge.export.tensorrt_build import BuildConfig, check_source_artifact, engine_path_for
from cxr_edge.precision import Precision
from cxr_edge.runtime.backends.ort_providers import tensorrt_ep_options
from cxr_edge.runtime.backends.tensorrt_api import DeviceInfo, check_engine_compat, flavor_of, tensorrt_installed

TRT10, TRT11 = flavor_of("10.3.0"), flavor_of("11.4.0.106")

DOC = {"precision": "fp32", "inputs": [{"name": "image"}], "gate": {"passed": True}, "classes": ["COVID", "Normal"],
       "preprocess": {"height": 224, "width": 224, "mode": "rescale", "input_channels": 1}}


def M(**fields):
    """The typed manifest of DOC with ``fields`` changed (what the build and runtime functions take)."""
    from cxr_edge.manifest import ArtifactManifest

    return ArtifactManifest.from_dict({**DOC, **fields})


def test_batch_text_and_profile_shapes():
    cfg = BuildConfig.from_batch_text("fp16", "1,8,32")
    assert cfg.precision is Precision.FP16
    assert cfg.profile_shapes((224, 224, 1)) == {"min": (1, 224, 224, 1), "opt": (8, 224, 224, 1), "max": (32, 224, 224, 1)}


@pytest.mark.parametrize(
    "precision, batch, kw, match",
    [
        ("fp16", "8,1,32", {}, "need 1 <= MIN <= OPT <= MAX"),
        ("fp16", "0,1,2", {}, "need 1 <= MIN"),
        ("fp16", "1,8", {}, "three numbers"),
        ("fp16", "a,b,c", {}, "integers"),
        ("tf32", "1,8,32", {}, "Unknown precision 'tf32'"),
        ("fp16", "1,8,32", {"workspace_mb": 1}, "too small"),
        ("fp32", "1,8,32", {"dla_core": 0}, "DLA runs FP16 or INT8"),
        ("fp16", "1,8,32", {"dla_core": 0}, "DLA engines have static shapes"),
    ],
)
def test_bad_build_options(precision, batch, kw, match):
    with pytest.raises(ConfigError, match=match):
        BuildConfig.from_batch_text(precision, batch, **kw)


def test_source_artifact_rules():
    check_source_artifact(M(), BuildConfig("fp16"), TRT10)
    with pytest.raises(ConfigError, match="int8-trt QDQ artifact"):
        check_source_artifact(M(), BuildConfig("int8"))
    for flavour in ("cpu", "ov"):
        with pytest.raises(ConfigError, match=rf"int8-{flavour} artifact has unsigned \(U8\) activations"):
            check_source_artifact(M(precision="int8", int8_target=flavour), BuildConfig("int8"))
    with pytest.raises(ConfigError, match="cannot build a fp16 engine"):
        check_source_artifact(M(precision="int8", int8_target="trt"), BuildConfig("fp16"))
    with pytest.raises(ConfigError, match="failed its accuracy gate"):
        check_source_artifact(M(gate={"passed": False}), BuildConfig("fp32"))
    check_source_artifact(M(precision="int8", int8_target="trt"), BuildConfig("int8"), TRT11)
    # an fp16 graph is never labelled fp32; TensorRT 11 (strongly typed) takes fp16 only from the fp16 graph
    with pytest.raises(ConfigError, match="labelled fp32 but not be fp32"):
        check_source_artifact(M(precision="fp16"), BuildConfig("fp32"), TRT10)
    with pytest.raises(ConfigError, match="strongly typed networks only.*model.fp16.onnx"):
        check_source_artifact(M(), BuildConfig("fp16"), TRT11)
    check_source_artifact(M(precision="fp16"), BuildConfig("fp16"), TRT11)
    check_source_artifact(M(precision="fp16"), BuildConfig("fp16"), TRT10)


def test_tensorrt_versions():
    assert not TRT10.strongly_typed_only and TRT10.has_implicit_int8
    assert TRT11.strongly_typed_only and not TRT11.has_implicit_int8
    with pytest.raises(ConfigError, match="TensorRT 8.6.2 is too old.*JetPack 6.1"):
        flavor_of("8.6.2")
    with pytest.raises(ConfigError, match="newer than this cxr-edge knows"):
        flavor_of("12.0.1")


def test_engine_compat_refusal_says_how_to_rebuild():
    doc = M(device={"gpu_name": "NVIDIA A100", "compute_capability": "8.0", "tensorrt_version": "10.3.0"},
            source_onnx={"file": "model.fp32.onnx"}, build={"precision": "fp16", "min_batch": 1, "opt_batch": 4, "max_batch": 16})
    check_engine_compat(doc, DeviceInfo("NVIDIA A100", "8.0", "10.3.0"))
    with pytest.raises(ManifestError, match=r"TensorRT 10.3.0 vs 10.7.0.*cxr-edge build model.fp32.onnx --precision fp16 --batch 1,4,16"):
        check_engine_compat(doc, DeviceInfo("NVIDIA A100", "8.0", "10.7.0"))
    with pytest.raises(ManifestError, match=r"built on NVIDIA A100 \(sm 8.0\), this is NVIDIA L4 \(sm 8.9\)"):
        check_engine_compat(doc, DeviceInfo("NVIDIA L4", "8.9", "10.3.0"))


def test_engine_paths(tmp_path):
    assert engine_path_for(tmp_path / "model.fp32.onnx", BuildConfig("fp16")).name == "model.fp16.plan"
    assert engine_path_for(tmp_path / "model.int8-trt.onnx", BuildConfig("int8", 4, 4, 4, dla_core=1)).name == "model.int8.dla1.plan"


def test_ort_tensorrt_ep_options(tmp_path):
    opts = tensorrt_ep_options(M(), (1, 4, 16), tmp_path, dump_ep_context=True)
    assert opts["trt_fp16_enable"] == "False" and opts["trt_int8_enable"] == "False"
    assert opts["trt_profile_max_shapes"] == "image:16x224x224x1"
    assert opts["trt_engine_cache_path"] == str(tmp_path) and opts["trt_dump_ep_context_model"] == "True"
    off = tensorrt_ep_options(M(precision="fp16"), (1, 8, 32), None)
    assert off["trt_engine_cache_enable"] == "False" and "trt_engine_cache_path" not in off
    assert off["trt_fp16_enable"] == "True"
    with pytest.raises(ConfigError, match=r"unsigned \(U8\) activations"):
        tensorrt_ep_options(M(precision="int8", int8_target="cpu"), (1, 8, 32), tmp_path)
    with pytest.raises(ConfigError, match="MIN <= OPT"):
        tensorrt_ep_options(M(), (4, 2, 1), tmp_path)


@pytest.mark.skipif(tensorrt_installed(), reason="TensorRT is installed here")
def test_missing_tensorrt_is_a_clear_error(tmp_path):
    from cxr_edge.export.tensorrt_build import build_engine
    from cxr_edge.manifest import write_manifest

    onnx = tmp_path / "model.fp32.onnx"
    onnx.write_bytes(b"not really onnx")
    write_manifest(onnx, {**DOC, "classes": ["COVID", "Normal"]})
    with pytest.raises(MissingExtraError, match=r"pip install 'cxr-edge\[gpu-cu12\]'"):
        build_engine(onnx, BuildConfig("fp16"))


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_build_fp16_engine_on_a_gpu(tmp_path):
    pytest.importorskip("tensorflow")
    from cxr_edge.export.pipeline import ExportConfig, export_model
    from cxr_edge.export.tensorrt_build import build_engine
    from cxr_edge.manifest import read_manifest
    from cxr_edge.synthetic import write_synthetic_dataset
    from cxr_edge.train.trainer import TrainConfig, train

    data = write_synthetic_dataset(tmp_path / "d", per_class=20, sizes=(64,))
    r = train(TrainConfig(recipe="small_cnn", epochs=1, image_size=32, verbose=0), data, tmp_path / "m")
    s = export_model(r.model_path, tmp_path / "a", ExportConfig(precisions="fp32,int8", int8_targets="trt"))
    for art, prec in ((s.artifacts[0].path, "fp16"), (s.artifacts[1].path, "int8")):
        eng = build_engine(art, BuildConfig(prec, 1, 4, 8))
        doc = read_manifest(eng)
        assert doc.precision.value == prec and doc.device.tensorrt_version


def test_dla_int8_needs_fp32_source_and_calibration(tmp_path):
    from cxr_edge.export.tensorrt_build import build_engine
    from cxr_edge.manifest import write_manifest

    dla = BuildConfig("int8", 4, 4, 4, dla_core=0)
    with pytest.raises(ConfigError, match="calibrated implicitly from the fp32 artifact"):
        check_source_artifact(M(precision="int8", int8_target="trt"), dla, TRT10)
    check_source_artifact(M(), dla, TRT10)
    check_source_artifact(M(precision="int8", int8_target="trt"), dla, TRT11)  # 11: explicit only
    with pytest.raises(ConfigError, match="int8-trt QDQ artifact"):
        check_source_artifact(M(), dla, TRT11)
    onnx = tmp_path / "model.fp32.onnx"
    onnx.write_bytes(b"x")
    write_manifest(onnx, {**DOC, "classes": ["COVID", "Normal"]})
    with pytest.raises(ConfigError, match="pass --calib DATA"):
        build_engine(onnx, dla)
