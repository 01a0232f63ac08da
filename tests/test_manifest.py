import json

import pytest

from cxr_edge.errors import ManifestError
from cxr_edge.manifest import manifest_path, read_manifest, write_manifest
from cxr_edge.preprocess import PreprocessSpec


def _artifact(tmp_path):
    art = tmp_path / "model.bin"
    art.write_bytes(b"weights" * 100)
    write_manifest(art, {"classes": ["COVID", "Normal"], "preprocess": PreprocessSpec(32, 32, "tf").to_dict()})
    return art


def test_round_trip(tmp_path):
    art = _artifact(tmp_path)
    doc = read_manifest(art)
    assert doc["file"] == "model.bin" and len(doc["sha256"]) == 64 and doc["size_bytes"] == 700
    assert PreprocessSpec.from_dict(doc["preprocess"]).mode.value == "tf"
    assert "python" in doc["versions"]


def test_tampered_artifact_refused(tmp_path):
    art = _artifact(tmp_path)
    art.write_bytes(b"evil" * 100)
    with pytest.raises(ManifestError, match="does not match its manifest"):
        read_manifest(art)
    assert read_manifest(art, verify=False)["file"] == "model.bin"


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
    import json

    from cxr_edge.manifest import Manifest, manifest_path, read_manifest, write_manifest

    art = tmp_path / "m.onnx"
    art.write_bytes(b"model")
    write_manifest(art, {"classes": ["COVID", "Normal"], "preprocess": {"height": 8, "width": 8, "mode": "raw"},
                         "operating_point": {"threshold": 0.25}, "gate": {"passed": False},
                         "outputs": [{"name": "features"}, {"name": "probs"}]})
    m = read_manifest(art)
    assert isinstance(m, Manifest) and m.threshold == 0.25 and m.classes == ["COVID", "Normal"]
    assert m.gate_failed and m.precision == "fp32" and m.output_names == ["features", "probs"]
    with pytest.raises(AttributeError, match="read-only"):
        m.threshold = 0.9
    with pytest.raises(TypeError):
        m["classes"] = ["x"]
    m["operating_point"]["threshold"] = 0.99  # a copy: the manifest itself does not change
    m.classes.append("Dog")
    assert m.threshold == 0.25 and m.classes == ["COVID", "Normal"]
    assert json.loads(json.dumps(m.to_dict()))["sha256"] == m.sha256
    moved = m.with_fields(format="triton")
    assert moved.format == "triton" and m.format is None
    assert Manifest({"classes": ["a"], "preprocess": {}}).threshold is None  # argmax decides
    assert not Manifest({"classes": ["a"], "preprocess": {}}).gate_failed  # no gate recorded is not a failure
    assert json.loads(manifest_path(art).read_text())["operating_point"]["threshold"] == 0.25
