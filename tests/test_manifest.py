import json
import re
from pathlib import Path

import pytest

from cxr_edge.errors import ManifestError
from cxr_edge.manifest import manifest_path, read_manifest, sha256_file, write_manifest
from cxr_edge.preprocess import PreprocessSpec


def _artifact(tmp_path):
    art = tmp_path / "model.bin"
    art.write_bytes(b"weights" * 100)
    write_manifest(art, {"classes": ["COVID", "Normal"], "preprocess": PreprocessSpec(32, 32, "tf").to_dict()})
    return art


def test_round_trip(tmp_path):
    art = _artifact(tmp_path)
    doc = read_manifest(art)
    assert doc.file == "model.bin" and len(doc.sha256) == 64 and doc.size_bytes == 700
    assert doc.preprocess.mode.value == "tf"
    assert doc.versions is not None and doc.versions.python is not None


def test_tampered_artifact_refused(tmp_path):
    art = _artifact(tmp_path)
    art.write_bytes(b"evil" * 100)
    with pytest.raises(ManifestError, match="does not match its manifest"):
        read_manifest(art)
    assert read_manifest(art, verify=False).file == "model.bin"


def test_missing_malformed_and_incomplete_manifests(tmp_path):
    art = _artifact(tmp_path)
    mp = manifest_path(art)
    mp.unlink()
    with pytest.raises(ManifestError, match="has no manifest"):
        read_manifest(art)
    mp.write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(art)
    mp.write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(ManifestError, match="schema_version 99"):
        read_manifest(art)
    mp.write_text(json.dumps({"schema_version": 1, "sha256": "x", "classes": []}))
    with pytest.raises(ManifestError, match="'preprocess'"):
        read_manifest(art)


def test_manifest_is_read_only_and_typed(tmp_path):
    import dataclasses
    import json

    from cxr_edge.manifest import ArtifactManifest, manifest_path, read_manifest, write_manifest
    from cxr_edge.manifest_schema import GateRecord, TensorSpec
    from cxr_edge.precision import Precision

    art = tmp_path / "m.onnx"
    art.write_bytes(b"model")
    write_manifest(art, {"classes": ["COVID", "Normal"], "preprocess": {"height": 8, "width": 8, "mode": "raw"},
                         "operating_point": {"threshold": 0.25}, "gate": {"passed": False},
                         "outputs": [{"name": "features"}, {"name": "probs"}]})
    m = read_manifest(art)
    assert isinstance(m, ArtifactManifest) and m.threshold == 0.25 and m.classes == ("COVID", "Normal")
    assert m.gate_failed and m.precision is Precision.FP32 and m.output_names == ("features", "probs")
    assert m.preprocess == PreprocessSpec(8, 8, "raw") and m.revision == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.threshold = 0.9
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.gate.passed = True
    with pytest.raises(TypeError):
        m["classes"] = ["x"]
    with pytest.raises(TypeError):
        m["classes"]  # no dict view: a manifest is read through its attributes
    with pytest.raises(TypeError):
        m.gate.metrics["max_abs_dprob"] = 1.0  # open tables inside a manifest are read-only too
    m.to_dict()["operating_point"]["threshold"] = 0.99  # the JSON is a copy: the manifest itself does not change
    assert m.threshold == 0.25 and m.classes == ("COVID", "Normal")
    assert json.loads(json.dumps(m.to_dict()))["sha256"] == m.sha256
    moved = dataclasses.replace(m, format="triton")  # a remote model's manifest is a changed copy, coerced as built
    assert moved.format.value == "triton" and m.format is None
    bare = ArtifactManifest(classes=("COVID", "Normal"), preprocess=PreprocessSpec(8, 8, "raw"))
    assert bare.threshold is None  # argmax decides
    assert not bare.gate_failed and not dataclasses.replace(bare, gate=GateRecord(name="not run")).gate_failed
    assert bare.output_names == ("probs",) and dataclasses.replace(bare, outputs=[{"name": "x"}]).outputs == (TensorSpec("x"),)
    assert json.loads(manifest_path(art).read_text())["operating_point"]["threshold"] == 0.25
    assert json.loads(manifest_path(art).read_text())["schema_version"] == 3


FIXTURES = Path(__file__).parent / "fixtures" / "manifests"


