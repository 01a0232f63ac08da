"""Operating threshold, decisions, metrics and the written report."""

import json

import numpy as np
import pytest

from cxr_edge.decision import choose_threshold, decide

pytest.importorskip("sklearn")
from cxr_edge.evaluation.intervals import auc_ci
from cxr_edge.evaluation.metrics import evaluate_predictions, size_confounder_probe


def test_choose_threshold_meets_target_sensitivity():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(100, bool), np.zeros(100, bool)]
    p = np.r_[rng.uniform(0.3, 1.0, 100), rng.uniform(0.0, 0.7, 100)]
    op = choose_threshold(y, p, 0.95)
    assert op["sensitivity"] >= 0.95
    assert (p[y] >= op["threshold"]).mean() == op["sensitivity"]
    # the highest such threshold: just above the lowest positive it admits, sensitivity drops below
    # target; and it sits strictly between scores, so last-bit engine differences cannot flip a case
    t = op["threshold"]
    kth = p[y][p[y] >= t].min()
    assert (p[y] > kth).mean() < 0.95
    assert not ((p > t) & (p < kth)).any() and not (p == t).any()
    assert choose_threshold(np.ones(3, bool), np.ones(3))["threshold"] == 0.5


def test_decide_threshold_then_argmax_of_others():
    probs = np.array([[0.30, 0.60, 0.10], [0.20, 0.30, 0.50], [0.10, 0.85, 0.05]])
    assert decide(probs, ["COVID", "Normal", "Viral Pneumonia"], 0.25).tolist() == [0, 2, 1]
    assert decide(probs, ["COVID", "Normal", "Viral Pneumonia"], None).tolist() == [1, 2, 1]
    assert decide(probs[:, 1:], ["Normal", "Viral Pneumonia"], 0.2).tolist() == [0, 1, 0]


def test_metrics_on_known_predictions():
    classes = ["COVID", "Normal"]
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p_covid = np.array([0.9, 0.8, 0.7, 0.3, 0.6, 0.2, 0.1, 0.05])
    probs = np.c_[p_covid, 1 - p_covid]
    r = evaluate_predictions(y, probs, classes, threshold=0.5, sources=["a"] * 4 + ["b"] * 4, n_boot=200)
    assert r["confusion_matrix"] == [[3, 1], [1, 3]]
    assert r["accuracy"] == pytest.approx(0.75)
    assert r["covid"]["sensitivity"] == pytest.approx(0.75) and r["covid"]["specificity"] == pytest.approx(0.75)
    assert r["roc_auc"]["COVID"] == pytest.approx(15 / 16)
    lo, hi = r["covid"]["sensitivity_ci95"]
    assert 0 <= lo <= 0.75 <= hi <= 1
    assert r["per_source"]["a"]["covid_specificity"] is None  # source 'a' holds only COVID
    assert r["per_source"]["b"]["accuracy"] == pytest.approx(0.75)


def test_stratified_auc_interval_brackets_the_auc():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    y = rng.random(300) < 0.3
    s = y + rng.normal(0, 1, 300)
    lo, hi = auc_ci(y, s, 300)
    assert lo < roc_auc_score(y, s) < hi and hi - lo < 0.2
    assert auc_ci(np.ones(10, bool), np.arange(10.0)) is None  # one class only: no interval


def test_size_probe_detects_a_size_leak_and_not_a_fair_dataset():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(60, int), np.ones(60, int)]
    leaky = [(int(s), int(s)) for s in rng.integers(300, 4000, 60)] + [(int(s), int(s)) for s in rng.choice([224, 256], 60)]
    fair = [(int(s), int(s)) for s in rng.choice([224, 256, 512], 120)]
    assert size_confounder_probe(leaky, y)["accuracy_from_size_only"] > 0.9
    assert size_confounder_probe(fair, y)["accuracy_from_size_only"] < 0.7


def test_report_files(tmp_path):
    from cxr_edge.evaluation.report import write_report

    y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2])
    probs = np.eye(3)[[0, 1, 2, 0, 2, 2, 0, 1, 1]] * 0.7 + 0.1
    r = evaluate_predictions(y, probs, ["COVID", "Normal", "Viral Pneumonia"], threshold=0.5,
                             sizes=[(256, 256)] * 9, n_boot=50)
    hist = tmp_path / "history.csv"
    hist.write_text("epoch,accuracy,loss,val_accuracy,val_loss\n0,0.5,0.9,0.4,1.0\n1,0.7,0.6,0.6,0.8\n")
    md = write_report(r, tmp_path / "rep", {"model": "m.keras"}, hist, fine_tune_start=1)
    files = {p.name for p in (tmp_path / "rep").iterdir()}
    assert {"report.json", "report.md", "confusion_matrix.png", "roc.png", "training_curves.png"} <= files
    text = md.read_text()
    assert "| Viral Pneumonia |" in text and "pediatric" in text
    doc = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert doc["metrics"]["confusion_matrix"][2] == [0, 1, 2] and doc["history"]["val_loss"] == [1.0, 0.8]
