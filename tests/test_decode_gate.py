"""Reduced-resolution JPEG decoding is gated per artifact like INT8: on where the artifact answers the same, off
(and said so in every result) where it does not, and never on without a measurement."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tiny_models import SIZE, manifest_fields, write_artifact

from cxr_edge.cli import main
from cxr_edge.errors import ExitCode
from cxr_edge.manifest import read_manifest, write_manifest
from cxr_edge.runtime.decode_gate import decode_mode, gate_artifact, gate_jpegs


def _fine_detail_model(gain: float):
    """p(COVID) = sigmoid(gain x the image's checkerboard component): the finest detail there is, which full and
    reduced decoding render differently; a large gain makes the answer hang on it."""
    from onnx import TensorProto, helper, numpy_helper

    board = ((np.indices((SIZE, SIZE)).sum(0) % 2) * 2 - 1).astype(np.float32).reshape(1, SIZE, SIZE, 1)
    inits = [numpy_helper.from_array(board * np.float32(gain / SIZE / SIZE), "w"),
             numpy_helper.from_array(np.array([1, -1], np.float32).reshape(1, 2), "sign"),
             numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes")]
    nodes = [helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["f", "w"], ["fw"]),
             helper.make_node("ReduceSum", ["fw", "axes"], ["z"], keepdims=0),
             helper.make_node("Unsqueeze", ["z", "one"], ["z1"]),
             helper.make_node("Mul", ["z1", "sign"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=1)]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "one"))
    graph = helper.make_graph(nodes, "fine", [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", SIZE, SIZE, 1])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 2])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _sources(tiny_export, n: int = 24) -> list[Path]:
    data = Path(tiny_export.data)
    return sorted((data / "COVID").iterdir())[: n // 2] + sorted((data / "Normal").iterdir())[: n // 2]


@pytest.fixture()
def smooth(tmp_path) -> Path:
    return write_artifact(tmp_path / "smooth", "fp32")


@pytest.fixture()
def fine(tmp_path) -> Path:
    import onnx

    path = tmp_path / "fine" / "model.fp32.onnx"
    path.parent.mkdir()
    onnx.save(_fine_detail_model(gain=2000.0), str(path))
    write_manifest(path, manifest_fields("fp32", parent=None))
    return path


def test_without_a_measurement_nothing_is_decoded_reduced(smooth):
    on, note = decode_mode(read_manifest(smooth))
    assert not on and "not gated" in note


def test_a_model_that_answers_the_same_turns_reduced_decoding_on(smooth, tiny_export):
    record = gate_artifact(smooth, _sources(tiny_export), "val")
    assert record.passed and record.n_images == 24 and record.metrics["max_abs_dprob"] <= 1e-2
    assert "1/" in str(record.metrics["scales"])  # the reduced path really ran (2048 px JPEGs for a 16 px model)
    assert decode_mode(read_manifest(smooth))[0]


def test_a_model_that_hangs_on_fine_detail_fails_and_stays_off(fine, tiny_export, tmp_path, capsys):
    assert main(["decode-gate", str(fine), str(tiny_export.data), "--max-images", "24"]) == ExitCode.GATE_FAILED
    m = read_manifest(fine)
    assert m.decode_gate is not None and not m.decode_gate.passed and m.decode_gate.failures
    assert m.decode_gate.metrics["max_abs_dprob"] > 1e-2  # measured, not assumed: the fine detail moved the answer
    on, note = decode_mode(m)
    assert not on and "failed its gate" in note
    # screening a large JPEG with it: decoded at full resolution, and the result says so
    from cxr_edge.runtime import Screener

    big = tmp_path / "big.jpg"
    big.write_bytes(gate_jpegs([_sources(tiny_export, 2)[0]])[0])
    with Screener(fine, isolation=None) as s:
        r = s.predict([big])[0]
    assert r.ok and r.decode.startswith("full resolution") and r.to_dict()["decode"] == r.decode


def test_reduced_decoding_is_what_runs_when_the_gate_passed(smooth, tiny_export, tmp_path):
    from cxr_edge.preprocess import pack_source
    from cxr_edge.runtime import Screener

    gate_artifact(smooth, _sources(tiny_export), "val")
    big = tmp_path / "big.jpg"
    big.write_bytes(gate_jpegs([_sources(tiny_export, 2)[0]])[0])
    _, full = pack_source(str(big), read_manifest(smooth).preprocess)
    _, reduced = pack_source(str(big), read_manifest(smooth).preprocess, reduce=True)
    assert not any("decoded at" in n for n in full.notes) and any("decoded at 1/" in n for n in reduced.notes)
    with Screener(smooth, isolation=None) as s:
        r = s.predict([big])[0]
    assert r.ok and r.decode.startswith("reduced-resolution")