def _from_release(tmp_path, name: str) -> Path:
    """A stand-in artifact beside a manifest the 0.1 release wrote, its sha256 pointed at the stand-in (the rest of the
    file as written), so the hash check stays meaningful."""
    art = tmp_path / name
    art.write_bytes(b"stand-in for " + name.encode())
    doc = json.loads((FIXTURES / f"{name}.manifest.json").read_text())
    assert doc["schema_version"] == 1
    doc["sha256"] = sha256_file(art)
    manifest_path(art).write_text(json.dumps(doc, indent=2))
    return art


def test_manifests_written_by_the_previous_release_load_typed(tmp_path):
    from cxr_edge.manifest import read_manifest
    from cxr_edge.manifest_schema import ArtifactFormat
    from cxr_edge.precision import Int8Target, Precision

    trt = read_manifest(_from_release(tmp_path, "model.int8-trt.onnx"))
    assert trt.precision is Precision.INT8 and trt.int8_target is Int8Target.TRT and trt.variant_tag == "int8-trt"
    assert trt.format is ArtifactFormat.ONNX and trt.opset == 17 and trt.classes == ("COVID", "Normal")
    assert trt.preprocess == PreprocessSpec(128, 128, "rescale", 1, 3)
    assert trt.threshold == pytest.approx(0.45514926314353943) and trt.operating_point.n_positive == 54
    assert trt.operating_point.chosen_on == "val" and trt.operating_point.target_sensitivity == 0.95
    assert trt.gate.passed and trt.gate.name == "int8" and trt.gate.max_abs_dprob == pytest.approx(0.0031812191009521484)
    assert trt.gate.numerics.mode == "tensorrt" and trt.gate.numerics.isa is None and trt.gate.limits["auc_drop"] == 0.01
    assert trt.gradcam.engine_native and trt.gradcam.layer == "conv2" and trt.gradcam.head_file == "model.head.npz"
    assert [op.kind for op in trt.gradcam.head_ops] == ["maxpool", "flatten", "dense", "dense"]
    assert trt.gradcam.head_ops[0].params == {"pool": 2, "stride": 2}
    assert trt.quantization.target is Int8Target.TRT and trt.quantization.tensorrt_lint == ()
    assert trt.quantization.int8_mac_share == 1.0 and trt.quantization.qdq_pairs == 11
    assert trt.calibration.n_calibration == 200 and trt.calibration.calibration_split == "train"
    assert trt.gate_attempts[0].attempt == 1 and trt.gate_attempts[0].passed
    assert trt.parent.file == "model.fp32.onnx" and trt.source_model.file == "model.keras"
    assert trt.data.fingerprint == trt.calibration.fingerprint and trt.data.split_fractions == (0.7, 0.15, 0.15)
    assert trt.data.split_counts["val"] == {"COVID": 54, "Normal": 48} and trt.data.presplit is False
    assert trt.self_check.n == 8 == len(trt.self_check.reference_probs) and trt.self_check.at_export.max_abs_dprob > 0
    assert trt.graph_rewrites.input_preprocessing.folded and trt.inputs[0].shape == ("N", 128, 128, 1)
    assert trt.output_names == ("features", "probs") and trt.versions.python == "3.11.7"
    assert trt.versions.packages["onnx"] == "1.23.2" and trt.revision == 1

    cpu = read_manifest(_from_release(tmp_path, "model.int8-cpu.onnx"))
    assert cpu.int8_target is Int8Target.CPU and cpu.quantization.tensorrt_lint is None
    assert cpu.quantization.ort_cpu_int8_kernels == {"QGemm": 2, "QLinearConv": 2}
    assert cpu.quantization.openvino_cpu_precisions.per_precision == {"u8": 4}
    assert cpu.quantization.uint8_input_straight_to_first_dequantize is True
    assert cpu.gate.numerics.isa["isa"] == "AVX2"  # machine facts stay an open table

    keras = read_manifest(_from_release(tmp_path, "model.keras"))
    # v1 left a Keras model's format, outputs and precision to its readers; the migration writes them out
    assert keras.format is ArtifactFormat.KERAS and keras.precision is Precision.FP32
    assert keras.output_names == ("probs", "features") and keras.last_conv_layer == "conv2"
    assert keras.training.phases[0].epochs == 10 and keras.training.history == "history.csv"
    assert keras.metrics.n_val == 102 and keras.recipe_config["optimizer"] == "sgd" and keras.seed == 0


