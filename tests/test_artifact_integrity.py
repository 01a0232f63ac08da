"""Issue 13: artifacts are loaded whole or not at all (external data, functions, format, failed gates,
side files, hash before parse, malformed manifests)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("cryptography")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from cxr_edge.errors import ConfigError, ManifestError  # noqa: E402
from cxr_edge.manifest import manifest_path, read_manifest, sha256_file, write_manifest  # noqa: E402
from cxr_edge.runtime.backends.registry import open_backend  # noqa: E402
from cxr_edge.signing import SignatureError, generate_keypair, sign_artifact  # noqa: E402

PREPROCESS = {"height": 32, "width": 32, "mode": "rescale", "input_channels": 1, "model_channels": 1}


def _weighted_onnx(path, external: bool, weight: float = 1.0, fields: dict | None = None):
    """probs = softmax([mean(x) * w, 0.5]); with ``external`` the weight lives in weights.bin."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.full((1, 1), weight, np.float32), "w")
    inp = helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 32, 32, 1])
    out = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 2])
    half = numpy_helper.from_array(np.full((1, 1), 0.5, np.float32), "half")
    nodes = [helper.make_node("Cast", ["image"], ["c"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["c"], ["m"], axes=[1, 2, 3], keepdims=1),
             helper.make_node("Flatten", ["m"], ["m1"], axis=1),
             helper.make_node("Div", ["m1", "k255"], ["m2"]),
             helper.make_node("Mul", ["m2", "w"], ["a"]),
             helper.make_node("Sub", ["half", "a"], ["b"]),
             helper.make_node("Concat", ["a", "b"], ["logits"], axis=1),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=1)]
    inits = [w, half, numpy_helper.from_array(np.full((1, 1), 255.0, np.float32), "k255")]
    model = onnx.helper.make_model(helper.make_graph(nodes, "g", [inp], [out], initializer=inits),
                                   opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    if external:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin",
                  size_threshold=0)
    else:
        onnx.save(model, str(path))
    write_manifest(path, {"kind": "onnx-artifact", "format": "onnx", "classes": ["COVID", "Normal"],
                          "preprocess": PREPROCESS, "precision": "fp32",
                          "outputs": [{"name": "probs", "shape": ["N", 2], "dtype": "float32"}], **(fields or {})})
    return path


def _pin(path, files):
    doc = json.loads(manifest_path(path).read_text())
    doc["external_data"] = {f: sha256_file(path.parent / f) for f in files}
    manifest_path(path).write_text(json.dumps(doc))


def test_external_weights_must_be_pinned_by_the_manifest(tmp_path):
    art = _weighted_onnx(tmp_path / "m.onnx", external=True)
    assert (tmp_path / "weights.bin").is_file()
    with pytest.raises(ManifestError, match=r"external file\(s\) \['weights.bin'\].*sha256"):
        open_backend(art)
    _pin(art, ["weights.bin"])
    eng = open_backend(art).load()
    assert eng.trust["external_data"] == ["weights.bin"]
    eng.close()


def test_swapped_external_weights_are_refused_even_when_signed(tmp_path):
    """The attack of the report: same .onnx, same signed manifest, other weights.bin -> other label."""
    art = _weighted_onnx(tmp_path / "m.onnx", external=True, weight=2.0)
    _pin(art, ["weights.bin"])
    priv, pub = generate_keypair(tmp_path / "k" / "op")
    sign_artifact(art, priv)
    x = np.full((1, 32, 32, 1), 200, np.uint8)
    with open_backend(art, trusted_keys=[pub]) as eng:
        assert eng.infer(x)["probs"][0, 0] > 0.5  # COVID
    evil = tmp_path / "evil"
    evil.mkdir()
    _weighted_onnx(evil / "m.onnx", external=True, weight=-2.0)
    shutil.copy(evil / "weights.bin", tmp_path / "weights.bin")
    import onnxruntime as ort  # what the swap does when nothing checks the side file: the label flips

    probs = ort.InferenceSession(str(art), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    assert probs[0, 0] < 0.5
    with pytest.raises(ManifestError, match="weights.bin.*does not match"):
        open_backend(art, trusted_keys=[pub])


def test_external_data_must_be_a_regular_file_in_the_artifact_folder(tmp_path):
    art = _weighted_onnx(tmp_path / "m.onnx", external=True)
    _pin(art, ["weights.bin"])
    os.replace(tmp_path / "weights.bin", tmp_path / "real.bin")
    os.symlink("/dev/zero", tmp_path / "weights.bin")
    with pytest.raises(ManifestError, match="links outside|not a regular file"):
        open_backend(art)


def test_ep_context_inside_a_model_local_function_is_found(tmp_path):
    from onnx import TensorProto, helper

    fn = helper.make_function("local", "hidden", ["x"], ["y"],
                              [helper.make_node("EPContext", ["x"], ["y"], domain="com.microsoft", embed_mode=1,
                                                ep_cache_context=b"engine", source="TensorrtExecutionProvider")],
                              [helper.make_opsetid("com.microsoft", 1)])
    inp = helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 32, 32, 1])
    out = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 2])
    graph = helper.make_graph([helper.make_node("hidden", ["image"], ["probs"], domain="local")], "g", [inp], [out])
    model = helper.make_model(graph, functions=[fn], ir_version=8,
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1),
                                             helper.make_opsetid("com.microsoft", 1)])
    art = tmp_path / "f.onnx"
    onnx.save(model, str(art))
    write_manifest(art, {"kind": "onnx-artifact", "format": "onnx", "classes": ["COVID", "Normal"],
                         "preprocess": PREPROCESS})
    with pytest.raises(SignatureError, match="EP-context model"):
        open_backend(art)


