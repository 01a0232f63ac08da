"""Artifacts nobody can swap: signatures, EP-context refusal, the Grad-CAM head's hash, no pickle."""

import json
import re
import shutil

import numpy as np
import pytest
from conftest import REPO

pytest.importorskip("cryptography")
onnx = pytest.importorskip("onnx")

from cxr_edge.errors import ManifestError  # noqa: E402
from cxr_edge.manifest import manifest_path, write_manifest  # noqa: E402
from cxr_edge.runtime.backends.registry import open_backend  # noqa: E402
from cxr_edge.signing import SignatureError, generate_keypair, sign_artifact, signature_path  # noqa: E402

PREPROCESS = {"height": 32, "width": 32, "mode": "rescale", "input_channels": 1, "model_channels": 1}


def _tiny_onnx(path, ep_context: dict | None = None):
    """A 1-node model; with ``ep_context`` an EPContext node like ONNX Runtime's dump writes."""
    from onnx import TensorProto, helper

    inp = helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 32, 32, 1])
    out = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 2])
    if ep_context is None:
        nodes = [helper.make_node("Cast", ["image"], ["c"], to=TensorProto.FLOAT),
                 helper.make_node("ReduceMean", ["c"], ["m"], axes=[1, 2], keepdims=0),
                 helper.make_node("Concat", ["m", "m"], ["probs"], axis=1)]
        opsets = [helper.make_opsetid("", 17)]
    else:
        nodes = [helper.make_node("EPContext", ["image"], ["probs"], domain="com.microsoft", name="trt_engine",
                                  **ep_context)]
        opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(helper.make_graph(nodes, "g", [inp], [out]), opset_imports=opsets, ir_version=8)
    onnx.save(model, str(path))
    write_manifest(path, {"kind": "onnx-artifact", "format": "onnx", "classes": ["COVID", "Normal"],
                          "preprocess": PREPROCESS, "precision": "fp32",
                          "outputs": [{"name": "probs", "shape": ["N", 2], "dtype": "float32"}]})
    return path


@pytest.fixture
def keys(tmp_path):
    return generate_keypair(tmp_path / "keys" / "operator")


def test_keygen_writes_a_private_key_only_the_owner_can_read(keys):
    priv, pub = keys
    assert priv.stat().st_mode & 0o077 == 0
    assert b"PUBLIC KEY" in pub.read_bytes() and b"PRIVATE KEY" in priv.read_bytes()
    with pytest.raises(SignatureError, match="already exists"):
        generate_keypair(priv.with_suffix(""))


def test_signed_artifact_loads_and_records_its_signer(tmp_path, keys):
    art = _tiny_onnx(tmp_path / "m.onnx")
    sign_artifact(art, keys[0])
    eng = open_backend(art, device="cpu", trusted_keys=[keys[1]]).load()
    out = eng.infer(np.full((2, 32, 32, 1), 7, np.uint8))["probs"]
    assert np.allclose(out, 7.0) and re.fullmatch(r"[0-9a-f]{16}", eng.trust["signed_by"])


def test_trusted_key_refuses_unsigned_forged_and_foreign_artifacts(tmp_path, keys):
    art = _tiny_onnx(tmp_path / "m.onnx")
    with pytest.raises(SignatureError, match="not signed"):
        open_backend(art, trusted_keys=[keys[1]])
    sign_artifact(art, keys[0])
    # an attacker swaps the model and rewrites the manifest's sha256 to match: the signature breaks
    _tiny_onnx(art)
    doc = json.loads(manifest_path(art).read_text())
    doc["operating_point"] = {"threshold": 0.01}
    manifest_path(art).write_text(json.dumps(doc))
    with pytest.raises(SignatureError, match="does not verify"):
        open_backend(art, trusted_keys=[keys[1]])
    # signed, but by a key this box does not trust
    other = generate_keypair(tmp_path / "other")
    sign_artifact(art, other[0])
    with pytest.raises(SignatureError, match="does not verify"):
        open_backend(art, trusted_keys=[keys[1]])
    signature_path(art).write_text("{not json")
    with pytest.raises(SignatureError, match="malformed"):
        open_backend(art, trusted_keys=[keys[1]])