def test_migration_is_explicit_and_the_hash_still_decides(tmp_path):
    from cxr_edge.manifest import migrate_v1_to_v2, read_manifest

    art = _from_release(tmp_path, "model.int8-trt.onnx")
    v1 = json.loads(manifest_path(art).read_text())
    v2 = migrate_v1_to_v2(v1)
    assert v2["schema_version"] == 2 and v1["schema_version"] == 1  # the v1 document is left as it was
    assert {k: v for k, v in v2.items() if k != "schema_version"} == {k: v for k, v in v1.items() if k != "schema_version"}
    keras = json.loads((FIXTURES / "model.keras.manifest.json").read_text())
    assert migrate_v1_to_v2(keras)["outputs"] == [{"name": "probs"}, {"name": "features"}]
    assert migrate_v1_to_v2({**keras, "last_conv_layer": None})["outputs"] == [{"name": "probs"}]
    art.write_bytes(b"another model")  # a swapped artifact is refused, migrated or not
    with pytest.raises(ManifestError, match="does not match its manifest"):
        read_manifest(art)
    assert read_manifest(art, verify=False).sha256 == v1["sha256"]


def test_a_migrated_manifest_is_written_back_as_the_current_schema(tmp_path):
    from cxr_edge.manifest import read_manifest, write_manifest

    art = _from_release(tmp_path, "model.int8-cpu.onnx")
    old = read_manifest(art)
    write_manifest(art, old, stamp=False)  # a new revision keeps the file's facts (cxr-edge calibrate does this)
    doc = json.loads(manifest_path(art).read_text())
    assert doc["schema_version"] == 3 and doc["created"] == old.created and doc["versions"]["onnx"] == "1.23.2"
    assert read_manifest(art) == old
    art.write_bytes(b"changed")
    with pytest.raises(ManifestError, match="does not match its manifest"):
        write_manifest(art, old, stamp=False)  # never vouches for bytes it does not describe


@pytest.mark.parametrize("mutate, match", [
    (lambda d: {**d, "gate": {**d["gate"], "passed": "yes"}}, r"gate\.passed must be a boolean, got str"),
    (lambda d: {**d, "gate": {**d["gate"], "passd": True}}, r"gate\.passd is not a field cxr-edge knows"),
    (lambda d: {**d, "colour": "blue"}, r"colour is not a field cxr-edge knows"),
    (lambda d: {**d, "precision": "fp64"}, r"precision must be one of fp32, fp16, bf16, int8, got 'fp64'"),
    (lambda d: {**d, "int8_target": "gpu"}, r"int8_target must be one of trt, cpu, ov"),
    (lambda d: {**d, "precision": "fp16"}, r"int8_target is for INT8 artifacts only"),
    (lambda d: {**d, "quantization": {**d["quantization"], "qdq_pairs": 1.5}}, r"quantization\.qdq_pairs must be an integer"),
    (lambda d: {**d, "gate_attempts": [{"passed": True}]}, r"gate_attempts\[0\]\.attempt is missing"),
    (lambda d: {**d, "operating_point": {"threshold": 1.5}}, r"operating_point\.threshold must be a number in \[0, 1\]"),
    (lambda d: {**d, "probability_temperature": 0}, r"probability_temperature must be a number in \[0.01, 100\]"),
    (lambda d: {**d, "manifest_version": 0}, r"manifest_version must be a positive integer"),
    (lambda d: {**d, "classes": ["COVID", "COVID"]}, r"classes must be a list of at least two distinct names"),
    (lambda d: {**d, "self_check": {**d["self_check"], "reference_probs": [[0.5, "x"]]}},
     r"self_check\.reference_probs\[0\]\[1\] must be a number, got str"),
    (lambda d: {**d, "data": {**d["data"], "split_counts": {"val": {"COVID": "54"}}}},
     r"data\.split_counts\.val\.COVID must be an integer"),
    (lambda d: {**d, "schema_version": 4}, r"schema_version 4; this cxr-edge reads 3"),
])
def test_unknown_or_ill_typed_fields_are_manifest_errors_naming_the_field(tmp_path, mutate, match):
    from cxr_edge.manifest import read_manifest

    art = _from_release(tmp_path, "model.int8-trt.onnx")
    doc = json.loads(manifest_path(art).read_text())
    manifest_path(art).write_text(json.dumps(mutate(doc)))
    with pytest.raises(ManifestError, match=rf"^Manifest {re.escape(str(manifest_path(art)))}.*{match}"):
        read_manifest(art)


