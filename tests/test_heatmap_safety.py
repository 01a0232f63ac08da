"""Heatmaps that cannot mislead (issue 31): a map with no localised evidence is never painted, anywhere.

Near-empty, flat (constant), all-zero and non-finite maps give the plain radiograph in gray (R == G == B in every
pixel) with a caption that says so and no stretched colour bar, in the overlay PNG, the HTTP service's images, the
node's kiosk JPEG (it is :func:`overlay`) and the DICOM Secondary Capture; a localised map still gets colour.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from conftest import cxr_like

from cxr_edge.runtime import overlay as ov
from cxr_edge.runtime.gradcam import MIN_CAM_CONTRAST, WEAK_CAM_PEAK, map_evidence, normalise
from cxr_edge.runtime.result import Explanation

HANN = np.outer(np.hanning(7), np.hanning(7)).astype(np.float32)


def _with_nan() -> np.ndarray:
    cam = HANN.copy()
    cam[0, 0] = np.nan
    return cam


def _with_inf() -> np.ndarray:
    cam = HANN.copy()
    cam[3, 3] = np.inf
    return cam


#: maps that must show no localised evidence, and a word their reason contains
NOT_LOCALISED = {
    "constant": (np.full((7, 7), 0.5, np.float32), "alike"),
    "nearly constant": (np.full((7, 7), 0.5, np.float32) + 0.01 * HANN, "alike"),
    "all zero": (np.zeros((7, 7), np.float32), "barely depends"),
    "tiny peak": (HANN * 1e-5, "barely depends"),
    "NaN": (_with_nan(), "not finite"),
    "inf": (_with_inf(), "not finite"),
    "all NaN": (np.full((7, 7), np.nan, np.float32), "not finite"),
    "empty": (np.zeros((0, 0), np.float32), "empty"),
}
LOCALISED = {"hanning": HANN, "hanning on an offset": HANN + 0.05, "small but localised": HANN * 2 * WEAK_CAM_PEAK}


def _image() -> np.ndarray:
    return cxr_like(96, 80, seed=3)


def _colourless(img: np.ndarray) -> bool:
    return bool((img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all())


@pytest.mark.parametrize("name", list(NOT_LOCALISED))
def test_the_rule_names_maps_with_no_localised_evidence_and_says_why(name):
    cam, word = NOT_LOCALISED[name]
    e = map_evidence(cam)
    assert not e.localised and e.weak and word in e.reason, e
    assert np.isfinite(e.peak)


@pytest.mark.parametrize("name", list(LOCALISED))
def test_the_rule_accepts_localised_maps(name):
    e = map_evidence(LOCALISED[name])
    assert e.localised and not e.weak and e.reason is None


def test_the_rule_has_the_numbers_its_docstring_gives():
    assert WEAK_CAM_PEAK == 1e-3 and MIN_CAM_CONTRAST == 0.1
    doc = map_evidence.__doc__ or ""
    assert "1e-3" in doc and "0.1 (10 %)" in doc
    # just either side of each limit
    assert not map_evidence(HANN * 0.99 * WEAK_CAM_PEAK).localised and map_evidence(HANN * 1.01 * WEAK_CAM_PEAK).localised
    flat = np.full((7, 7), 1.0, np.float32)
    flat[0, 0] = 1 - 0.99 * MIN_CAM_CONTRAST
    assert not map_evidence(flat).localised
    flat[0, 0] = 1 - 1.01 * MIN_CAM_CONTRAST
    assert map_evidence(flat).localised


@pytest.mark.parametrize("scale", [None, 0.01])
@pytest.mark.parametrize("name", list(NOT_LOCALISED))
def test_no_colour_is_painted_for_a_map_with_no_localised_evidence(name, scale, monkeypatch):
    cam, _ = NOT_LOCALISED[name]
    img = _image()
    out = ov.overlay(img, cam, scale=scale)
    assert out.shape == (*img.shape, 3) and _colourless(out)
    assert (out[..., 0] == img).all()  # the radiograph itself, not a dimmed or tinted copy
    assert not ov.heatmap(cam, (40, 48), scale).any()  # a viewer blending it paints nothing

    seen = {}
    real = ov.annotate

    def spy(im, lines, vmax, scaled_by, colour_scale=True):
        seen.update(lines=lines, colour_scale=colour_scale)
        return real(im, lines, vmax, scaled_by, colour_scale)

    monkeypatch.setattr(ov, "annotate", spy)
    captioned = ov.explained_overlay(img, cam, ["COVID: p(COVID) 0.81 >= threshold 0.47"], scale)
    assert _colourless(captioned)  # image, bar and caption: no colour bar stretched to 0 ... 0
    assert seen["colour_scale"] is False and seen["lines"][0].startswith("NO LOCALISED EVIDENCE: ")
    assert seen["lines"][1].startswith("COVID")


@pytest.mark.parametrize("scale", [None, 0.5])
@pytest.mark.parametrize("name", list(LOCALISED))
def test_a_localised_map_is_still_painted_with_its_colour_bar(name, scale, monkeypatch):
    cam = LOCALISED[name]
    img = _image()
    assert not _colourless(ov.overlay(img, cam, scale=scale))
    assert ov.heatmap(cam, (40, 48), scale).any()
    seen = {}
    real = ov.annotate
    monkeypatch.setattr(ov, "annotate", lambda *a, **k: seen.update(k) or real(*a, **k))
    captioned = ov.explained_overlay(img, cam, ["Normal"], scale)
    assert seen["colour_scale"] is True and not _colourless(captioned[img.shape[0] * 640 // img.shape[1]:])  # the bar


def test_a_fixed_scale_keeps_the_existing_colours_of_a_real_map():
    img = _image()
    fixed = ov.overlay(img, HANN, scale=2.0)
    own = ov.overlay(img, HANN)
    assert not np.array_equal(fixed, own)  # the scale is still applied
    np.testing.assert_allclose(normalise(HANN, 2.0), np.clip(HANN / 2.0, 0, 1))


def test_an_overlay_someone_else_blended_is_not_reused_for_a_map_with_no_evidence():
    img = _image()
    painted = ov.overlay(img, HANN)  # e.g. a caller blended before the rule existed
    assert _colourless(ov.explained_overlay(img, np.zeros((7, 7), np.float32), [], blended=painted))


def test_the_result_json_says_localised_or_not_and_why_with_one_rule():
    # the caller's own weak test (peak only) does not decide: the map does
    flat = Explanation("COVID", "engine-native", 0.5, 0.01, cam=np.full((7, 7), 0.5, np.float32), weak=False)
    d = flat.to_dict()
    assert d["weak"] is True and d["localised"] is False and "alike" in d["reason"]
    good = Explanation("COVID", "engine-native", float(HANN.max()), 0.01, cam=HANN).to_dict()
    assert good["weak"] is False and good["localised"] is True and good["reason"] is None
    nan = Explanation("COVID", "engine-native", float("nan"), 0.01, cam=_with_nan())
    text = json.dumps(nan.to_dict(), allow_nan=False)  # what the HTTP service sends: no NaN in JSON
    assert '"localised": false' in text and nan.peak == pytest.approx(float(np.nanmax(_with_nan())))
    assert Explanation("COVID", "tensorflow", 0.0, 0.0).to_dict()["localised"] is None  # no map, no claim


def test_the_job_store_flags_such_a_result_as_weak_map():
    from cxr_edge.node.store import Job

    e = Explanation("Normal", "engine-native", 0.0, 0.01, cam=np.zeros((7, 7), np.float32))
    job = Job.from_row(_job_row({"label": "Normal", "explanation": e.to_dict()}))
    assert job.to_dict()["weak_map"] is True


def _job_row(result: dict) -> list:
    from cxr_edge.node.store import _JOB_COLUMNS

    row = dict.fromkeys(_JOB_COLUMNS)
    row.update(id=1, state="screened", received_at=0.0, attempts=1, result=json.dumps(result))
    return [row[c] for c in _JOB_COLUMNS]


# ---- the node's DICOM Secondary Capture and Segmentation

MODEL = {"artifact": "model.int8-cpu.onnx", "recipe": "small_cnn", "version": "v3", "sha256": "ab" * 32,
         "precision": "int8", "backend": "onnxruntime", "provider": "CPUExecutionProvider"}
RESULT = {"label": "COVID", "probabilities": {"COVID": 0.81, "Normal": 0.19}, "threshold": 0.47,
          "decision": {"borderline": False, "text": "COVID: p(COVID) 0.81 vs threshold 0.47"}}


@pytest.mark.parametrize("name", ["constant", "all zero", "tiny peak", "NaN"])
def test_the_secondary_capture_of_a_map_with_no_evidence_is_the_gray_radiograph(name):
    from cxr_edge.node.heatmap_objects import captioned_overlay

    cam, _ = NOT_LOCALISED[name]
    img = _image()
    rgb = captioned_overlay(img, cam, RESULT, MODEL, blended=ov.overlay(img, cam))
    assert rgb.shape[2] == 3 and _colourless(rgb)
    assert not _colourless(captioned_overlay(img, HANN, RESULT, MODEL))


@pytest.fixture(scope="module")
def synthetic_source(tmp_path_factory):
    """A DX instance made from a synthetic image (never a real patient's)."""
    pytest.importorskip("highdicom")
    from conftest import write_png
    from dicom_studies import make_instance

    d = tmp_path_factory.mktemp("synthetic_dx")
    png = write_png(d / "synthetic.png", cxr_like(128, 112, seed=4))
    make_instance(png, d / "pa.dcm", "pa", max_side=128)
    return d / "pa.dcm"


def test_node_objects_for_a_flat_map_gray_sc_and_a_seg_that_says_so(synthetic_source, tmp_path):
    import pydicom

    from cxr_edge.node import result_objects as ro

    src = ro.read_source(synthetic_source.read_bytes())
    preview = pydicom.dcmread(synthetic_source).pixel_array
    flat = np.full((7, 7), 0.5, np.float32)
    objs = {o.kind: o for o in ro.build(src, RESULT, MODEL, preview=preview, cam=flat, blended=ov.overlay(preview, flat))}
    assert set(objs) == {"sr", "sc", "seg"}  # the SEG is still delivered, with nothing in it a viewer would paint
    paths = {k: o.write(tmp_path, "job-1") for k, o in objs.items()}
    sc = pydicom.dcmread(paths["sc"])
    assert sc.PhotometricInterpretation == "RGB" and _colourless(sc.pixel_array)
    seg = pydicom.dcmread(paths["seg"])
    assert seg.SegmentSequence[0].SegmentLabel == "Grad-CAM: no localised evidence"
    assert "NO LOCALISED EVIDENCE" in seg.ContentDescription
    assert not np.asarray(seg.pixel_array).any()  # a flat map scaled by its own maximum would be 1.0 everywhere
    good = {o.kind: o for o in ro.build(src, RESULT, MODEL, preview=preview, cam=HANN)}
    assert not _colourless(pydicom.dcmread(good["sc"].write(tmp_path, "job-2")).pixel_array)
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy:  # the changed texts still make valid objects
        for kind in ("sc", "seg"):
            out = subprocess.run([dciodvfy, str(paths[kind])], capture_output=True, text=True, timeout=60)
            assert not [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")], kind