def test_sign_refuses_a_file_that_no_longer_matches_its_manifest(tmp_path, keys):
    art = _tiny_onnx(tmp_path / "m.onnx")
    art.write_bytes(art.read_bytes() + b"\0")
    with pytest.raises(ManifestError, match="does not match its manifest"):
        sign_artifact(art, keys[0])


def test_ep_context_model_is_refused_unless_signed_and_trusted(tmp_path, keys):
    art = _tiny_onnx(tmp_path / "ctx.onnx", {"embed_mode": 1, "ep_cache_context": b"\x00native-engine-bytes",
                                            "source": "TensorrtExecutionProvider"})
    with pytest.raises(SignatureError, match="EP-context model.*EPContext.*TensorrtExecutionProvider.*--trusted-key"):
        open_backend(art, device="cpu")
    sign_artifact(art, keys[0])
    with pytest.raises(SignatureError, match="EP-context"):
        open_backend(art, device="cpu")  # signed, but the box was not told whom to trust
    eng = open_backend(art, device="cpu", trusted_keys=[keys[1]])  # policy passes; (no CPU kernel to run it)
    assert eng.trust["ep_context_nodes"] == 1 and eng.trust["signed_by"]


def test_ep_context_with_an_external_engine_file_is_always_refused(tmp_path, keys):
    art = _tiny_onnx(tmp_path / "ctx.onnx", {"embed_mode": 0, "ep_cache_context": b"/tmp/engine.plan",
                                            "source": "TensorrtExecutionProvider"})
    sign_artifact(art, keys[0])
    with pytest.raises(SignatureError, match="external file.*'/tmp/engine.plan'"):
        open_backend(art, device="cpu", trusted_keys=[keys[1]])


def test_cli_keygen_sign_predict_with_trusted_key(tmp_path, capsys):
    from conftest import cxr_like, write_png

    from cxr_edge.cli import main

    art = _tiny_onnx(tmp_path / "m.onnx")
    img = write_png(tmp_path / "x.png", cxr_like(64, 64))
    main(["keygen", str(tmp_path / "op")])
    assert main(["predict", str(art), str(img), "--trusted-key", str(tmp_path / "op.pub")]) == 6  # integrity
    assert "not signed" in capsys.readouterr().err
    assert main(["sign", str(art), "--key", str(tmp_path / "op.key")]) == 0
    assert main(["predict", str(art), str(img), "--trusted-key", str(tmp_path / "op.pub"), "--device", "cpu"]) == 0
    assert "x.png" in capsys.readouterr().out


def test_grad_cam_head_is_verified_and_must_sit_beside_the_artifact(tiny_export, tmp_path):
    from cxr_edge.runtime import Screener

    s, data = tiny_export, tiny_export.data
    src = next(a.path for a in s.artifacts if a.variant == "fp32")
    dst = tmp_path / "art"
    shutil.copytree(src.parent, dst)
    art = dst / src.name
    img = sorted((data / "COVID").iterdir())[0]
    doc = json.loads(manifest_path(art).read_text())
    head = dst / doc["gradcam"]["head_file"]
    with np.load(head) as z:
        arrays = {k: z[k] for k in z.files}
    k = next(k for k in arrays if arrays[k].ndim == 2)
    arrays[k] = -arrays[k]  # a head that points Grad-CAM somewhere else
    np.savez(head, **arrays)
    with Screener(art, device="cpu") as sc:
        assert sc.predict([img])[0].ok  # classification does not need the head
        with pytest.raises(ManifestError, match="Grad-CAM head was modified"):
            sc.predict([img], explain=True)
    doc["gradcam"]["head_file"] = "../elsewhere.npz"
    manifest_path(art).write_text(json.dumps(doc))
    from cxr_edge.manifest import read_manifest
    from cxr_edge.runtime.head import load_artifact_head

    with pytest.raises(ManifestError, match="must be a file name beside the artifact"):
        load_artifact_head(art, read_manifest(art))


