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