def test_the_format_of_a_local_file_comes_from_its_name_never_the_manifest(tmp_path):
    art = _weighted_onnx(tmp_path / "m.onnx", external=False)
    doc = json.loads(manifest_path(art).read_text())
    doc.update(format="triton", triton={"host": "203.0.113.9:8000", "model": "exfil"})
    manifest_path(art).write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="says format 'triton'.*triton://"):
        open_backend(art)


def test_gate_failed_artifact_is_refused_unless_allowed(tmp_path):
    art = _weighted_onnx(tmp_path / "m.onnx", external=False,
                         fields={"gate": {"name": "int8 agreement", "passed": False},
                                 "gate_status": "FAILED (kept with --force: do not deploy)"})
    with pytest.raises(ManifestError, match="failed its accuracy gate.*--allow-failed-gate"):
        open_backend(art)
    open_backend(art, allow_failed_gate=True).load().close()


def test_half_copied_onnx_gets_the_hash_message_not_a_parser_traceback(tmp_path):
    art = _weighted_onnx(tmp_path / "m.onnx", external=False)
    data = art.read_bytes()
    art.write_bytes(data[: len(data) // 2])
    with pytest.raises(ManifestError, match="does not match its manifest"):
        open_backend(art)


@pytest.mark.parametrize("mutate, match", [
    (lambda d: "[" * 100_000 + "]" * 100_000, "not valid JSON"),
    (lambda d: json.dumps([1, 2]), "not an object"),
    (lambda d: json.dumps({**d, "classes": "COVID"}), "classes must be"),
    (lambda d: json.dumps({**d, "classes": ["COVID"]}), "classes must be"),
    (lambda d: json.dumps({**d, "preprocess": {"height": "big"}}), "preprocess"),
    (lambda d: json.dumps({**d, "operating_point": {"threshold": "0.5"}}), "threshold"),
    (lambda d: json.dumps({**d, "operating_point": {"threshold": 7}}), "threshold"),
    (lambda d: json.dumps({**d, "outputs": ["probs"]}), "outputs"),
    (lambda d: json.dumps({**d, "sha256": 12}), "sha256"),
    (lambda d: json.dumps({**d, "gradcam": [1]}), "gradcam"),
])
def test_malformed_manifests_are_manifest_errors(tmp_path, mutate, match):
    art = _weighted_onnx(tmp_path / "m.onnx", external=False)
    doc = json.loads(manifest_path(art).read_text())
    manifest_path(art).write_text(mutate(doc))
    with pytest.raises(ManifestError, match=match):
        read_manifest(art)


@pytest.mark.parametrize("target", ["fifo", "/dev/zero", "outside"])
def test_head_file_must_be_a_regular_file_beside_the_artifact(tiny_export, tmp_path, target):
    from cxr_edge.runtime.head import load_artifact_head

    src = next(a.path for a in tiny_export.artifacts if a.variant == "fp32")
    doc = read_manifest(src)
    head = doc.gradcam.head_file
    art = tmp_path / src.name
    shutil.copy(src, art)
    shutil.copy(manifest_path(src), manifest_path(art))
    if target == "fifo":
        os.mkfifo(tmp_path / head)
    elif target == "/dev/zero":
        os.symlink("/dev/zero", tmp_path / head)
    else:
        (tmp_path / "elsewhere").mkdir()
        shutil.copy(src.parent / head, tmp_path / "elsewhere" / head)
        os.symlink(tmp_path / "elsewhere" / head, tmp_path / head)
    with pytest.raises(ManifestError, match="not a regular file|links outside"):
        load_artifact_head(art, doc)


@pytest.mark.parametrize("url", ["triton://host:99999/m", "triton://[::1]", "triton://[::1", "triton:///m", "triton://h/a/b"])
def test_bad_triton_addresses_are_config_errors(url):
    from cxr_edge.runtime.backends.triton import parse_url

    with pytest.raises(ConfigError, match="triton://host:port/model"):
        parse_url(url)
    assert parse_url("triton://[::1]:8001/cxr") == ("[::1]:8001", "cxr")