def test_no_pickle_or_eval_in_the_package():
    """Nothing we load may execute code: no pickle, no allow_pickle=True, no eval/exec, Keras safe_mode on."""
    offenders = []
    for f in (REPO / "cxr_edge").rglob("*.py"):
        text = f.read_text()
        for pattern in (r"\bimport pickle\b", r"allow_pickle\s*=\s*True", r"\beval\(", r"\bexec\(",
                        r"safe_mode\s*=\s*False", r"\bjoblib\b", r"\bmarshal\b"):
            if re.search(pattern, text):
                offenders.append(f"{f.name}: {pattern}")
    assert not offenders, offenders
    assert "safe_mode=True" in (REPO / "cxr_edge" / "keras_layers.py").read_text()


@pytest.mark.train
def test_keras_models_with_lambda_code_are_refused(tmp_path):
    keras = pytest.importorskip("keras")
    from cxr_edge.keras_layers import load_keras_model

    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Lambda(lambda x: x * 2)(inp))
    model.save(tmp_path / "lambda.keras")
    with pytest.raises(ValueError, match="(?i)safe_mode|lambda"):
        load_keras_model(tmp_path / "lambda.keras")


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_the_bytes_verified_are_the_bytes_that_run(tmp_path, keys, monkeypatch, backend):
    """Issue 26.5: a file swapped between the hash check and the runtime opening it must not be what runs (it was:
    ONNX Runtime re-opened the path and served an unsigned model with its classes swapped in 3 of 20 loads)."""
    import tiny_models as tiny

    from cxr_edge.runtime.backends import registry

    if backend == "openvino":
        pytest.importorskip("openvino")
    art = tiny.write_artifact(tmp_path / "a", "fp32")
    sign_artifact(art, keys[0])
    x = tiny.images(6)
    with open_backend(art, backend=backend, trusted_keys=[keys[1]], self_check="off") as eng:
        honest = eng.infer(x)["probs"]
    swapped = tmp_path / "b" / "model.fp32.onnx"
    swapped.parent.mkdir()
    onnx.save(tiny.tiny_model(seed=7), str(swapped))
    real = registry.read_verified_bytes

    def verify_then_swap(path, manifest):  # the attacker wins the race on every load
        data = real(path, manifest)
        shutil.copy(swapped, path)
        return data

    monkeypatch.setattr(registry, "read_verified_bytes", verify_then_swap)
    with open_backend(art, backend=backend, trusted_keys=[keys[1]], self_check="off") as eng:
        got = eng.infer(x)["probs"]
    np.testing.assert_array_equal(got, honest)
    monkeypatch.undo()
    with pytest.raises(ManifestError, match="does not match its manifest"):  # the next load sees the swap
        open_backend(art, backend=backend, trusted_keys=[keys[1]])


def test_a_signed_artifact_renamed_to_another_role_is_refused(tmp_path, keys):
    """Issue 26.5: a signed fp16 artifact renamed to int8-cpu was served; the signature covers the name it was
    made under, so a renamed file is refused."""
    import tiny_models as tiny

    src = tiny.write_artifact(tmp_path, "fp16")
    sign_artifact(src, keys[0])
    dst = tmp_path / "renamed" / "model.int8-cpu.onnx"
    dst.parent.mkdir()
    shutil.copy(src, dst)
    shutil.copy(manifest_path(src), manifest_path(dst))
    shutil.copy(signature_path(src), signature_path(dst))
    with pytest.raises(SignatureError, match=r"model.int8-cpu.onnx is signed as 'model.fp16.onnx' \(fp16\).*renamed"):
        open_backend(dst, trusted_keys=[keys[1]])
    with open_backend(src, trusted_keys=[keys[1]], self_check="off") as eng:  # under its own name it loads
        assert eng.trust["signed_by"]
