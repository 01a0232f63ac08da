"""Issue 14: decisions that explain themselves, exact statistics, evaluation and site calibration of the
deployed artifact (no TensorFlow: the tiny onnx.helper artifacts)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cxr_edge.decision import Decision, borderline_band, calibrated, describe_operating_point


def test_decision_says_why_a_lower_covid_probability_is_still_covid():
    d = Decision.of(np.array([0.495, 0.505]), ["COVID", "Normal"], 0.4709, "95% sensitivity on validation (n+ = 54)")
    assert d.label == "COVID" and d.rule == "threshold" and d.margin == pytest.approx(0.0241, abs=1e-4)
    assert d.text() == ("COVID: p 0.49 >= threshold 0.47 (operating point: 95% sensitivity on validation (n+ = 54)). "
                        "Borderline: within 0.05 of the threshold, treat as uncertain")
    n = Decision.of(np.array([0.30, 0.70]), ["COVID", "Normal"], 0.47)
    assert n.label == "Normal" and not n.borderline and "p(COVID) 0.30 < threshold 0.47" in n.text()
    a = Decision.of(np.array([0.2, 0.5, 0.3]), ["COVID", "Normal", "Viral Pneumonia"], None)
    assert a.rule == "argmax" and a.label == "Normal" and a.margin is None and "no COVID threshold" in a.text()
    assert json.dumps(d.to_dict())  # JSON-able, full precision
    assert d.to_dict()["covid_probability"] == 0.495


def test_borderline_band_is_the_artifacts_own_measured_disagreement():
    from cxr_edge.manifest_schema import GateRecord, OperatingPoint

    assert borderline_band(None) == borderline_band(GateRecord()) == 0.05
    assert borderline_band(GateRecord(metrics={"max_abs_dprob": 0.146})) == 0.146
    assert borderline_band(GateRecord(metrics={"max_abs_dprob": 0.004})) == 0.05
    assert describe_operating_point(OperatingPoint(threshold=0.4, target_sensitivity=0.95, chosen_on="val",
                                                   n_positive=26)) == "95% sensitivity on validation (n+ = 26)"
    assert describe_operating_point(None) is None


def test_exact_intervals_do_not_collapse_at_the_boundary():
    from cxr_edge.evaluation.intervals import exact_ci, resolvable_difference

    lo, hi = exact_ci(26, 26)
    assert 0.86 < lo < 0.88 and hi == 1.0  # the percentile bootstrap said 100.0%-100.0%
    lo, hi = exact_ci(0, 44)
    assert lo == 0.0 and 0.07 < hi < 0.09
    assert resolvable_difference(44) > 1 / 44  # one flip in 44 is within what 44 images resolve


def test_temperature_keeps_the_ranking_and_softens():
    p = np.array([[0.99, 0.01], [0.6, 0.4], [0.2, 0.8]])
    q = calibrated(p, 2.0)
    assert np.allclose(q.sum(1), 1) and (np.argsort(q[:, 0]) == np.argsort(p[:, 0])).all()
    assert q[0, 0] < p[0, 0] and np.array_equal(calibrated(p, None), p)


def test_evaluate_an_onnx_artifact_without_tensorflow(tiny_export, tmp_path):
    art = next(a.path for a in tiny_export.artifacts if a.variant == "int8-cpu")
    out = subprocess.run([sys.executable, "-m", "cxr_edge.cli", "evaluate", str(art), str(tiny_export.data),
                          "--out", str(tmp_path / "rep"), "--bootstrap", "50"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "95% CI" in out.stdout and "threshold 0.50" in out.stdout
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "engine: onnxruntime / CPUExecutionProvider / int8" in md and "Clopper-Pearson" in md
    assert "## Per class" in md and "## Confusion matrix" in md and (tmp_path / "rep" / "roc.png").is_file()
    doc = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert doc["metrics"]["covid"]["sensitivity_ci95"][1] <= 1.0
    bad = subprocess.run([sys.executable, "-m", "cxr_edge.cli", "evaluate", str(tiny_export.data / "SOURCES.csv"),
                          str(tiny_export.data)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 5 and bad.stderr.strip().count("\n") == 0 and "Cannot tell the format" in bad.stderr


def test_calibrate_moves_the_threshold_writes_the_next_manifest_and_predict_uses_it(tiny_export, tmp_path):
    from cxr_edge.manifest import read_manifest
    from cxr_edge.runtime import Screener
    from cxr_edge.workflows.calibrate import calibrate_artifact

    src = next(a for a in tiny_export.artifacts if a.variant == "fp32").path
    for f in src.parent.iterdir():
        if f.name.startswith(src.name) or f.suffix == ".npz":
            shutil.copy(f, tmp_path / f.name)
    art = tmp_path / src.name
    before = read_manifest(art)
    s = calibrate_artifact(art, tiny_export.data, target_sensitivity=0.9, temperature=True, progress=False, ci_width=0.5)
    after = read_manifest(art)
    assert after.manifest_version == after.revision == 2 and (tmp_path / f"{src.name}.manifest.v1.json").is_file()
    assert after.sha256 == before.sha256 and after.created == before.created  # the artifact itself is untouched
    assert after.threshold == pytest.approx(s["after"]["threshold"]) and "site data" in after.operating_point.chosen_on
    assert after.site_calibration.n_images == s["site"]["n_images"] > 0
    assert after.operating_point_history[0].manifest_version == 1
    assert after.operating_point_history[0].threshold == before.threshold
    assert s["after"]["sensitivity"] >= 0.9 and s["after"]["sensitivity_ci95"][0] < s["after"]["sensitivity"]
    md = (tmp_path / f"calibration-{src.name}-v2" / "calibration.md").read_text()
    assert "before (as deployed)" in md and "after (this site)" in md and "95% CI" in md
    with Screener(art, isolation=None) as sc:
        r = sc.predict([sorted((tiny_export.data / "COVID").iterdir())[0]])[0]
    assert r.threshold == pytest.approx(after.threshold) and "site data" in r.decision.operating_point
    assert sc.engine.manifest.probability_temperature == pytest.approx(s["after"]["temperature"])


def test_bench_never_overwrites_a_previous_run_silently(tmp_path):
    from cxr_edge.cli.bench_commands import bench_out_dir
    from cxr_edge.errors import ConfigError

    first = bench_out_dir(str(tmp_path), None, False)
    first.mkdir(parents=True)
    assert bench_out_dir(str(tmp_path), None, False) != first  # a new folder per run
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "results.json").write_text("{}")
    with pytest.raises(ConfigError, match="--force"):
        bench_out_dir(str(tmp_path), str(tmp_path / "mine"), False)
    assert bench_out_dir(str(tmp_path), str(tmp_path / "mine"), True) == tmp_path / "mine"


def test_one_agreement_criterion_with_split_n_and_resolution():
    from cxr_edge.evaluation.criteria import FAILED, PASSED, WITHIN_RESOLUTION, agreement_verdict

    assert agreement_verdict(102, 102, 0.99, "validation")["status"] == PASSED
    one = agreement_verdict(43, 44, 0.99, "test")  # the contradiction of the report: 1 flip in 44
    assert one["status"] == WITHIN_RESOLUTION and "43/44" in one["text"] and "test split" in one["text"]
    assert "cannot tell" in one["text"]
    assert agreement_verdict(39, 44, 0.99, "test")["status"] == FAILED
    assert agreement_verdict(990, 1000, 0.99)["status"] == PASSED
    assert agreement_verdict(975, 1000, 0.99)["status"] == FAILED  # many images resolve 97.5% from 99%


def test_training_note_marks_the_saved_epoch_and_a_still_falling_loss():
    from cxr_edge.evaluation.report import training_note

    n = training_note({"val_loss": [1.0, 0.8, 0.7, 0.6]})
    assert n["saved_epoch"] == 4 and n["still_falling"] and "more epochs" in n["text"]
    n = training_note({"val_loss": [1.0, 0.5, 0.7, 0.8]})
    assert n["saved_epoch"] == 2 and not n["still_falling"]


def test_scan_of_a_class_folder_says_pass_its_parent(tmp_path):
    import cv2

    from cxr_edge.data import scan_dataset
    from cxr_edge.errors import DatasetError

    (tmp_path / "COVID").mkdir()
    cv2.imwrite(str(tmp_path / "COVID" / "a.png"), np.zeros((64, 64), np.uint8))
    with pytest.raises(DatasetError, match="is itself a class folder.*pass its parent"):
        scan_dataset(tmp_path / "COVID")