def test_the_writer_refuses_what_a_reader_would_refuse(tmp_path):
    import dataclasses

    from cxr_edge.manifest import read_manifest, write_manifest

    art = _artifact(tmp_path)
    before = manifest_path(art).read_bytes()
    with pytest.raises(ManifestError, match=r"gate\.passed must be a boolean"):
        write_manifest(art, {"classes": ["COVID", "Normal"], "preprocess": PreprocessSpec(32, 32, "tf").to_dict(),
                             "gate": {"passed": "no"}})
    with pytest.raises(ManifestError, match="operating_point.threshold"):
        dataclasses.replace(read_manifest(art), operating_point={"threshold": -1})
    assert manifest_path(art).read_bytes() == before  # nothing was written


def test_an_engine_manifest_is_typed_end_to_end(tmp_path):
    from cxr_edge.manifest import ArtifactManifest, read_manifest, write_manifest
    from cxr_edge.precision import Precision

    plan = tmp_path / "model.fp16.plan"
    plan.write_bytes(b"engine")
    engine = ArtifactManifest.from_dict({
        "kind": "tensorrt-plan", "format": "tensorrt", "precision": "fp16", "classes": ["COVID", "Normal"],
        "preprocess": {"height": 16, "width": 16, "mode": "rescale"}, "profile": {"min": [1, 16, 16, 1],
        "opt": [8, 16, 16, 1], "max": [32, 16, 16, 1]}, "build": {"precision": "fp16", "min_batch": 1, "opt_batch": 8,
        "max_batch": 32, "workspace_mb": 2048, "dla_core": None, "timing_cache": None, "allow_tf32": False,
        "gate": True, "gate_data": None, "force": False}, "tensorrt_typing": "weakly typed (builder flags)",
        "tf32": False, "float_layers": "fp16 where TensorRT chooses (weakly typed)",
        "tensorrt": {"version": "10.3.0", "major": 10, "typing": "weakly typed (builder flags)"}, "dla": None,
        "build_seconds": 12.5, "device": {"gpu_name": "NVIDIA L4", "compute_capability": "8.9",
        "tensorrt_version": "10.3.0", "cuda_driver": "12.4", "cuda_runtime": "12.4", "cuda_bindings": "12.6"},
        "source_onnx": {"file": "model.fp32.onnx", "sha256": "0" * 64, "precision": "fp32"},
        "gate": {"name": "not run (--no-gate)", "passed": None}})
    write_manifest(plan, engine, name="model.fp16.plan")
    m = read_manifest(plan)
    assert m.precision is Precision.FP16 and m.profile.batch_range == (1, 32) and m.build.opt_batch == 8
    assert m.device.gpu_name == "NVIDIA L4" and m.source_onnx.variant.precision is Precision.FP32
    assert m.gate.passed is None and not m.gate_failed and m.file == "model.fp16.plan"


def _field_paths(value, prefix=()):
    """Every key path of a JSON document (the first items of each list), to mutate one field at a time."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield prefix + (k,)
            yield from _field_paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:1]):
            yield prefix + (i,)
            yield from _field_paths(v, prefix + (i,))


def test_any_field_set_to_any_json_is_loaded_or_refused_as_a_manifest_error(tmp_path):
    """A hand-edited or hostile manifest never escapes as a TypeError/KeyError from deep inside the parser."""
    art = _from_release(tmp_path, "model.int8-trt.onnx")
    doc = json.loads(manifest_path(art).read_text())
    hostile = [None, True, 2**70, "x", [], {}]
    for path in _field_paths(doc):
        for value in hostile:
            mutated = json.loads(json.dumps(doc))
            cur = mutated
            for key in path[:-1]:
                cur = cur[key]
            cur[path[-1]] = value
            manifest_path(art).write_text(json.dumps(mutated))
            try:
                read_manifest(art, verify=False)
            except ManifestError:
                pass
